"""The sandbox's harness: walls an interpreter in, relays cells to it and frames the replies the trainer reads.

Forked for each `jaxagent.envs.sandbox.Sandbox` by the launcher (`sandbox_launcher`) in its own session, with the
sandbox's minimal environment, its scratch directory as working directory and the pipes to the trainer. The harness
never runs agent code. It

1. imports the modules the episode needs (`preload`) and builds the object it serves to the agent (`host`, e.g.
   AppTown's world), while their files are still readable;
2. enters the namespaces (`sandbox_isolation.enter_namespaces`), unless `isolation` is `python`;
3. forks the init of the new pid namespace, which mounts its own /proc and forks the interpreter
   (`sandbox_interpreter.serve`); when the interpreter ends, the init exits and the kernel kills whatever it left;
4. answers the trainer's JSON-line requests: `{"code"}` runs a cell (the reply is the line from the interpreter
   that carries the cell's random id; anything else the agent writes is dropped, and calls to the host are
   answered), `{"report"}` returns `host.report()` without asking the interpreter.

When the interpreter dies, the harness replies `{"stopped": how}` and exits; the trainer starts a new sandbox.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import secrets
import signal
import sys
import time

from jaxagent.envs import sandbox_interpreter, sandbox_isolation

# A line from the interpreter longer than this is not a reply (cells' output is cut far below it).
MAX_LINE_CHARS = 1 << 22


@dataclasses.dataclass
class Interpreter:
    """The harness's handle on its interpreter: the child to wait for and the pipes to it."""

    pid: int  # the pid namespace's init (or, with Python-level isolation, the interpreter itself)
    channel: sandbox_interpreter.Channel

    def run(self, code: str, host) -> dict:
        """One cell: the interpreter's reply carrying this cell's id, or {"stopped": how} if it died."""
        cell_id = secrets.token_hex(16)
        try:
            self.channel.send({"id": cell_id, "code": code})
            while True:
                message = self.channel.receive(MAX_LINE_CHARS)
                if "call" in message:
                    self.channel.send(_answer(host, message))
                elif message.get("id") == cell_id:
                    return {"output": str(message.get("output", "")), "error": _text_or_none(message.get("error"))}
        except (EOFError, OSError, ValueError):
            return {"stopped": self._exit_description()}

    def wait_ready(self) -> bool | str:
        """True once the interpreter is walled in; otherwise why it could not be."""
        try:
            message = self.channel.receive(MAX_LINE_CHARS)
        except (EOFError, OSError, ValueError):
            return f"the interpreter stopped before its first cell ({self._exit_description()})"
        return True if message.get("ready") else str(message.get("failed"))

    def _exit_description(self) -> str:
        """How the interpreter ended (it may still run if it only closed its pipe: then it is killed)."""
        deadline = time.monotonic() + 2.0
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        while pid == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return exit_text(128 - code if code > 128 else code)  # the init's encoding of a signal (see _run_init)


def exit_text(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"


def _text_or_none(value) -> str | None:
    return None if value is None else str(value)


def _answer(host, message: dict) -> dict:
    """Run a call the agent made on the served object; the host validates the path."""
    if host is None:
        return {"raised": ["RuntimeError", "nothing is served in this sandbox"]}
    try:
        result = host.call(str(message["call"]), list(message.get("args", [])), dict(message.get("kwargs", {})))
        json.dumps(result)
    except Exception as exc:  # the agent's mistake is its observation
        return {"raised": [type(exc).__name__, str(exc)]}
    return {"result": result}


def _make_host(spec: dict | None):
    if not spec:
        return None
    module, name = spec["factory"].split(":")
    return getattr(importlib.import_module(module), name)(*spec.get("args", []))


def _start_interpreter(config: dict) -> Interpreter:
    """Fork the interpreter (under its own init with namespaces); returns the harness's end of its pipes."""
    to_child_read, to_child_write = os.pipe()
    from_child_read, from_child_write = os.pipe()
    harness = os.getpid()
    # As root (and walled in by namespaces) the interpreter becomes a user of its own; otherwise (or when that uid
    # does not exist here, e.g. in a rootless container) it keeps the trainer's user, root of a nested user namespace.
    own_user = config["root"] and config["isolation"] == "namespaces" and sandbox_isolation.uid_is_mapped(
        sandbox_isolation.UID_BASE + harness)
    sandbox_uid = sandbox_isolation.UID_BASE + harness if own_user else None
    if sandbox_uid is not None:
        os.chown(config["scratch"], sandbox_uid, sandbox_uid)
    pid = os.fork()
    if pid == 0:
        os.close(to_child_write)
        os.close(from_child_read)
        child_fds = (to_child_read, from_child_write)
        try:
            sandbox_isolation.die_with_parent(harness)
            if config["isolation"] == "namespaces":
                _run_init(child_fds, config, sandbox_uid)
            sandbox_interpreter.serve(child_fds, config, None)
        finally:
            os._exit(70)
    os.close(to_child_read)
    os.close(from_child_write)
    return Interpreter(pid, sandbox_interpreter.Channel(from_child_read, to_child_write))


def _run_init(child_fds: tuple[int, int], config: dict, sandbox_uid: int | None) -> None:
    """Pid 1 of the sandbox: mount its /proc, fork the interpreter, reap orphans, exit with the interpreter's
    status (signals as 128 + n). The kernel then kills every process left in the namespace. Never returns."""
    try:
        sandbox_isolation.mount_own_proc()
    except OSError as err:
        sandbox_interpreter.Channel(*child_fds).send({"failed": str(err)})
        os._exit(71)
    interpreter = os.fork()
    if interpreter == 0:
        try:
            sandbox_interpreter.serve(child_fds, config, sandbox_uid)
        finally:
            os._exit(70)
    sandbox_interpreter.close_all_but(())
    while True:
        pid, status = os.wait()
        if pid == interpreter:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _isolate(scratch: str, config: dict) -> None:
    if config["isolation"] != "namespaces":
        return
    keep = tuple(path for path in sys.path if os.path.isdir(path)) + (sys.prefix, sys.base_prefix)
    sandbox_isolation.enter_namespaces(scratch, sandbox_isolation.PRIVATE_PATHS + (config["home"],), keep)


def run(scratch: str, request_fd: int, reply_fd: int, worker_config: dict) -> None:
    """Set up, then relay requests on the pipes from and to the trainer until the trainer closes them."""
    config = {**worker_config, "scratch": scratch, "root": os.geteuid() == 0}
    requests = os.fdopen(request_fd, "r", encoding="utf-8")
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    for module in config.get("preload", ()):
        importlib.import_module(module)
    host = _make_host(config.get("host"))
    try:
        _isolate(scratch, config)
    except OSError as err:
        reply({"ready": False, "error": str(err)})
        return
    interpreter = _start_interpreter(config)
    walled_in = interpreter.wait_ready()
    if walled_in is not True:
        reply({"ready": False, "error": walled_in})
        return
    reply({"ready": True, "isolation": config["isolation"], "pid": interpreter.pid})
    for line in requests:
        request = json.loads(line)
        if "report" in request:
            reply({"report": host.report() if host is not None else None})
            continue
        answer = interpreter.run(request["code"], host)
        reply(answer)
        if "stopped" in answer:
            return
