"""Hostile cells end with an error result, stopped by the wall named; the trainer survives; the next cell runs.

The three walls that guard the trainer's own data (replies the harness frames, private folders hidden, every
process dying with the sandbox) and the trainer's environment are checked by tests/sandbox_holes.py, run here as
root and as a plain user.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from jaxagent.envs.sandbox import LAUNCHER, HostSpec, Sandbox, SandboxError, SandboxLimits

LIMITS = SandboxLimits(cell_timeout_s=3.0, memory_mb=512, max_processes=8)
HOLES = Path(__file__).with_name("sandbox_holes.py")
PLAIN_USER = 65534  # nobody: sandbox_holes.py --as-plain-user


@pytest.fixture()
def sandbox():
    box = Sandbox(LIMITS, setup_code="counter = 0")
    yield box
    box.close()


def test_the_isolation_in_use_is_the_kernels(sandbox):
    assert sandbox.isolation == "namespaces"
    pids = sandbox.run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))").text
    assert pids == "[1, 2]"  # the init and the interpreter: the trainer's processes are not even listed


def test_cells_share_state_and_errors_are_tracebacks(sandbox):
    assert sandbox.run("counter += 1\nprint(counter)").text == "1"
    result = sandbox.run("undefined_name")
    assert result.error.startswith("Traceback") and "NameError" in result.error and not result.restarted
    assert "sandbox_interpreter" not in result.error
    assert sandbox.run("counter += 1\nprint(counter)").text == "2"


def _survives(sandbox):
    """The trainer is alive (we are running) and the sandbox answers the next cell."""
    assert sandbox.run("print('alive')").text == "alive"


def test_infinite_loop_is_stopped_and_the_interpreter_replaced(sandbox):
    result = sandbox.run("while True:\n    pass")
    assert result.restarted and "TimeoutError: the cell ran longer than 3 s" in result.error
    assert sandbox.run("print(counter)").text == "0"  # setup ran again in the new interpreter
    _survives(sandbox)


def test_fork_loop_is_stopped_by_the_process_limit_not_the_timeout(sandbox):
    # Children sleep rather than fork: without the limit the loop simply finishes its 200 forks.
    cell = ("import os, time\nfor k in range(200):\n    if os.fork() == 0:\n        time.sleep(20)\n"
            "        os._exit(0)\nprint('forked', k + 1)")
    result = sandbox.run(cell)
    assert not result.restarted and "BlockingIOError" in result.text, result.text


def test_allocating_twice_the_memory_limit_fails_with_memory_error(sandbox):
    result = sandbox.run(f"block = bytearray({2 * LIMITS.memory_mb} * 2**20)\nprint(len(block))")
    assert "MemoryError" in result.text and not result.restarted, result.text
    _survives(sandbox)


def test_nothing_outside_the_scratch_directory_can_be_written(sandbox):
    target = Path("/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp") / f"escaped-{uuid.uuid4().hex}"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('x')")
    assert result.error and "Read-only file system" in result.error, result.text
    assert not target.exists()
    assert sandbox.run("import tempfile; print(tempfile.gettempdir())").text == sandbox.scratch
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
        assert result.error and ("unreachable" in result.error or "refused" in result.error.lower())
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


def test_the_launcher_removes_a_stopped_sandboxs_scratch_directory_itself():
    """So a trainer killed between its stop request and its own clean-up leaves nothing behind."""
    box = Sandbox(LIMITS)
    box.run("open('f.txt', 'w').write('x')")
    LAUNCHER.stop(box._harness)
    assert not os.path.exists(box.scratch)
    box.close()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_harnesses_are_forked_by_one_launcher_and_hold_no_way_back_to_it():
    """Each sandbox's harness is forked by the trainer's launcher, not started as a process of its own; it keeps no
    descriptor of the launcher's socket (through which a harness could ask for more sandboxes), nor do the trainer's
    environment variables reach it."""
    first, second = Sandbox(LIMITS), Sandbox(LIMITS)
    try:
        launcher = _parent(first._harness)
        assert _parent(second._harness) == launcher != os.getpid() and _parent(launcher) == os.getpid()
        for box in (first, second):
            links = [os.readlink(f"/proc/{box._harness}/fd/{fd}") for fd in os.listdir(f"/proc/{box._harness}/fd")]
            assert not [link for link in links if link.startswith("socket:")], links
            environ = Path(f"/proc/{box._harness}/environ").read_bytes().split(b"\0")
            assert b"PATH=/usr/local/bin:/usr/bin:/bin" in environ and not any(b"PYTEST" in v for v in environ)
        assert first.run("print(6 * 7)").text == "42"
    finally:
        first.close()
        second.close()


def test_settings_too_large_for_the_launcher_are_refused_with_one_line_and_the_launcher_stays():
    box = Sandbox(LIMITS)
    launcher = _parent(box._harness)
    with pytest.raises(SandboxError, match=r"bytes of JSON, more than one message to the launcher holds"):
        Sandbox(LIMITS, host=HostSpec("json:loads", ("x" * 1_000_000,)))
    fresh = Sandbox(LIMITS)
    assert _parent(fresh._harness) == launcher and fresh.run("print(5)").text == "5"
    box.close()
    fresh.close()


def test_a_killed_launcher_is_replaced_and_its_sandboxes_still_stop():
    box = Sandbox(LIMITS)
    harness, launcher = box._harness, _parent(box._harness)
    os.kill(launcher, signal.SIGKILL)
    _wait_until_ended(launcher)
    assert box.run("print('still here')").text == "still here"  # the harness talks to the trainer directly
    fresh = Sandbox(LIMITS)
    assert fresh.run("print(1)").text == "1" and _parent(fresh._harness) not in (launcher, os.getpid())
    box.close()
    fresh.close()
    _wait_until_ended(harness)


# A trainer that opens a sandbox, has a cell write a file into its scratch directory, reports the directory and the
# harness, and then exits without closing the sandbox, or waits to be killed.
ABANDONING_TRAINER = """
import sys, time
from jaxagent.envs.sandbox import Sandbox, SandboxLimits
box = Sandbox(SandboxLimits(cell_timeout_s=3.0, memory_mb=512, max_processes=8))
box.run("open('left.txt', 'w').write('x')")
print(box.scratch, box._harness, flush=True)
if sys.argv[1] == "killed":
    time.sleep(60)
