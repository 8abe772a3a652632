"""How a sandbox walls in the code it runs: kernel namespaces, hidden private folders, privileges and limits.

The harness (`sandbox_worker`) calls `enter_namespaces` before it starts the interpreter; the interpreter's init
process calls `mount_own_proc`, and the interpreter calls `drop_privileges` and `apply_limits` before its first cell.
With `isolation: namespaces` (the default) the interpreter gets:

* a network namespace with no interface up: no connection leaves the sandbox;
* a pid namespace whose init is the harness's child: when the interpreter exits or is killed, the kernel kills every
  process it started, including those that left its session (`setsid`); its /proc shows only the sandbox's processes;
* a mount namespace in which every mount is read-only except the scratch directory, and the private folders
  (`PRIVATE_PATHS` and the trainer's $HOME) are replaced by empty read-only filesystems; Python's own library
  directories that live there are mounted back, read-only, at their usual paths;
* as root, a user of its own (uid `UID_BASE` + the harness's pid), so the process limit counts only its processes;
  as any other user, the root of a nested user namespace in which every mount above is locked (it cannot unmount
  the hiding filesystems or make a mount writable again);
* resource limits: address space, process count, file size, no core dumps.

`isolation: python` (only when the kernel refuses namespaces, and only if the user asks for it) keeps the limits but
replaces the namespaces with Python-level guards that hostile code can undo: refused sockets and refused writes
outside the scratch directory. Processes it starts may outlive the episode, and it sees the user's files.
"""

from __future__ import annotations

import builtins
import ctypes
import os
import resource

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x40000000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
UID_BASE = 100000
# Where users keep what agent code must not read (keys, tokens, other projects' data); /tmp and /var/tmp because
# other programs leave private sockets and files there.
PRIVATE_PATHS = ("/home", "/root", "/run/user", "/tmp", "/var/tmp", "/mnt", "/media")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


# ---- the harness: namespaces and the filesystem view ----------------------------------------------------------------


def enter_namespaces(scratch: str, private: tuple[str, ...], keep: tuple[str, ...]) -> None:
    """Unshare network, mounts and pids (and the user, when not root); hide `private`, keeping `keep` visible.

    Raises OSError when the kernel refuses. The pid namespace applies to the caller's next child, the init.
    """
    libc = _libc()
    scratch = os.path.realpath(scratch)
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)), "unshare")
    if not root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    hide_folders(_hidden_roots(private, keep + (scratch,), root), keep + (scratch,))
    if not any(_under(point, scratch) for point, _ in _mount_points()):
        _check(libc.mount(scratch.encode(), scratch.encode(), None, MS_BIND | MS_REC, None), "bind scratch")
    _make_read_only(libc, scratch)


def hide_folders(folders: list[str], keep: tuple[str, ...]) -> None:
    """Cover each folder with an empty tmpfs, then mount back, at their own paths, the directories in `keep` that
    it covered (needs a private mount namespace and the right to mount in it)."""
    libc = _libc()
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in _kept_under(folders, keep)}
    for path in folders:
        _check(libc.mount(b"none", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"),
               f"hide {path}")
    for path, fd in kept.items():
        os.makedirs(path, 0o755, exist_ok=True)
        _check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None),
               f"keep {path}")
        os.close(fd)


def _hidden_roots(private: tuple[str, ...], needed: tuple[str, ...], root: bool) -> list[str]:
    """Existing private folders, outermost only; as root, also the outermost folder others cannot enter above a
    needed path (the sandbox's own user could not reach the path through it)."""
    candidates = [os.path.realpath(p) for p in private if p and os.path.isdir(p)]
    if root:
        candidates += [blocked for path in needed if (blocked := closed_ancestor(path))]
    outermost = []
    for path in sorted(set(candidates), key=len):
        if path != "/" and not any(_under(path, kept) for kept in outermost):
            outermost.append(path)
    return outermost


def closed_ancestor(path: str) -> str | None:
    """The outermost ancestor of `path` that users other than its owner cannot enter, if any."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for k in range(1, len(parts)):
        ancestor = os.sep + os.path.join(*parts[:k])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _kept_under(hidden: list[str], needed: tuple[str, ...]) -> list[str]:
    """The needed directories that a hidden folder would cover, outermost only."""
    covered = sorted({os.path.realpath(p) for p in needed if os.path.isdir(p)
                      and any(_under(os.path.realpath(p), h) for h in hidden)}, key=len)
    outermost = []
    for path in covered:
        if not any(_under(path, kept) for kept in outermost):
            outermost.append(path)
    return outermost


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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


def _make_read_only(libc, scratch: str) -> None:
    for point, flags in _mount_points():
        if _under(point, scratch) or _under(point, "/proc") or _under(point, "/sys"):
            continue
        libc.mount(None, point.encode(), None, flags | MS_REMOUNT | MS_BIND | MS_RDONLY, None)  # best effort
    probe = os.path.join("/", f".jaxagent-sandbox-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
    except OSError:
        return
    os.unlink(probe)
    raise OSError("the root filesystem is still writable after remounting")


# ---- the init: its own /proc ----------------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (the harness, if it is killed before it can clean up)."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "set the parent-death signal")
    # A parent outside the caller's pid namespace shows as 0; the trainer also kills the init by pid when it stops.
    if os.getppid() not in (parent_pid, 0):
        os._exit(1)  # the parent died before the signal was armed


def mount_own_proc() -> None:
    """Mount a /proc that shows the pid namespace's processes only (the trainer's are not listed)."""
    _check(_libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")


# ---- the interpreter: privileges and limits -------------------------------------------------------------------------


def drop_privileges(sandbox_uid: int | None) -> None:
    """Become `sandbox_uid` (root's sandboxes: no capabilities left), or, when the harness made a user namespace
    (None), lock the mounts in a nested one."""
    if sandbox_uid is not None:
        os.setgroups([])
        os.setgid(sandbox_uid)
        os.setuid(sandbox_uid)
        return
    # Mounts inherited by a less privileged mount namespace are locked: the hiding filesystems cannot be removed
    # and read-only mounts cannot be made writable, although the interpreter is root of its own namespace.
    _check(_libc().unshare(CLONE_NEWUSER | CLONE_NEWNS), "lock mounts")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", "0 0 1")
    _write("/proc/self/gid_map", "0 0 1")


def uid_is_mapped(uid: int) -> bool:
    """Whether `uid` exists in this user namespace (a rootless container maps only a range)."""
    with open("/proc/self/uid_map") as handle:
        for line in handle:
            inside, _, count = (int(field) for field in line.split())
            if inside <= uid < inside + count:
                return True
    return False


def apply_limits(memory_mb: int, max_processes: int, max_file_mb: int) -> None:
    """Resource limits. RLIMIT_NPROC counts every task (process or thread) of the real user that this process can
    see, so the allowance is added to what already runs: the init and this interpreter in a namespace sandbox, the
    trainer's tasks in a Python-level one."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_mb << 20, max_file_mb << 20))
    limit = tasks_of(os.getuid()) + max_processes
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


def python_level_guards(scratch: str) -> None:
    """The weaker isolation: refuse sockets and writes outside the scratch directory (hostile code can undo this)."""
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
