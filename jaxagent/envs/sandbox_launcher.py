"""The sandbox's launcher: one process per trainer process that forks a harness for every new sandbox.

Starting each harness as a new Python process costs about 60 ms of CPU (interpreter start-up and imports) per
episode; forking it from a process that has already imported the harness costs about 10. The launcher is trusted code
like the harness and never runs agent code. `jaxagent.envs.sandbox` starts it as `python -I -m
jaxagent.envs.sandbox_launcher FD` with the sandbox's minimal environment (none of the trainer's variables) and talks
to it over a Unix seqpacket socket (FD), one JSON message per request and per answer:

- `{"start": config, "scratch_root": dir, "env": {...}}` with the request and reply pipes of the new sandbox
  attached: creates the sandbox's scratch directory under `scratch_root`, imports the modules the sandbox preloads and
  its host's module (once per launcher), forks the harness (its own session, working directory the scratch
  directory, environment `env` with HOME and TMPDIR there), which runs `sandbox_worker.run`; answers
  `{"pid": n, "scratch": dir}`. The launcher, not the trainer, creates the directory, so a trainer killed at any
  moment leaves none behind: the launcher removes every directory it made.
- `{"stop": pid}`: SIGKILLs the harness's process group, reaps it and removes its scratch directory; answers
  `{"status": how}`.
- `{"wait": pid, "timeout": s}`: `{"status": how}` once the harness ended, `{"status": null}` if still running then.

Harnesses stay the launcher's children until `stop` reaps them, so a pid it signals was never reused. The launcher
exits when the trainer's end of the socket closes. A trainer that ended (or was killed) without stopping its
sandboxes leaves their harnesses to the launcher, which stops them and removes their scratch directories first.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from jaxagent.envs import sandbox_worker

MAX_MESSAGE_BYTES = 1 << 20
SCRATCH_PREFIX = "jaxagent-sandbox-"
# How long the harnesses left behind by a trainer get to end by themselves (their requests end, so they return)
# before they are killed.
ORPHAN_GRACE_S = 2.0


def _wait(pid: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "ended"  # reaped before (a repeated request)
        if done:
            return sandbox_worker.exit_text(os.waitstatus_to_exitcode(status))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)


def _kill_and_reap(pid: int) -> str | None:
    """SIGKILL a harness's process group and reap the harness; how it ended."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # it ended and is a zombie until reaped below
    return _wait(pid, 5.0)


def _fork_harness(channel: socket.socket, request: dict, fds: list[int], scratch: str) -> int:
    config = request["start"]
    host = config.get("host")
    for module in [*config.get("preload", ()), *([host["factory"].split(":")[0]] if host else [])]:
        importlib.import_module(module)  # here, so every later harness inherits it instead of importing it again
    pid = os.fork()
    if pid == 0:
        try:
            channel.close()  # a harness has no say over other sandboxes
            os.setsid()  # the trainer stops a sandbox by SIGKILLing this group
            os.chdir(scratch)
            os.environ.clear()
            os.environ.update({**request["env"], "HOME": scratch, "TMPDIR": scratch})
            sandbox_worker.run(scratch, fds[0], fds[1], config)
        finally:
            os._exit(70)
    for fd in fds:
        os.close(fd)
    return pid


def _answer(channel: socket.socket, request: dict, fds: list[int], scratch_of: dict[int, str]) -> dict:
    if "start" in request:
        if len(fds) != 2:
            return {"error": f"a start request carries 2 descriptors, not {len(fds)}"}
        scratch = None
        try:
            scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=request["scratch_root"])
            os.chmod(scratch, 0o755)  # the interpreter may run as another user (sandbox_worker)
            pid = _fork_harness(channel, request, fds, scratch)
            scratch_of[pid] = scratch
            return {"pid": pid, "scratch": scratch}
        except Exception as err:  # no such root, a host module that fails to import, no memory: this sandbox only
            for fd in fds:
                os.close(fd)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            return {"error": f"{type(err).__name__}: {err}"}
    for fd in fds:
        os.close(fd)
    if "stop" in request:
        pid = int(request["stop"])
        status = _kill_and_reap(pid)
        scratch = scratch_of.pop(pid, None)
        if scratch is not None:  # here too, so a trainer killed right after its request leaves nothing behind
            shutil.rmtree(scratch, ignore_errors=True)
        return {"status": status}
    if "wait" in request:
        return {"status": _wait(int(request["wait"]), float(request.get("timeout", 0.0)))}
    return {"error": f"unknown request {sorted(request)}"}


def _clean_up_after(scratch_of: dict[int, str]) -> None:
    """Stop the harnesses the trainer left running and remove their scratch directories."""
    deadline = time.monotonic() + ORPHAN_GRACE_S
    for pid, scratch in scratch_of.items():
        if _wait(pid, max(0.0, deadline - time.monotonic())) is None:
            _kill_and_reap(pid)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    """Answer the trainer's requests until it closes the socket, then clean up after it."""
    channel = socket.socket(fileno=int(sys.argv[1]))
    scratch_of: dict[int, str] = {}  # harnesses started and not yet stopped
    try:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE_BYTES, 2)
            except OSError:
                return
            if not data:
                return
            channel.send(json.dumps(_answer(channel, json.loads(data), fds, scratch_of)).encode())
    finally:
        _clean_up_after(scratch_of)


if __name__ == "__main__":
    main()
