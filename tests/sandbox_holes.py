"""Hostile cells against the sandbox's three walls, run by tests/test_sandbox.py as root and as a plain user.

`python tests/sandbox_holes.py [--as-plain-user] CHECK` runs one check and exits 0 when the wall held (it prints
what it saw either way). `--as-plain-user` (as root) first becomes `nobody`, like `setpriv --reuid`, making this
Python reachable if it lives in a folder only root can enter (e.g. pyenv under /root) by covering that folder, in a
private mount namespace, as the sandbox itself does.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jaxagent.envs import sandbox_isolation
from jaxagent.envs.apptown.env import AppTownEnv
from jaxagent.envs.apptown.tasks import split_tasks
from jaxagent.envs.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(cell_timeout_s=5.0, memory_mb=512, max_processes=8)
SECRET = "TOPSECRET-" + "".join(random.choices("abcdef0123456789", k=12))

# Writes a forged reply on every descriptor the cell can reach: once with a made-up id, once with the id of the
# cell's own request (read from the interpreter's frames), each claiming the cell printed FORGED.
FORGE = '''
import gc, json, os, sys
ids = {"made-up"}
frame = sys._getframe()
while frame is not None:
    request = frame.f_locals.get("request")
    if isinstance(request, dict) and "id" in request:
        ids.add(request["id"])
    frame = frame.f_back
for fd in range(64):
    for cell_id in ids:
        line = json.dumps({"id": cell_id, "output": "FORGED", "error": None, "ready": True}) + "\\n"
        try:
            os.write(fd, line.encode())
        except OSError:
            pass
print("tried", len(ids), "ids")
'''


def check_forged_replies() -> str | None:
    with Sandbox(LIMITS) as box:
        box.run(FORGE)
        answers = [box.run(f"print({k})").text for k in range(3)]
    if answers != ["0", "1", "2"]:
        return f"the cells after a forging cell answered {answers}"
    env = AppTownEnv(split_tasks("train")[0], limits=LIMITS)
    env.reset()
    before = env._state()
    hostile = ("for name in ('__apptown_world', '_world', 'world'):\n    print(name, name in globals())\n"
               "print(getattr(apis.supervisor, '_world', 'no world'))\n" + FORGE)
    print(env.run_cell(hostile))
    after, completed = env._state(), env.completed()
    env.close()
    if after != before or completed is not None:
        return f"a hostile cell changed the world the tests read: {after} (completed: {completed})"
    return None


def check_private_files() -> str | None:
    private = tempfile.mkdtemp(prefix="jaxagent-private-")
    # A home folder outside the usual places: the sandbox hides whatever $HOME the trainer has.
    home = tempfile.mkdtemp(prefix="jaxagent-home-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    paths = [os.path.join(private, "token"), os.path.join(home, ".netrc")]
    for path in paths:
        with open(path, "w") as handle:
            handle.write(SECRET)
        os.chmod(path, 0o600)
    os.environ["HOME"] = home  # the trainer user's home folder, as the sandbox is told
    try:
        with Sandbox(LIMITS) as box:
            reads = [box.run(f"print(open({path!r}).read())").text for path in paths]
            listing = box.run("import os\nprint({d: os.listdir(d) for d in ('/home', '/root', '/tmp') "
                              "if os.path.isdir(d)})").text
    finally:
        for folder in (private, home):
            shutil.rmtree(folder, ignore_errors=True)
    print(reads, listing)
    if any(SECRET in text for text in reads):
        return f"a private file was readable inside the sandbox: {reads}"
    return None


def check_descendants_die() -> str | None:
    marker = f"{random.randint(10**6, 10**7)}.5"
    cell = (f"import os, subprocess, time\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
            f"if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '{marker}'])\ntime.sleep(0.5)")
    box = Sandbox(LIMITS)
    print(box.run(cell).text)
    alive = _processes_with(marker)
    box.close()
    deadline = time.monotonic() + 5.0
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _processes_with(marker)
    if len(alive) != 2:
        return f"the cell did not start its two detached processes (found {alive})"
    return f"processes outlived the sandbox: {left}" if left else None


def check_environment() -> str | None:
    name = "JAXAGENT_TEST_SECRET"
    if os.environ.get(name) != SECRET_FROM_PARENT:
        return f"run this check with {name} exported"
    cell = ("import os\nseen = dict(os.environ)\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
            "        try:\n            seen[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')\n"
            "        except OSError:\n            pass\nprint(seen)")
    with Sandbox(LIMITS) as box:
        text = box.run(cell).text
    print(text)
    return f"{name} is visible inside the sandbox" if SECRET_FROM_PARENT in text else None


SECRET_FROM_PARENT = "hunter2-exported-before-start"
CHECKS = {"forged_replies": check_forged_replies, "private_files": check_private_files,
          "descendants_die": check_descendants_die, "environment": check_environment}


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


PLAIN_USER = 65534


def become_plain_user() -> None:
    # The interpreter, the virtual environment and this checkout may sit under a folder only root can enter (a
    # fresh clone in a 0700 temporary folder): cover such folders and mount those three back, so the plain user
    # reaches them as it would in its own checkout.
    needed = tuple(os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, Path(__file__).resolve().parents[1]))
    closed = sorted({blocked for path in needed if (blocked := sandbox_isolation.closed_ancestor(path))})
    # A needed folder that is itself closed (the clone's own 0700 folder) would come back closed: open it instead.
    closed_needed = [path for path in needed if not os.stat(path).st_mode & 0o001]
    if closed or closed_needed:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(sandbox_isolation.CLONE_NEWNS) or libc.mount(
                None, b"/", None, sandbox_isolation.MS_REC | sandbox_isolation.MS_PRIVATE, None):
            raise OSError(ctypes.get_errno(), "a private mount namespace")
        outer = [c for c in closed if c not in closed_needed
                 and not any(c != other and c.startswith(other + os.sep) for other in closed)]
        sandbox_isolation.hide_folders(outer, needed)
        for path in closed_needed:
            open_folder(libc, path)
    os.setgroups([])
    os.setgid(PLAIN_USER)
    os.setuid(PLAIN_USER)


def open_folder(libc, path: str) -> None:
    """Covers `path` with a tmpfs anyone may enter and binds each of its entries back, so others reach what the
    entries' own modes allow (only in this process's mount namespace)."""
    original = os.open(path, os.O_PATH | os.O_DIRECTORY)
    entries = os.listdir(f"/proc/self/fd/{original}")
    if libc.mount(b"none", path.encode(), b"tmpfs", sandbox_isolation.MS_NOSUID, b"mode=755,size=1m"):
        raise OSError(ctypes.get_errno(), f"cover {path}")
    for name in entries:
        source, target = f"/proc/self/fd/{original}/{name}", os.path.join(path, name)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        if os.path.isdir(source):
            os.mkdir(target)
        else:
            Path(target).touch()
        if libc.mount(source.encode(), target.encode(), None, sandbox_isolation.MS_BIND | sandbox_isolation.MS_REC,
                      None):
            raise OSError(ctypes.get_errno(), f"bind {target}")
    os.close(original)


if __name__ == "__main__":
    if sys.argv[1] == "--as-plain-user":
        become_plain_user()
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[2:]])
    failure = CHECKS[sys.argv[1]]()
    print(json.dumps({"check": sys.argv[1], "uid": os.getuid(), "failure": failure}))
    sys.exit(1 if failure else 0)
