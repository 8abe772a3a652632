"""Run model-written Python outside the trainer: one persistent, isolated interpreter per episode.

`Sandbox.run(code)` executes a cell in the episode's interpreter and returns its output or its error. Four kinds
of process are involved: the trainer (this module), its launcher (`sandbox_launcher`, one per trainer process, which
forks a harness for each sandbox: far cheaper than starting a Python process per episode), the harness
(`sandbox_worker`, trusted code that frames every reply the trainer reads) and the interpreter it starts
(`sandbox_interpreter`, the only process that runs agent code, walled in as `sandbox_isolation` describes: no
network, its own pid namespace, a read-only filesystem with private folders hidden, resource limits). None of them
sees the trainer's environment variables.

A cell that hangs, crashes the interpreter or exits it gets an error result; the sandbox is replaced (its
variables are lost, and `setup_code` runs again) and the episode goes on. The trainer never waits longer than the
cell timeout and never runs agent code itself. An environment can have the harness serve an object to the agent
(`host`): the agent calls its methods through a proxy, and the trainer reads its state with `report()`, which the
interpreter cannot answer or forge.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from jaxagent import choices
from jaxagent.errors import check_choice

log = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """The sandbox could not start an interpreter at all."""


class LauncherGone(SandboxError):
    """The launcher died or stopped answering (the next request starts a new one)."""


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


def minimal_environment() -> dict:
    """The sandbox processes' whole environment: none of the trainer's variables (tokens, keys) reach them. HOME and
    TMPDIR lead nowhere; the launcher points a harness's at its scratch directory."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "TMPDIR": "/nonexistent", "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