"""


@pytest.mark.parametrize("end", ["exits", "killed"])
def test_a_trainer_that_ends_without_closing_its_sandbox_leaves_neither_its_scratch_nor_its_harness(end):
    trainer = subprocess.Popen([sys.executable, "-c", ABANDONING_TRAINER, end], stdout=subprocess.PIPE, text=True)
    scratch, harness = trainer.stdout.readline().split()
    assert os.path.exists(os.path.join(scratch, "left.txt"))
    if end == "killed":
        trainer.kill()
    trainer.wait(timeout=30)
    deadline = time.monotonic() + (10 if end == "killed" else 0)  # an exiting trainer waits for the clean-up
    while os.path.exists(scratch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(scratch)
    _wait_until_ended(int(harness))


# A trainer that opens and closes sandboxes on 8 threads at once, under the scratch root it is given, until killed.
CHURNING_TRAINER = """
import sys, threading
from jaxagent.envs.sandbox import Sandbox, SandboxLimits
def churn():
    while True:
        Sandbox(SandboxLimits(cell_timeout_s=3.0, memory_mb=512, max_processes=8), scratch_root=sys.argv[1]).close()
for _ in range(8):
    threading.Thread(target=churn, daemon=True).start()
print("started", flush=True)
threading.Event().wait()
"""


def test_a_trainer_killed_while_its_sandboxes_start_leaves_no_scratch_directory(tmp_path):
    """Every scratch directory is made by the launcher, which outlives the trainer and removes what it made: with
    8 threads starting sandboxes, the trainer is killed while some wait for the launcher (a directory made by the
    trainer before its request would be nobody's to remove)."""
    trainer = subprocess.Popen([sys.executable, "-c", CHURNING_TRAINER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True)
    assert trainer.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:  # several sandboxes starting at once
        time.sleep(0.005)
    trainer.kill()
    trainer.wait(timeout=30)
    deadline = time.monotonic() + 10
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []


def _wait_until_ended(pid: int) -> None:
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(pid)


# ---- the walls that guard the trainer's data, as root and as a plain user ------------------------------------------


USERS = ["root", "plain"] if os.geteuid() == 0 else ["plain"]


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("check", ["forged_replies", "private_files", "descendants_die", "environment"])
def test_a_wall_holds(check, user):
    """Each check's hostile cells fail to get through; the secret variable was exported before any worker ran."""
    environment = {**os.environ, "JAXAGENT_TEST_SECRET": "hunter2-exported-before-start"}
    as_plain_user = ["--as-plain-user"] if user == "plain" and os.geteuid() == 0 else []
    result = subprocess.run([sys.executable, str(HOLES), *as_plain_user, check], env=environment, cwd="/",
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'"uid": {PLAIN_USER if user == "plain" and os.geteuid() == 0 else os.getuid()}' in result.stdout


def test_without_namespaces_the_sandbox_refuses_unless_python_isolation_is_chosen():
    """In a user namespace that may create no further user namespaces (as in some containers), the interpreter
    cannot be walled in: the sandbox refuses with one line naming the setting, and runs when it is given."""
    if os.geteuid() != 0:
        pytest.skip("needs root to build a namespace that refuses nested user namespaces")
    program = ("from jaxagent.envs.sandbox import Sandbox, SandboxError\n"
               "try:\n    Sandbox()\nexcept SandboxError as err:\n    print('refused:', err)\n"
               "box = Sandbox(isolation='python')\nprint('isolation:', box.isolation, box.run('print(6 * 7)').text)\n"
               "box.close()")
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c \"$0\""
    result = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script, program],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    refused, ran = result.stdout.strip().splitlines()
    assert refused.startswith("refused:") and "set isolation: python" in refused and "\n" not in refused
    assert ran == "isolation: python 42"
