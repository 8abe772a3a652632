"""The sandboxed interpreter: runs model-written Python cells, one persistent namespace per episode.

Started by `jaxagent.envs.sandbox.Sandbox` as `python -I -m jaxagent.envs.sandbox_worker SCRATCH REQ_FD RESP_FD`
with a minimal environment. Before it runs any cell it isolates itself:

* new network namespace (no interface is up: no connection leaves the process tree);
* new mount namespace in which every mount is read-only except the scratch directory (so nothing outside it can
  be written, /tmp included; TMPDIR points into the scratch directory);
* as root, it becomes a user of its own (uid 100000 + pid) so the process-count limit applies and the trainer's
  /proc entries are unreadable; otherwise it maps itself to root of a new user namespace;
* resource limits: address space, process count, file size, no core dumps.

If the kernel refuses namespaces, it falls back to Python-level guards (sockets refused, writes outside the scratch
directory refused) and says so in its handshake. Requests and replies are JSON lines on two dedicated pipe fds;
fds 0-2 point at /dev/null, so a cell writing to them cannot corrupt the protocol.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import io
import json
import os
import resource
import sys
import traceback

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
UID_BASE = 100000


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags that must be kept when remounting) from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            flags = 0
            for option in fields[5].split(","):
                flags |= _OPTION_FLAGS.get(option, 0)
            points.append((point, flags))
    return points


def _isolate_namespaces(scratch: str) -> str:
    libc = _libc()
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)), "unshare")
    if not root:
        with open("/proc/self/setgroups", "w") as handle:
            handle.write("deny")
        with open("/proc/self/uid_map", "w") as handle:
            handle.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as handle:
            handle.write(f"0 {gid} 1")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    _check(libc.mount(scratch.encode(), scratch.encode(), None, MS_BIND | MS_REC, None), "bind scratch")
    if root:
        _expose_python(scratch, libc)
    for point, flags in _mount_points():
        if point == scratch or point.startswith((scratch + "/", "/proc", "/sys")):
            continue
        flags |= MS_REMOUNT | MS_BIND | MS_RDONLY
        libc.mount(None, point.encode(), None, flags, None)  # best effort: a mount we cannot touch stays as is
    probe = os.path.join("/", f".jaxagent-sandbox-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
        raise OSError("the root filesystem is still writable after remounting")
    except OSError as err:
        if "still writable" in str(err):
            raise
    if root:
        sandbox_uid = UID_BASE + os.getpid()
        os.chown(scratch, sandbox_uid, sandbox_uid)
        os.setgroups([])
        os.setgid(sandbox_uid)
        os.setuid(sandbox_uid)
    return "namespaces"


def _others_can_read(path: str) -> bool:
    """Whether a user who owns nothing can list `path` (every ancestor searchable, the directory readable)."""
    current = os.path.abspath(path)
    if not os.stat(current).st_mode & 0o005 == 0o005:
        return False
    while current != "/":
        current = os.path.dirname(current)
        if not os.stat(current).st_mode & 0o001:
            return False
    return True


def _expose_python(scratch: str, libc) -> None:
    """Make the interpreter's own library readable after the switch to an unprivileged user.

    Python may live under a directory only root can enter (e.g. /root/.pyenv); such import directories are
    bind-mounted read-only inside the scratch directory and sys.path points there, so `import socket` and friends
    still work while the rest of that tree stays out of reach.
    """
    exposed = os.path.join(scratch, ".python")
    os.mkdir(exposed, 0o755)
    moved: dict[str, str] = {}
    for k, entry in enumerate(list(sys.path)):
        if not os.path.isdir(entry) or _others_can_read(entry):
            continue
        target = os.path.join(exposed, str(k))
        os.mkdir(target, 0o755)
        _check(libc.mount(entry.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"expose {entry}")
        libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        sys.path[k] = target
        moved[entry] = target
    # Packages imported before the switch (e.g. `encodings`) must find their later submodules in the new place.
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for i, path in enumerate(paths):
                for old, new in moved.items():
                    if path == old or path.startswith(old + os.sep):
                        paths[i] = new + path[len(old):]
    sys.path_importer_cache.clear()


def _isolate_python_level(scratch: str) -> str:
    """Fallback when the kernel refuses namespaces: refuse sockets and writes outside the scratch directory."""
    import socket

    class RefusedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = RefusedSocket
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and isinstance(file, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(file))
            if not path.startswith(scratch + os.sep):
                raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = guarded_open
    return "python-level"


def _limit(memory_mb: int, max_processes: int, max_file_mb: int, tasks_already: int) -> None:
    """Resource limits. RLIMIT_NPROC counts every task (process or thread) of the real user, so a sandbox that
    shares its user with the trainer gets the user's current count plus its own allowance."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_mb << 20, max_file_mb << 20))
    limit = tasks_already + max_processes
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def tasks_of(uid: int) -> int:
    """Processes and threads owned by `uid` (from /proc)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip())
    return count


def _run_cell(code: str, namespace: dict, max_output: int) -> dict:
    buffer = io.StringIO()
    error = None
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except BaseException as exc:  # the cell's failure is the observation, whatever it is
            lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            # Drop this file's frame: the agent should see its own code's traceback only.
            error = "".join(line for line in lines if "sandbox_worker.py" not in line)[-4000:]
    output = buffer.getvalue()
    if len(output) > max_output:
        output = output[:max_output] + f"\n[output truncated at {max_output} characters]"
    return {"output": output, "error": error}


def main() -> None:
    """Isolate, then answer requests until the pipe closes."""
    scratch, request_fd, reply_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = json.loads(sys.argv[4])
    requests = os.fdopen(request_fd, "r", encoding="utf-8")
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    my_pid = os.getpid()
    # Modules the setup code needs are imported while their files are still readable: after the switch to the
    # sandbox's own user, a checkout in a private directory (e.g. mktemp -d) could no longer be entered.
    for module in config.get("preload", ()):
        __import__(module)
    # As root the sandbox becomes a user of its own (counted from 1); otherwise it shares the trainer's user.
    tasks_already = 1 if os.geteuid() == 0 else tasks_of(os.getuid())
    try:
        isolation = _isolate_namespaces(scratch)
    except OSError as err:
        isolation = _isolate_python_level(scratch) + f" (namespaces unavailable: {err})"
        tasks_already = tasks_of(os.getuid())
    os.chdir(scratch)
    _limit(config["memory_mb"], config["max_processes"], config["max_file_mb"], tasks_already)
    sys.setrecursionlimit(config.get("recursion_limit", 3000))
    replies.write(json.dumps({"ready": True, "isolation": isolation}) + "\n")
    replies.flush()
    namespace: dict = {"__name__": "__main__"}
    for line in requests:
        request = json.loads(line)
        reply = _run_cell(request["code"], namespace, config["max_output_chars"])
        if os.getpid() != my_pid:  # a forked child of a cell must never answer for the interpreter
            os._exit(0)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
