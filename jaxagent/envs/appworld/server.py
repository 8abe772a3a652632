"""A pool of AppWorld environment servers on loopback ports, and the HTTP calls jaxagent makes to them.

Each server is `appworld.serve.environment` (the FastAPI app behind `appworld serve environment`) in AppWorld's own
virtualenv. It holds one task world at a time, so one episode owns one server from `/initialize` to `/close`, and
the pool starts servers on demand up to its size. We run the app with uvicorn on 127.0.0.1 rather than through the
`appworld serve` command, which binds 0.0.0.0: these servers execute model-written code and must not be reachable
from the network. Each server exits when the trainer process does, even when it is killed (serve.py).

A server that dies (or stops answering) is killed and replaced by a fresh one on a new free port; the episode that
was using it ends with an error and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from jaxagent.envs.appworld.home import AppWorldHome

log = logging.getLogger(__name__)
SERVE_SCRIPT = Path(__file__).with_name("serve.py")  # runs in AppWorld's virtualenv; exits when we do


class ServerError(RuntimeError):
    """An environment server failed: it died, refused the connection, timed out or answered with an error."""


@dataclasses.dataclass
class Server:
    """One running environment server."""

    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, path: str, timeout: float, **body) -> object:
        """POST `body` as JSON to `path`; returns the reply's "output"."""
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read())["output"]
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[-500:]
            raise ServerError(f"server on port {self.port}: {path} answered HTTP {err.code}: {detail}") from err
        except (OSError, ValueError, KeyError) as err:  # refused, reset, timed out, or not JSON
            state = "alive" if self.alive() else f"dead (exit {self.process.returncode})"
            raise ServerError(f"server on port {self.port} ({state}): {path} failed: {err}") from err

    def healthy(self, timeout: float = 2.0) -> bool:
        if not self.alive():
            return False
        try:
            with urllib.request.urlopen(self.url + "/", timeout=timeout) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        # Killed outright: a server holds no state worth saving (worlds live in its memory), and uvicorn's
        # graceful shutdown takes seconds.
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=30)  # SIGKILLed: it cannot take long


class ServerPool:
    """Up to `size` environment servers serving the data root `root`; `acquire` hands out a healthy idle one."""

    def __init__(self, home: AppWorldHome, root: Path, size: int, startup_timeout_s: float = 120.0) -> None:
        if size < 1:
            raise ValueError(f"AppWorld server pool size {size} must be >= 1")
        self.home, self.root, self.size, self.startup_timeout_s = home, Path(root), size, startup_timeout_s
        self._idle: list[Server] = []
        self._busy: set[int] = set()  # ports of servers handed out
        self._starting = 0
        self._restarts = 0
        self._closed = False
        self._cond = threading.Condition()
        home.logs.mkdir(parents=True, exist_ok=True)

    @property
    def restarts(self) -> int:
        """Servers replaced after they died (a statistic for logs and tests)."""
        return self._restarts

    def acquire(self, timeout_s: float = 600.0) -> Server:
        """A healthy server for one episode (started if none is idle and the pool has room)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                if self._closed:
                    raise ServerError("the AppWorld server pool is closed")
                server = self._idle.pop() if self._idle else None
                start = server is None and len(self._busy) + self._starting < self.size
                if server is None and not start:
                    if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise ServerError(f"no AppWorld server became free within {timeout_s:g} s "
                                          f"(pool size {self.size})")
                    continue
                if start:
                    self._starting += 1
            if start:
                try:
                    server = self._start()
                finally:
                    with self._cond:
                        self._starting -= 1
                        self._cond.notify_all()
            elif not server.healthy():
                log.warning("AppWorld server on port %d died while idle; starting a new one", server.port)
                server.stop()
                server = self._replace()
            with self._cond:
                self._busy.add(server.port)
            return server

    def release(self, server: Server, broken: bool = False) -> None:
        """Give a server back; a broken one is killed and a fresh one takes its place."""
        with self._cond:
            self._busy.discard(server.port)
        if broken or not server.alive():
            log.warning("AppWorld server on port %d failed; restarting it", server.port)
            server.stop()
            try:
                server = self._replace()
            except ServerError as err:  # the next acquire tries again
                log.warning("%s", err)
                with self._cond:
                    self._cond.notify_all()
                return
        with self._cond:
            if self._closed:
                server.stop()
            else:
                self._idle.append(server)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop every idle server; busy ones stop when released."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for server in idle:
            server.stop()

    def _replace(self) -> Server:
        with self._cond:
            self._restarts += 1
        return self._start()

    def _start(self, attempts: int = 3) -> Server:
        error = ""
        for _ in range(attempts):  # a port picked free can be taken before uvicorn binds it
            port = _free_port()
            log_file = open(self.home.logs / f"server-{port}.log", "ab")
            process = subprocess.Popen(
                [str(self.home.python), str(SERVE_SCRIPT), str(port)],
                env=self.home.child_env(self.root), cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)  # a Ctrl-C in the terminal reaches jaxagent, which stops the pool
            log_file.close()
            server = Server(port, process)
            deadline = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < deadline and server.alive():
                if server.healthy(timeout=1.0):
                    return server
                time.sleep(0.1)
            error = (f"exit {process.returncode}" if not server.alive()
                     else f"no answer within {self.startup_timeout_s:g} s")
            server.stop()
        raise ServerError(f"AppWorld server did not start ({error}); see the logs in {self.home.logs}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