class Launcher:
    """The trainer process's connection to its launcher (`sandbox_launcher`), started on first use and again if it
    died or stopped answering; every thread's sandboxes share it, one request at a time."""

    ANSWER_TIMEOUT_S = 30.0  # its slowest answer (reaping a SIGKILLed harness) takes at most 5 s
    EXIT_TIMEOUT_S = 10.0  # at the trainer's exit, for stopping sandboxes left open (2 s grace, then SIGKILL + reap)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._channel: socket.socket | None = None
        os.register_at_fork(after_in_child=self._reset_in_child)
        atexit.register(self._forget, let_it_clean_up=True)  # the trainer ends: so does its launcher

    def start(self, scratch_root: str, pipes: tuple[int, int], config: dict, environment: dict) -> tuple[int, str]:
        """Fork a harness for a new sandbox (its pipes from and to the trainer) in a new scratch directory under
        `scratch_root`; returns the harness's pid and the directory."""
        answer = self._ask({"start": config, "scratch_root": scratch_root, "env": environment}, pipes)
        if "pid" not in answer:
            raise SandboxError(f"the sandbox launcher could not start a harness: {answer.get('error')}")
        return int(answer["pid"]), answer["scratch"]

    def stop(self, pid: int) -> None:
        """SIGKILL a harness's process group and reap it."""
        try:
            self._ask({"stop": pid})
        except SandboxError:  # the launcher is gone: its harnesses were handed to init, which reaps them
            with _ignored_os_errors():
                os.killpg(pid, signal.SIGKILL)

    def wait(self, pid: int, timeout: float) -> str | None:
        """How a harness ended ("exit code N", "killed by signal N"), or None if it still runs after `timeout`."""
        try:
            return self._ask({"wait": pid, "timeout": timeout})["status"]
        except SandboxError:
            return None

    def _ask(self, request: dict, fds: tuple[int, ...] = ()) -> dict:
        """Send `request` (with `fds`), return the answer; raises LauncherGone, leaving the next request a new one."""
        message = json.dumps(request).encode()
        with self._lock:
            channel = self._channel or self._spawn()
            try:
                socket.send_fds(channel, [message], list(fds))
                answer = channel.recv(1 << 20)  # b"" once it died; OSError after ANSWER_TIMEOUT_S
            except OSError as err:
                if err.errno == errno.EMSGSIZE:  # the request, not the launcher, is at fault
                    raise SandboxError(f"a sandbox's settings take {len(message)} bytes of JSON, more than one "
                                       "message to the launcher holds (the socket buffer, about 200 KB): pass the "
                                       "host less") from None
                answer = b""
            if not answer:
                self._forget()
                raise LauncherGone("the sandbox launcher stopped answering")
            return json.loads(answer)

    def _spawn(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-m", "jaxagent.envs.sandbox_launcher", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=minimal_environment(), cwd="/", pass_fds=(theirs.fileno(),),
                start_new_session=True, close_fds=True)
        except OSError as err:
            ours.close()
            raise SandboxError(f"cannot start the sandbox launcher ({err})") from None
        finally:
            theirs.close()
        ours.settimeout(self.ANSWER_TIMEOUT_S)
        self._channel = ours
        return ours

    def _reset_in_child(self) -> None:
        """A forked trainer starts a launcher of its own (the parent's may be mid-request on another thread)."""
        self._lock, self._process = threading.Lock(), None
        if self._channel is not None:
            self._channel.close()  # this copy only: the parent's launcher goes on serving the parent
            self._channel = None

    def _forget(self, let_it_clean_up: bool = False) -> None:
        """Drop this launcher. At the trainer's exit it may stop the sandboxes left open and remove their scratch
        directories before it exits; one that stopped answering is killed before its socket closes, so it never
        touches the sandboxes still in use (their harnesses talk to the trainer directly)."""
        channel, process, self._channel, self._process = self._channel, self._process, None, None
        if process is not None and not let_it_clean_up:
            _kill(process)
        if channel is not None:
            channel.close()
        if process is not None and let_it_clean_up:
            try:
                process.wait(timeout=self.EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill(process)


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the launcher, only its own session: the harnesses it forked have theirs."""
    with _ignored_os_errors():
        process.kill()
        process.wait(timeout=5)


LAUNCHER = Launcher()


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
        self._harness: int | None = None  # the harness's pid (a child of the launcher)
        self._start()

    # ---- public API ---------------------------------------------------------------------------------------------

    def run(self, code: str) -> CellResult:
        """Execute `code` in the episode's namespace."""
        if self._harness is None:
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
        if self._harness is None:
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
        self.scratch = None  # the launcher creates it (and removes it if this trainer dies)
        self._interpreter_pid = None
        try:
            try:
                self._fork_harness()
            except LauncherGone:  # it may have forked a harness on these pipes: a new launcher gets new ones
                self._close_pipes()  # (that harness, if any, reads the end of its requests and exits)
                self._fork_harness()
        except SandboxError:
            self._stop()
            raise
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

    def _fork_harness(self) -> None:
        """Have the launcher fork this sandbox's harness, on a new pair of pipes from and to the trainer."""
        request_read, self._request_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        try:
            # The trainer's temporary folder, not the launcher's (which runs with the minimal environment).
            root = os.path.abspath(self.scratch_root or tempfile.gettempdir())
            self._harness, self.scratch = LAUNCHER.start(root, (request_read, reply_write), self._worker_config(),
                                                         minimal_environment())
        finally:  # the harness holds them now
            os.close(request_read)
            os.close(reply_write)

    def _worker_config(self) -> dict:
        host = self.host and {"factory": self.host.factory, "args": list(self.host.args), "name": self.host.name}
        return {"memory_mb": self.limits.memory_mb, "max_processes": self.limits.max_processes,
                "max_file_mb": self.limits.max_file_mb, "max_output_chars": self.limits.max_output_chars,
                "recursion_limit": self.limits.recursion_limit, "preload": list(self.preload), "host": host,
                "isolation": self.isolation, "home": os.path.expanduser("~")}

    def _restart(self) -> None:
        self._stop()
        self.restarts += 1
        self._start()

    def _stop(self) -> None:
        harness, self._harness = self._harness, None
        if harness is not None:
            LAUNCHER.stop(harness)  # SIGKILLs the harness (and, with Python-level isolation, its group), reaps it
            if self._interpreter_pid is not None:
                with _ignored_os_errors():  # the pid namespace's init: the kernel kills every process under it
                    os.kill(self._interpreter_pid, signal.SIGKILL)
        self._close_pipes()
        if getattr(self, "scratch", None):
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _close_pipes(self) -> None:
        for fd in (getattr(self, "_request_write", None), getattr(self, "_reply_read", None)):
            if fd is not None:
                with _ignored_os_errors():
                    os.close(fd)
        self._request_write = self._reply_read = None

    def _exit_description(self) -> str:
        if self._harness is None:
            return "closed"
        return LAUNCHER.wait(self._harness, 1.0) or "not answering"

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

