"""The process that runs agent code: one persistent namespace per episode, cells in, results out.

Started by the harness (`sandbox_worker`) as a forked child that holds only its own two pipes to the harness, never
the harness's pipes to the trainer. Messages are JSON lines:

* harness → interpreter: `{"id", "code"}` (a cell), or `{"result"}` / `{"raised": [type, message]}` (the answer to
  a call this interpreter made);
* interpreter → harness: `{"ready"}` once walled in (or `{"failed": why}`), then per cell
  `{"call": path, "args", "kwargs"}` (a call to the object the harness serves, e.g. AppTown's
  `apis`), then `{"id", "output", "error"}` when the cell is done.

Agent code can write anything on these pipes; the harness answers only calls it validates and takes as the cell's
result only a line carrying the cell's id, which is random and unknown before the cell starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback

from jaxagent.envs import sandbox_isolation

# Exceptions a served call may raise inside the sandbox under their own name; any other arrives as RuntimeError.
_RAISABLE = {kind.__name__: kind for kind in (ValueError, TypeError, KeyError, IndexError, LookupError,
                                              AttributeError, PermissionError, NotImplementedError, RuntimeError)}


class Channel:
    """JSON lines over a pair of pipe descriptors."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._reader = os.fdopen(read_fd, "r", encoding="utf-8")
        self._writer = os.fdopen(write_fd, "w", encoding="utf-8")

    def send(self, message: dict) -> None:
        self._writer.write(json.dumps(message, default=str) + "\n")
        self._writer.flush()

    def receive(self, max_chars: int = -1) -> dict:
        """The next message; EOFError when the other side closed, ValueError for a line that is not one."""
        line = self._reader.readline(max_chars)
        if not line:
            raise EOFError("the other side closed the channel")
        if not line.endswith("\n"):
            raise ValueError("an over-long or unterminated line")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("a message that is not an object")
        return message


class Remote:
    """A proxy for the object the harness serves: `apis.contacts.search(query="Ada")` sends the call
    `contacts.search` with its arguments (JSON values; others are sent as their str()) and returns the answer."""

    def __init__(self, channel: Channel, name: str, path: str = "") -> None:
        self._channel, self._name, self._path = channel, name, path

    def __getattr__(self, attribute: str) -> "Remote":
        if attribute.startswith("_"):
            raise AttributeError(f"{self!r} has no attribute {attribute!r}")
        return Remote(self._channel, self._name, f"{self._path}.{attribute}" if self._path else attribute)

    def __call__(self, *args, **kwargs):
        self._channel.send({"call": self._path, "args": list(args), "kwargs": kwargs})
        answer = self._channel.receive()
        if "raised" in answer:
            kind, message = answer["raised"]
            raise _RAISABLE.get(kind, RuntimeError)(message if kind in _RAISABLE else f"{kind}: {message}")
        return answer["result"]

    def __repr__(self) -> str:
        return f"<{self._name}.{self._path}>" if self._path else f"<{self._name}>"


def serve(channel_fds: tuple[int, int], config: dict, sandbox_uid: int | None) -> None:
    """Wall this process in, then answer cells until the harness closes the channel. Never returns."""
    close_all_but(channel_fds)
    channel = Channel(*channel_fds)
    try:
        _wall_in(config, sandbox_uid)
    except OSError as err:
        channel.send({"failed": str(err)})
        os._exit(71)
    channel.send({"ready": True})
    namespace: dict = {"__name__": "__main__"}
    if config.get("host"):
        namespace[config["host"]["name"]] = Remote(channel, config["host"]["name"])
    my_pid = os.getpid()
    while True:
        try:
            request = channel.receive()
        except EOFError:
            os._exit(0)
        if "code" not in request:
            continue  # an answer to a call nobody is waiting for
        reply = run_cell(request["code"], namespace, config["max_output_chars"])
        if os.getpid() != my_pid:  # a forked child of a cell must never answer for the interpreter
            os._exit(0)
        channel.send({"id": request.get("id"), **reply})


def _wall_in(config: dict, sandbox_uid: int | None) -> None:
    if config["isolation"] == "namespaces":
        sandbox_isolation.drop_privileges(sandbox_uid)
    else:
        sandbox_isolation.python_level_guards(config["scratch"])
    os.chdir(config["scratch"])
    sandbox_isolation.apply_limits(config["memory_mb"], config["max_processes"], config["max_file_mb"])
    sys.setrecursionlimit(config["recursion_limit"])


def close_all_but(keep: tuple[int, ...]) -> None:
    """Close every descriptor above stderr except `keep` (the harness's pipes to the trainer above all)."""
    start = 3
    for fd in sorted(keep):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 16)


def run_cell(code: str, namespace: dict, max_output: int) -> dict:
    """Execute `code` in `namespace`; returns what it printed and, if it raised, its traceback."""
    buffer = io.StringIO()
    error = None
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except BaseException as exc:  # the cell's failure is the observation, whatever it is
            error = _agent_traceback(exc)[-4000:]
    output = buffer.getvalue()
    if len(output) > max_output:
        output = output[:max_output] + f"\n[output truncated at {max_output} characters]"
    return {"output": output, "error": error}


def _agent_traceback(exc: BaseException) -> str:
    """The traceback without this module's frames: the agent sees its own code's frames only."""
    report = traceback.TracebackException.from_exception(exc)
    report.stack = traceback.StackSummary.from_list([frame for frame in report.stack if frame.filename != __file__])
    return "".join(report.format())
