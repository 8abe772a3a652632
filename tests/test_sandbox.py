"""Hostile cells end with an error result; the trainer survives; the next cell and the next episode run."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from jaxagent.envs.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(cell_timeout_s=3.0, memory_mb=512, max_processes=8)


@pytest.fixture()
def sandbox():
    box = Sandbox(LIMITS, setup_code="counter = 0")
    yield box
    box.close()


def test_cells_share_state_and_errors_are_tracebacks(sandbox):
    assert sandbox.run("counter += 1\nprint(counter)").text == "1"
    result = sandbox.run("undefined_name")
    assert result.error.startswith("Traceback") and "NameError" in result.error and not result.restarted
    assert sandbox.run("counter += 1\nprint(counter)").text == "2"


def _survives(sandbox):
    """The trainer is alive (we are running) and the sandbox answers the next cell."""
    assert sandbox.run("print('alive')").text == "alive"


def test_infinite_loop_is_stopped_and_the_interpreter_replaced(sandbox):
    result = sandbox.run("while True:\n    pass")
    assert result.restarted and "TimeoutError: the cell ran longer than 3 s" in result.error
    assert sandbox.run("print(counter)").text == "0"  # setup ran again in the new interpreter
    _survives(sandbox)


def test_fork_loop_hits_the_process_limit(sandbox):
    result = sandbox.run("import os\nwhile True:\n    os.fork()")
    assert "BlockingIOError" in result.text or result.restarted
    _survives(sandbox)


def test_huge_allocation_fails_with_memory_error(sandbox):
    result = sandbox.run("block = bytearray(50 * 2**30)")
    assert "MemoryError" in result.text
    _survives(sandbox)


def test_writing_outside_the_scratch_directory_is_refused(sandbox, tmp_path):
    target = tmp_path / "escaped.txt"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('x')")
    assert result.error and ("Read-only file system" in result.error or "Permission" in result.error)
    assert not target.exists()
    assert "/tmp" not in sandbox.run("import tempfile; print(tempfile.gettempdir())").text.replace(
        sandbox.scratch, "")  # temporary files land in the scratch directory
    assert sandbox.run("open('inside.txt', 'w').write('ok'); print(open('inside.txt').read())").text == "ok"


def test_sockets_cannot_reach_anything():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(4)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)))
    thread.start()
    with Sandbox(LIMITS) as box:
        port = server.getsockname()[1]
        result = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert result.error and ("unreachable" in result.error or "refused" in result.error.lower()
                                 or "PermissionError" in result.error)
    thread.join()
    server.close()
    assert accepted == [None]


def _accept(server):
    try:
        connection, _ = server.accept()
        connection.close()
        return "connected"
    except OSError:
        return None


def test_os_exit_restarts_the_interpreter(sandbox):
    result = sandbox.run("import os\nos._exit(7)")
    assert result.restarted and "exit code 7" in result.error
    _survives(sandbox)


def test_deep_recursion_is_an_error_not_a_crash_of_the_trainer(sandbox):
    assert "RecursionError" in sandbox.run("def f(n):\n    return f(n + 1)\nf(0)").text
    result = sandbox.run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert result.error  # a C stack overflow kills the interpreter: reported, then replaced
    _survives(sandbox)


def test_the_trainers_environment_is_invisible(sandbox, monkeypatch):
    monkeypatch.setenv("JAXAGENT_TEST_SECRET", "hunter2")
    box = Sandbox(LIMITS)
    try:
        assert box.run("import os\nprint(os.environ.get('JAXAGENT_TEST_SECRET'))").text == "None"
        result = box.run(f"print(open('/proc/{os.getpid()}/environ').read())")
        assert "hunter2" not in result.text and result.error
    finally:
        box.close()


def test_next_episode_runs_after_a_hostile_one():
    with Sandbox(LIMITS) as first:
        first.run("import os\nos._exit(1)")
    with Sandbox(LIMITS) as second:
        assert second.run("print(6 * 7)").text == "42"


def test_close_removes_the_scratch_directory():
    box = Sandbox(LIMITS)
    scratch = box.scratch
    box.run("open('f.txt', 'w').write('x')")
    box.close()
    assert not os.path.exists(scratch)

