"""Host state the sandbox keeps between runs, and what a run leaves behind on the host.

Part of :mod:`scope_opd.verifiers.sandbox` (read its docstring first): the
root-only state directory, the per-run uid leases, the read-only binds of a
contained run, cgroup v2 set-up where the host has it, and the clean-up of a
run's processes and files on hosts without namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .sandbox import SandboxLimits, _Isolation

# 0x70000000 upwards: above the 0x00080000-0x6FFFFFFF container range of
# systemd's UID allocation and far from login users. Each run leases one of
# _UID_SLOTS uids by flock, so concurrent runs (threads or worker processes)
# never share one.
_RANDOM_UID_BASE = 0x70000000
_UID_SLOTS = 4096
_NOBODY_UID = 65534
_MINIMAL_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # Numeric libraries otherwise start one thread per core, each counted by RLIMIT_NPROC.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_MIB = 1024 * 1024
# Directories anyone may write to on a host without a mount namespace, cleaned of the run's files afterwards.
_WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# What the interpreter needs, bound read-only into a contained run (missing ones are skipped).
_SYSTEM_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache", "/etc/localtime")


class SandboxUnavailable(RuntimeError):
    """This host offers no way to run untrusted code with the required containment."""


# ------------------------------------------------------------------ host state shared by runs


_state_lock = threading.Lock()
_state_dir_cache: Path | None = None
_retired_uids: set[int] = set()


def _state_dir() -> Path:
    """Root-only directory holding the uid lease files and the contained runs' root mount point.

    /run is RAM and per boot; created once, checked each time (an attacker-made
    symlink or foreign owner is refused).
    """
    global _state_dir_cache
    with _state_lock:
        if _state_dir_cache is None:
            base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
            path = base / f"scope-sandbox-{os.geteuid()}"
            path.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise SandboxUnavailable(f"{path} is not a private directory of uid {os.geteuid()}; remove it")
            (path / "root").mkdir(mode=0o755, exist_ok=True)
            _state_dir_cache = path
        return _state_dir_cache


@contextlib.contextmanager
def _uid_lease(isolation: _Isolation) -> Iterator[int | None]:
    """The uid a run uses, held for the whole run: with random uids, one no other run
    (thread or process) holds, by an exclusive flock on its lease file."""
    if isolation.privilege_drop is None:
        yield None
        return
    if not isolation.random_uids:
        yield _NOBODY_UID
        return
    lease_dir = _state_dir() / "uids"
    lease_dir.mkdir(mode=0o700, exist_ok=True)
    first = secrets.randbelow(_UID_SLOTS)
    for step in range(_UID_SLOTS):
        slot = (first + step) % _UID_SLOTS
        if _RANDOM_UID_BASE + slot in _retired_uids:
            continue
        fd = os.open(lease_dir / str(slot), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield _RANDOM_UID_BASE + slot
        finally:
            os.close(fd)  # releases the lease
        return
    raise SandboxUnavailable(f"all {_UID_SLOTS} sandbox uids are in use")


_binds_cache: dict[str, list[str]] = {}


def _binds(python: str) -> list[str]:
    """Host paths a contained run sees read-only: the system's and the interpreter's own prefix."""
    with _state_lock:
        if python not in _binds_cache:
            completed = subprocess.run(
                [python, "-I", "-S", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                capture_output=True, text=True, timeout=30, check=True, env=_MINIMAL_ENV,
            )
            wanted = [*_SYSTEM_BINDS, *completed.stdout.split(), os.path.dirname(os.path.realpath(python))]
            binds: list[str] = []
            for path in wanted:
                covered = any(path == bound or path.startswith(bound.rstrip("/") + "/") for bound in binds)
                if path.startswith("/") and path != "/" and os.path.lexists(path) and not covered:
                    binds.append(path)
            _binds_cache[python] = binds
        return _binds_cache[python]


# ------------------------------------------------------------------ cgroup v2 (untested on hosts without it)

_cgroup_lock = threading.Lock()
_cgroup_probed = False
_cgroup_base_cache: Path | None = None
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_base() -> Path | None:
    """``/sys/fs/cgroup/scope-sandbox`` with the memory and pids controllers, or None where cgroup v2
    is not mounted there or cannot be delegated to us (then pid 1 samples the tree's memory)."""
    global _cgroup_probed, _cgroup_base_cache
    with _cgroup_lock:
        if not _cgroup_probed:
            _cgroup_probed = True
            try:
                mounts = Path("/proc/self/mounts").read_text().splitlines()
                if os.geteuid() == 0 and any(line.split()[1:3] == [str(_CGROUP_ROOT), "cgroup2"] for line in mounts):
                    base = _CGROUP_ROOT / "scope-sandbox"
                    base.mkdir(exist_ok=True)
                    for parent in (_CGROUP_ROOT, base):
                        (parent / "cgroup.subtree_control").write_text("+memory +pids")
                    if {"memory", "pids"} <= set((base / "cgroup.subtree_control").read_text().split()):
                        _cgroup_base_cache = base
            except (OSError, IndexError):
                _cgroup_base_cache = None
        return _cgroup_base_cache


def _make_cgroup(uid: int, limits: SandboxLimits, tmpfs_bytes: int) -> Path | None:
    base = _cgroup_base()
    if base is None:
        return None
    path = base / f"run-{uid}"
    _remove_cgroup(path)  # left by a killed verifier
    path.mkdir()
    # tmpfs pages are charged to the cgroup of the writer: the budget goes on top.
    (path / "memory.max").write_text(str(limits.memory_mb * _MIB + tmpfs_bytes))
    if (path / "memory.swap.max").exists():
        (path / "memory.swap.max").write_text("0")
    (path / "pids.max").write_text(str(limits.max_processes + 2))  # + pid 1 and the harness
    return path


def _cgroup_oom_killed(path: Path) -> bool:
    try:
        events = dict(line.split() for line in (path / "memory.events").read_text().splitlines())
        return int(events.get("oom_kill", 0)) > 0
    except (OSError, ValueError):
        return False


def _remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while its processes die
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# ------------------------------------------------------------------ processes and files a run leaves


def _kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:  # exited meanwhile
                continue
    return pids


def _kill_processes_of_uid(isolation: _Isolation, uid: int) -> None:
    """SIGKILL every process of ``uid`` (kill(-1) run as that uid), then wait until none is left,
    so that the uid's next lease starts with RLIMIT_NPROC's count at zero."""
    subprocess.run(
        [isolation.python, "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
        env=_MINIMAL_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
        user=uid,
        group=uid,
        extra_groups=[],
        check=False,
    )
    _wait_until_uid_has_no_processes(uid)


def _wait_until_uid_has_no_processes(uid: int, timeout_s: float = 10.0) -> None:
    """Waits for the uid's killed processes to be gone; a uid whose processes outlive
    that (zombies on a host whose init does not reap) is never leased again."""
    deadline = time.monotonic() + timeout_s
    while _processes_of_uid(uid):
        if time.monotonic() > deadline:
            with _state_lock:
                _retired_uids.add(uid)
            return
        time.sleep(0.01)


def _remove_tree(path: str) -> None:
    """Delete a directory tree the program made, however deep, without recursion or following symlinks.

    Every subdirectory is first moved up into the top directory, so no directory
    is ever opened more than one level below it: a tree thousands of levels deep
    costs neither Python recursion (shutil.rmtree's RecursionError) nor path
    lengths beyond PATH_MAX. Only for trees whose writers are all dead.
    """
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    moved = 0
    try:
        pending: list[str | None] = [None]  # None: the top directory itself
        while pending:
            name = pending.pop()
            fd = top if name is None else os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
            try:
                with os.scandir(fd) as entries:
                    children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
                for child, is_dir in children:
                    if not is_dir:
                        os.unlink(child, dir_fd=fd)
                    elif name is None:
                        pending.append(child)
                    else:
                        while True:
                            moved += 1
                            flat = f".scope-remove-{moved}"
                            try:
                                os.lstat(flat, dir_fd=top)
                            except FileNotFoundError:
                                break
                        os.rename(child, flat, src_dir_fd=fd, dst_dir_fd=top)
                        pending.append(flat)
            finally:
                if fd != top:
                    os.close(fd)
            if name is not None:  # now empty: its files unlinked, its subdirectories moved up
                os.rmdir(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)


def _remove_files_of_uid(uid: int) -> None:
    """Without a mount namespace: delete what the run's uid left in the world-writable directories."""
    for directory in _WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    _remove_tree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
