"""Serve AppWorld's environment app on loopback until the process that started us goes away.

Run by `server.ServerPool` with AppWorld's own virtualenv (`python serve.py PORT`), so it imports only the standard
library, uvicorn and appworld. It serves `appworld.serve.environment:app` (the app behind `appworld serve
environment`) on 127.0.0.1, and exits when its parent dies: a trainer killed with SIGKILL leaves no server behind.
"""

import os
import sys
import threading
import time


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main() -> None:
    import uvicorn

    port = int(sys.argv[1])
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    uvicorn.run("appworld.serve.environment:app", host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
