"""Run model-written Python outside the trainer: one persistent, isolated interpreter per episode.

`Sandbox.run(code)` executes a cell in the episode's interpreter and returns its output or its error. Three
processes are involved: the trainer (this module), the harness (`sandbox_worker`, trusted code that frames every
reply the trainer reads) and the interpreter it starts (`sandbox_interpreter`, the only process that runs agent
code, walled in as `sandbox_isolation` describes: no network, its own pid namespace, a read-only filesystem with
private folders hidden, resource limits). The interpreter sees none of the trainer's environment variables.

A cell that hangs, crashes the interpreter or exits it gets an error result; the sandbox is replaced (its
variables are lost, and `setup_code` runs again) and the episode goes on. The trainer never waits longer than the
cell timeout and never runs agent code itself. An environment can have the harness serve an object to the agent
(`host`): the agent calls its methods through a proxy, and the trainer reads its state with `report()`, which the
interpreter cannot answer or forge.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from jaxagent import choices
from jaxagent.errors import check_choice

log = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """The sandbox could not start an interpreter at all."""


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """An object the harness builds with `factory(*args)` ("module:callable") and serves to the agent as `name`.

    The object answers `call(path, args, kwargs)` for the agent (it must refuse paths it does not serve) and
    `report()` for the trainer; arguments and results are JSON values.
    """

    factory: str
    args: tuple = ()
    name: str = "apis"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-cell and per-interpreter limits."""

    cell_timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 64
    max_output_chars: int = 20_000
    recursion_limit: int = 3000
    start_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class CellResult:
    """A cell's printed output and, if it failed, the error text (a traceback or the harness's explanation)."""

    output: str
    error: str | None = None
    restarted: bool = False  # the interpreter was replaced after this cell

    @property
    def text(self) -> str:
        """What the agent sees: the output, then the error."""
        return "\n".join(part for part in (self.output.rstrip("\n"), (self.error or "").rstrip("\n")) if part)


class Sandbox:
    """One episode's interpreter."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), setup_code: str = "",
                 scratch_root: str | None = None, preload: tuple[str, ...] = (), host: HostSpec | None = None,
                 isolation: str = "namespaces") -> None:
        """`setup_code` runs in every new interpreter; `preload` names modules it imports, loaded before isolation;
        `isolation` is "namespaces" or, where the kernel refuses them, "python" (weaker: see sandbox_isolation)."""
        check_choice(isolation, choices.SANDBOX_ISOLATIONS, "isolation", SandboxError)
        self.limits, self.setup_code, self.scratch_root, self.preload = limits, setup_code, scratch_root, preload
        self.host, self.isolation = host, isolation
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._start()

    # ---- public API ---------------------------------------------------------------------------------------------

    def run(self, code: str) -> CellResult:
        """Execute `code` in the episode's namespace."""
        if self._process is None:
            raise SandboxError("the sandbox is closed")
        try:
            reply = self._send({"code": code}, self.limits.cell_timeout_s)
        except TimeoutError:
            self._restart()
            return CellResult("", f"TimeoutError: the cell ran longer than {self.limits.cell_timeout_s:g} s and was "
                                  "stopped; the interpreter was restarted and its variables are lost.", True)
        except (EOFError, OSError, ValueError) as err:
            reply = {"stopped": f"{self._exit_description()}; {err}"}
        if "stopped" in reply:
            self._restart()
            return CellResult("", f"SystemError: the interpreter stopped ({reply['stopped']}); it was restarted "
                                  "and its variables are lost.", True)
        return CellResult(reply.get("output", ""), reply.get("error"))

    def report(self):
        """The served object's `report()`, answered by the harness (the interpreter never sees this request)."""
        if self._process is None:
            raise SandboxError("the sandbox is closed")
        return self._send({"report": True}, self.limits.start_timeout_s)["report"]

    def close(self) -> None:
        """Stop the interpreter and every process it started; remove the scratch directory."""
        self._stop()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- process management ---------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.scratch = tempfile.mkdtemp(prefix="jaxagent-sandbox-", dir=self.scratch_root)
        os.chmod(self.scratch, 0o755)
        request_read, self._request_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        self._interpreter_pid = None
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-m", "jaxagent.envs.sandbox_worker", self.scratch, str(request_read),
             str(reply_write), json.dumps(self._worker_config())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._worker_environment(), cwd=self.scratch, pass_fds=(request_read, reply_write),
            start_new_session=True, close_fds=True)
        os.close(request_read)
        os.close(reply_write)
        self._buffer = b""
        try:
            hello = self._read_reply(self.limits.start_timeout_s)
        except (TimeoutError, EOFError, ValueError) as err:
            self._stop()
            raise SandboxError(f"the sandbox interpreter did not start ({err})") from None
        if not hello.get("ready"):
            self._stop()
            raise SandboxError(f"the kernel refused the namespaces the sandbox needs ({hello.get('error')}); to run "
                               "agent code with Python-level guards only (no pid, mount or network isolation), set "
                               "isolation: python (a run's env.options.isolation)")
        self._interpreter_pid = hello["pid"]
        if self.setup_code:
            reply = self._send({"code": self.setup_code}, self.limits.start_timeout_s)
            if reply.get("error") or "stopped" in reply:
                self._stop()
                raise SandboxError(f"the sandbox setup code failed: {(reply.get('error') or reply['stopped'])[-500:]}")

    def _worker_config(self) -> dict:
        host = self.host and {"factory": self.host.factory, "args": list(self.host.args), "name": self.host.name}
        return {"memory_mb": self.limits.memory_mb, "max_processes": self.limits.max_processes,
                "max_file_mb": self.limits.max_file_mb, "max_output_chars": self.limits.max_output_chars,
                "recursion_limit": self.limits.recursion_limit, "preload": list(self.preload), "host": host,
                "isolation": self.isolation, "home": os.path.expanduser("~")}

    def _worker_environment(self) -> dict:
        """A minimal environment: none of the trainer's variables (tokens, keys) reach the sandbox."""
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.scratch, "TMPDIR": self.scratch,
                "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}

    def _restart(self) -> None:
        self._stop()
        self.restarts += 1
        self._start()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            pid = process.pid
            with _ignored_os_errors():
                os.killpg(pid, signal.SIGKILL)  # the harness (and, with Python-level isolation, its group)
            if self._interpreter_pid is not None:
                with _ignored_os_errors():  # the pid namespace's init: the kernel kills every process under it
                    os.kill(self._interpreter_pid, signal.SIGKILL)
            with _ignored_os_errors():
                process.wait(timeout=5)
        for fd in (getattr(self, "_request_write", None), getattr(self, "_reply_read", None)):
            if fd is not None:
                with _ignored_os_errors():
                    os.close(fd)
        self._request_write = self._reply_read = None
        if getattr(self, "scratch", None):
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _exit_description(self) -> str:
        if self._process is None:
            return "closed"
        try:
            code = self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "not answering"
        return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"

    # ---- protocol -----------------------------------------------------------------------------------------------

    def _send(self, request: dict, timeout: float) -> dict:
        payload = (json.dumps(request) + "\n").encode()
        view = memoryview(payload)
        while view:
            written = os.write(self._request_write, view)
            view = view[written:]
        return self._read_reply(timeout)

    def _read_reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._reply_read], [], [], remaining)
            if not ready:
                raise TimeoutError
            chunk = os.read(self._reply_read, 1 << 16)
            if not chunk:
                raise EOFError("no reply")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


class _ignored_os_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (OSError, subprocess.TimeoutExpired))

