"""Runs one untrusted program on its test inputs, inside the sandbox.

Executed by :mod:`scope_opd.verifiers.sandbox` as ``python -I -B -c <this source>``
(never imported by the package), so that no file of the package needs to be
readable by the sandbox's uid. It must run on whatever Python 3.8+ the sandbox
uses, so it has no dependency beyond the standard library.

Two entry points:

* ``contain <config JSON>``: started as root by ``unshare --mount --pid --net
  --ipc --uts --fork`` (pid 1 of the new pid namespace). It builds the run's
  private filesystem (:func:`_build_root`), joins the run's cgroup if it has
  one, forks the harness child (which drops to the run's uid, then runs the
  tests), and supervises it: the wall time, the memory of the whole process tree
  (:func:`_supervise`), reaping. When pid 1 exits the kernel kills everything
  left in the namespace, and the private mounts vanish with it.
* no argument: the harness alone, already under the run's uid, in a work
  directory made by the parent (hosts without namespaces).

The job arrives on stdin as JSON: ``{"source", "inputs", "fn_name", "limits",
"stop_at_first_error"}`` (inputs are stdin texts, or argument lists in function
call style). Results go to stdout (a pipe to the parent), one JSON line per
record: ``{"test": i, "status": "ok"|"error"|"timeout", "error": str,
"stdout": str | "returned": value}``, ``{"test": -1, ...}`` for a compile error,
In contain mode pid 1 writes its own records to a separate control pipe
(``config["control_fd"]``), which the harness child closes before the program
runs: ``{"supervisor": "wall_time"|"memory", "error": str}`` when pid 1 stopped
the run, ``{"setup_error": str}`` when the sandbox could not be built.

The program runs in the harness process, so it can tamper with the harness and
write to the results pipe; that is why the expected outputs (and HumanEval's
checks) never enter the sandbox. The parent compares outputs and takes the last
record of each test: tampering can break the program's own run, or report
outputs it could as well have printed, but cannot reveal what the right ones
are, nor write a record of pid 1.
"""

import builtins
import io
import json
import os
import resource
import signal
import socket
import stat
import sys
import time

MAX_ERROR_CHARS = 500
MIB = 1024 * 1024


class _TestTimeLimit(BaseException):
    """Raised by SIGALRM when one test overruns; BaseException so `except Exception` in user code misses it."""


def _on_alarm(signum, frame):
    raise _TestTimeLimit()


def _set_limits(limits):
    """Kernel limits on this process and everything it starts. Lowering is always allowed; raising back is not."""
    cpu_s, memory = int(limits["cpu_time_s"]), int(limits["memory_mb"] * MIB)
    file_size = int(limits["max_file_mb"] * MIB)
    processes, open_files = int(limits["max_processes"]), int(limits["max_open_files"])
    wanted = [
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_FSIZE, file_size, file_size),
        (resource.RLIMIT_NPROC, processes, processes),
        (resource.RLIMIT_NOFILE, open_files, open_files),
        (resource.RLIMIT_CORE, 0, 0),  # a core dump after SIGXCPU would be a large file
    ]
    for kind, soft, hard in wanted:
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _block_network():
    """Second layer behind the network namespace: refuse to create non-Unix sockets.

    Bypassable (``_socket``, ctypes); it exists for hosts where no network
    namespace can be made, and to make the failure message obvious.
    """
    real_socket = socket.socket

    class NoNetworkSocket(real_socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = NoNetworkSocket


def _describe(error):
    try:
        text = "%s: %s" % (type(error).__name__, error)
    except BaseException:  # a hostile __str__
        text = type(error).__name__
    return text[:MAX_ERROR_CHARS]


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _run_timed(action, seconds):
    """(status, error, value) of ``action()`` under a per-test wall-clock alarm."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            return "ok", "", action()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _TestTimeLimit:
        return "timeout", "exceeded %gs" % seconds, None
    except SystemExit as exit_:
        # sys.exit() / exit() with status 0 is a normal way for a script to end.
        if exit_.code in (None, 0):
            return "ok", "", None
        return "error", "SystemExit(%r)" % (exit_.code,), None
    except BaseException as error:
        return "error", _describe(error), error  # the exception itself, for its class


def _redirect(fd, path, flags):
    new_fd = os.open(path, flags, 0o600)
    os.dup2(new_fd, fd)
    os.close(new_fd)


def _read_own_stdout(path, max_bytes):
    """What the program printed, or None when it is gone, not a regular file, or over ``max_bytes``.

    Checked because the program may have swapped the file: a FIFO would block
    the harness until the wall time, a sparse file would cost its apparent size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(MIB, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return None if size > max_bytes else b"".join(chunks)
    finally:
        os.close(fd)


def _stdio_test(code, index, seconds, budget):
    # Real file descriptors, not StringIO, so open(0), sys.stdin.buffer and
    # os.write(1, ...) all work as they would in a judge.
    stdout_path = os.path.join(WORKDIR, "stdout_%d.txt" % index)
    _redirect(0, os.path.join(WORKDIR, "stdin_%d.txt" % index), os.O_RDONLY)
    _redirect(1, stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    status, error, _ = _run_timed(lambda: exec(code, namespace), seconds)
    try:
        sys.stdout.flush()
    except BaseException as flush_error:  # output over the file-size limit, or a closed stdout
        if status == "ok":
            status, error = "error", _describe(flush_error)
    record = {"test": index, "status": status, "error": error}
    if status == "ok":
        raw = _read_own_stdout(stdout_path, budget.remaining())
        if raw is None:
            record.update(status="error", error="stdout missing, not a regular file, or over the size limit "
                          "(the run's output budget is %d MiB)" % budget.total_mib)
        else:
            record["stdout"] = raw.decode("utf-8", errors="replace")
    try:
        os.unlink(stdout_path)  # its bytes count against the run's private tmpfs
    except OSError:
        pass
    return record


_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def _to_tagged(value, depth=0):
    """``value`` as tagged JSON (scope_opd.verifiers.typed_values), built from exact built-in types only.

    Any other object (a subclass of int or str, an object with its own ``__eq__``)
    raises TypeError: its comparisons would be the program's, not the checker's.
    """
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if depth > 100:
        raise ValueError("nested more than 100 deep")
    if kind in (list, tuple, set, frozenset):
        return {kind.__name__: [_to_tagged(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[_to_tagged(key, depth + 1), _to_tagged(item, depth + 1)] for key, item in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError("a %s.%s is not a plain built-in value" % (kind.__module__, kind.__qualname__))


def _from_tagged(value):
    """The arguments of a call, from tagged JSON (trusted: they come from the job)."""
    if isinstance(value, dict):
        ((tag, items),) = value.items()
        if tag in _CONTAINERS:
            return _CONTAINERS[tag](_from_tagged(item) for item in items)
        if tag == "dict":
            return {_from_tagged(key): _from_tagged(item) for key, item in items}
        if tag == "bytes":
            return bytes.fromhex(items)
        if tag == "complex":
            return complex(*items)
        raise ValueError("unknown tag %r" % tag)
    return value


def _call_test(code, fn_name, args, index, seconds, typed=False):
    # Not "__main__": a function-style solution's own `if __name__ == "__main__":` demo must not run.
    namespace = {"__name__": "solution", "__builtins__": builtins}
    if typed:
        args = _from_tagged(args)

    def call():
        exec(code, namespace)
        function = namespace.get(fn_name)
        if function is None and "Solution" in namespace:  # LeetCode style: a method of class Solution
            function = getattr(namespace["Solution"](), fn_name)
        if function is None:
            raise NameError("the program defines no %r" % fn_name)
        return function(*args) if isinstance(args, list) else function(args)

    status, error, returned = _run_timed(call, seconds)
    record = {"test": index, "status": status, "error": error}
    if status == "error" and returned is not None:
        # Named only when it is exactly a built-in exception class, so that a check expecting, say,
        # ValueError sees one (trusted_check); a class of the program's own is just an error.
        kind = type(returned)
        if getattr(builtins, kind.__name__, None) is kind:
            record["raised"] = kind.__name__
    if status == "ok":
        try:
            record["returned"] = _to_tagged(returned) if typed else json.loads(json.dumps(returned))
        except BaseException as json_error:  # not JSON, too deep (RecursionError), or too large for the memory limit
            record.update(status="error", error="return value is not %s: %s"
                          % ("a plain value" if typed else "JSON", _describe(json_error)))
    return record


class _Budget:
    """The run's output budget, as seen from inside (the parent enforces it again on what it reads)."""

    def __init__(self, total_bytes):
        self.total_mib = total_bytes // MIB
        self.left = total_bytes

    def remaining(self):
        return max(0, self.left)

    def spend(self, size):
        self.left -= size


def _die_with_parent():
    """SIGKILL this process when the process that started it dies (set after the uid change, which clears it)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's process-group kill remains
        pass


def _stdin_text(test_input):
    if isinstance(test_input, list):
        return "\n".join(str(line) for line in test_input) + "\n"
    return str(test_input)


WORKDIR = "."


def run_tests(job):
    """The harness proper: under the run's uid, in its work directory; results go to stdout."""
    global WORKDIR
    WORKDIR = os.getcwd()  # absolute: the program may chdir
    results_fd = os.dup(1)  # fd 1 itself becomes each test's stdout file
    limits = job["limits"]
    inputs = job["inputs"]
    if job["fn_name"] is None:
        # Before the limits: inputs are trusted data and may exceed the file-size limit.
        for index, test_input in enumerate(inputs):
            with open(os.path.join(WORKDIR, "stdin_%d.txt" % index), "w", encoding="utf-8", errors="replace") as f:
                f.write(_stdin_text(test_input))
    _die_with_parent()
    _set_limits(limits)
    # Refuse rather than run unbounded: the kernel never applies RLIMIT_NPROC to uid 0.
    if os.geteuid() == 0:
        raise SystemExit("sandbox harness refuses to run user code as root")
    # Over the file-size limit, a write then fails with EFBIG instead of killing the harness.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _block_network()
    sys.dont_write_bytecode = True
    harness_pid = os.getpid()
    budget = _Budget(int(limits["output_budget_mb"] * MIB))
    try:
        code = compile(job["source"], "solution.py", "exec")
    except BaseException as error:
        _write_all(results_fd, (json.dumps({"test": -1, "status": "error", "error": _describe(error)}) + "\n").encode())
        return
    job = {"fn_name": job["fn_name"], "stop": job["stop_at_first_error"], "seconds": limits["time_per_test_s"],
           "typed": bool(job.get("typed_values"))}
    for index, test_input in enumerate(inputs):
        if job["fn_name"] is None:
            record = _stdio_test(code, index, job["seconds"], budget)
        else:
            record = _call_test(code, job["fn_name"], test_input, index, job["seconds"], job["typed"])
        if os.getpid() != harness_pid:
            os._exit(0)  # a fork made by the program returned into the harness: it has no say
        try:
            line = (json.dumps(record) + "\n").encode("utf-8", errors="replace")
            if len(line) > budget.remaining():  # JSON escapes can make a record several times its output
                record = {"test": index, "status": "error",
                          "error": "output over the run's %d MiB output budget" % budget.total_mib}
                line = (json.dumps(record) + "\n").encode()
            budget.spend(len(line))
            _write_all(results_fd, line)
        except BaseException:
            return
        if job["stop"] and record["status"] != "ok":
            return


def _read_job():
    with io.open(0, "rb", closefd=False) as stdin:
        job = json.loads(stdin.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return job


def _plain_main():
    """Hosts without namespaces: already under the run's uid, in the parent's work directory."""
    try:  # best effort here (a weaker fallback anyway); contain mode requires it
        _forbid_syscalls(*_libc())
    except (_SetupError, OSError, AttributeError):
        pass
    run_tests(_read_job())


# ------------------------------------------------------------------ contain mode (pid 1, root)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
# pivot_root has no glibc wrapper; without a known number we fall back to chroot.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# /dev entries a Python program may need, as (name, host node bound there). /dev/zero is the
# host's /dev/full: reads give zeros all the same, but it has no mmap, whereas a MAP_SHARED
# mapping of the real /dev/zero is shared anonymous memory that the filter's MAP_ANONYMOUS test
# cannot see (children fill it and exit; the holder's resident count shows nothing).
DEVICES = (("null", "null"), ("zero", "full"), ("full", "full"), ("random", "random"), ("urandom", "urandom"))
WRITABLE_DIRS = ("tmp", "var/tmp", "dev/shm", "run/lock")


class _SetupError(Exception):
    pass


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(libc, ctypes, source, target, fstype, flags, data=None):
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
        error = ctypes.get_errno()
        raise _SetupError("mount %s on %s: %s" % (source or fstype, target, os.strerror(error)))


def _bind_read_only(libc, ctypes, host_path, target):
    _mount(libc, ctypes, host_path, target, None, MS_BIND | MS_REC)
    # A bind mount takes the source's flags; read-only and nosuid need a remount.
    _mount(libc, ctypes, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(config, uid):
    """The run's filesystem: one size-capped tmpfs as the root, holding the only writable
    places (/work, /tmp, /var/tmp, /dev/shm, /run/lock), read-only binds of what the
    interpreter needs, a few device nodes, and a /proc of this pid namespace only."""
    ctypes, libc = _libc()
    _mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)
    if config.get("cgroup"):
        try:
            with open(os.path.join(config["cgroup"], "cgroup.procs"), "w") as procs:
                procs.write("0")  # this process; its children inherit the cgroup
        except OSError as error:
            raise _SetupError("cannot join cgroup %s: %s" % (config["cgroup"], error))
    root = config["root"]
    _mount(libc, ctypes, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
           "size=%d,nr_inodes=%d,mode=755" % (config["tmpfs_bytes"], config["tmpfs_inodes"]))
    for directory in ("proc", "dev", "etc", "work") + WRITABLE_DIRS:
        os.makedirs(os.path.join(root, directory), exist_ok=True)
    for directory in WRITABLE_DIRS:
        os.chmod(os.path.join(root, directory), 0o1777)
    os.chmod(os.path.join(root, "work"), 0o700)
    os.chown(os.path.join(root, "work"), uid, uid)
    for host_path in config["binds"]:
        target = root + host_path
        if os.path.islink(host_path):  # /bin -> usr/bin on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(host_path), target)
        elif os.path.isdir(host_path):
            os.makedirs(target, exist_ok=True)
            _bind_read_only(libc, ctypes, host_path, target)
        elif os.path.isfile(host_path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
            _bind_read_only(libc, ctypes, host_path, target)
    for device, host_device in DEVICES:
        target = os.path.join(root, "dev", device)
        open(target, "w").close()
        _mount(libc, ctypes, "/dev/" + host_device, target, None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(link, os.path.join(root, "dev", name))
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is not None and libc.syscall(number, b".", b".") == 0:
        # The old root now sits on top of the new one; detach it and nothing of the host is reachable.
        if libc.umount2(b".", MNT_DETACH) != 0:
            raise _SetupError("cannot detach the host's root: %s" % os.strerror(ctypes.get_errno()))
    elif libc.chroot(b".") != 0:  # the program is never root, so it cannot leave a chroot
        raise _SetupError("neither pivot_root nor chroot worked: %s" % os.strerror(ctypes.get_errno()))
    os.chdir("/")
    _mount(libc, ctypes, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return ctypes, libc


# ---- syscalls the program may not make (seccomp), per architecture:
# (audit arch, refused with EPERM, mmap, clone, unshare, setsockopt).
# Refused: memfd_create and memfd_secret (memory no process need map, so no resident count sees
# it), the kernel keyrings (add_key, request_key, keyctl: keys outlive the run and other uids may
# read them), shmget, msgget and semget (SysV shared memory, message queues and semaphore arrays:
# kernel memory no process maps, 512 MiB of queues and tens of GiB of semaphores with the default
# limits; also capped at 0 by this IPC namespace's sysctls), io_uring_setup (ring memory is kernel
# memory, bounded only by a RLIMIT_MEMLOCK the host chooses, and its operations bypass this filter),
# inotify_init, inotify_init1 and fanotify_init (each watch pins an inode of the read-only system
# files in the kernel's caches: 33219 watches in 4 s took 50 MiB of slab, up to fs.inotify's
# max_user_watches, 192540 here, per uid).
# mmap is refused only with MAP_SHARED|MAP_ANONYMOUS: such pages stay allocated while any process
# maps them, but count in the resident memory only of processes that touched them (a child fills
# them and exits); shared memory on a file lives in the run's size-capped tmpfs instead (Python's
# multiprocessing puts it in /dev/shm). clone and unshare are refused only with CLONE_NEWUSER: a
# new user namespace would give the program a full capability set there (mounting a tmpfs no
# limit counts, among others). clone3 answers ENOSYS, since its flags sit in memory a filter
# cannot read; the C library then falls back to clone.
# setsockopt is refused only for socket buffer sizes (SO_SNDBUF, SO_RCVBUF and their FORCE forms):
# what sockets hold queued is kernel memory no resident count shows, and one process's 28 Unix
# datagram socket pairs held 217 MiB at the host's 4 MiB wmem_max; at the default size (the host's
# wmem_default) it is bounded by max_processes x max_open_files sockets.
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, (319, 447, 248, 249, 250, 29, 68, 64, 425, 253, 294, 300), 9, 56, 272, 54),
    "aarch64": (0xC00000B7, (279, 447, 217, 218, 219, 194, 186, 190, 425, 26, 262), 222, 220, 97, 208),
}
SOL_SOCKET, SOCKET_BUFFER_OPTIONS = 1, (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
MAP_SHARED_ANONYMOUS = 0x01 | 0x20
SYS_CLONE3 = 435
CLONE_NEWUSER = 0x10000000
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38


def _seccomp_program(machine):
    """The BPF program of the filter, as (code, jump if true, jump if false, k) tuples; None if the arch is unknown."""
    if machine not in SECCOMP_ARCHES:
        return None
    arch, refused, mmap, clone, unshare, setsockopt = SECCOMP_ARCHES[machine]
    # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_ALU|AND|K, BPF_RET|K
    load, jeq, jge, jset, and_, ret = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
    program = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS), (load, 0, 0, 0)]
    if machine == "x86_64":  # x32 system calls (nr | 0x40000000) would bypass the numbers below
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    for number in refused:
        program += [(jeq, 0, 1, number), (ret, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    program += [(jeq, 0, 1, SYS_CLONE3), (ret, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    program += [
        (jeq, 0, 5, mmap),
        (load, 0, 0, 40),  # the low 32 bits of the fourth argument: the flags
        (and_, 0, 0, MAP_SHARED_ANONYMOUS),
        (jeq, 0, 1, MAP_SHARED_ANONYMOUS),
        (ret, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (ret, 0, 0, SECCOMP_RET_ALLOW),
    ]
    program += [
        (jeq, 0, 9, setsockopt),
        (load, 0, 0, 24),  # the low 32 bits of the second argument: the level
        (jeq, 0, 5, SOL_SOCKET),
        (load, 0, 0, 32),  # the third: the option
        (jeq, 4, 0, SOCKET_BUFFER_OPTIONS[0]),
        (jeq, 3, 0, SOCKET_BUFFER_OPTIONS[1]),
        (jeq, 2, 0, SOCKET_BUFFER_OPTIONS[2]),
        (jeq, 1, 0, SOCKET_BUFFER_OPTIONS[3]),
        (ret, 0, 0, SECCOMP_RET_ALLOW),
        (ret, 0, 0, SECCOMP_RET_ERRNO | EPERM),
    ]
    program += [
        (jeq, 1, 0, clone),
        (jeq, 0, 3, unshare),
        (load, 0, 0, 16),  # the low 32 bits of the first argument: the flags of both
        (jset, 0, 1, CLONE_NEWUSER),
        (ret, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (ret, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return program


def _forbid_syscalls(ctypes, libc):
    """Installs the seccomp filter on this process and everything it starts (kept across setuid and exec)."""
    program = _seccomp_program(os.uname().machine)
    if program is None:
        raise _SetupError("no seccomp filter for the %s architecture" % os.uname().machine)

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    fprog = SockFprog(len(program), filters)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _SetupError("PR_SET_NO_NEW_PRIVS failed: %s" % os.strerror(ctypes.get_errno()))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise _SetupError("cannot install the seccomp filter: %s" % os.strerror(ctypes.get_errno()))


def _refuse_sysv_shared_memory():
    """This run's IPC namespace allows no SysV shared memory segment (sizes over shmmax = 0 fail),
    no message queue (msgmni = 0) and no semaphore array (sem = "0 0 0 0")."""
    for name, value in (("shmmax", "0"), ("shmall", "0"), ("shmmni", "0"), ("msgmni", "0"), ("sem", "0 0 0 0")):
        with open("/proc/sys/kernel/" + name, "w") as sysctl:
            sysctl.write(value)


def _drop_to(uid, ctypes, libc):
    # The bounding and ambient sets too, while still root (CAP_SETPCAP): then every capability
    # set of the program is empty, and nothing (no exec, no namespace) can give one back.
    try:
        with open("/proc/sys/kernel/cap_last_cap") as last:
            last_cap = int(last.read())
    except (OSError, ValueError):
        last_cap = 40
    for capability in range(last_cap + 1):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: unknown
            raise _SetupError("cannot drop capability %d from the bounding set" % capability)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # all uids non-zero: the kernel clears every capability
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _SetupError("PR_SET_NO_NEW_PRIVS failed")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tree_memory_bytes():
    """Resident anonymous and shared memory (RssAnon + RssShmem) of every process in this pid
    namespace but pid 1.

    RssShmem holds MAP_SHARED anonymous pages and mapped tmpfs pages, which the
    kernel counts as shared, not anonymous. Pages that fork shares copy-on-write,
    and shared pages mapped by several processes, count once per process: an
    over-estimate, never an under-estimate. Memory no process maps is refused
    elsewhere (memfd_create and SysV shared memory) or bounded by the tmpfs size.
    """
    total_kib = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open("/proc/%s/status" % name, "rb") as status:
                for line in status:
                    if line.startswith(b"RssAnon:") or line.startswith(b"RssShmem:"):
                        total_kib += int(line.split()[1])
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return total_kib * 1024


def _supervise(child, config, started):
    """Wait for the harness child; end the run at the wall time or when the tree's memory is over the limit.

    Returns None when the child exited, else the supervisor record to report.
    """
    import select

    deadline = started + config["wall_time_s"]
    memory_limit = None if config.get("cgroup") else config["memory_bytes"]
    poller = None
    try:
        pidfd = os.pidfd_open(child)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: plain sleeps
        pass
    while True:
        while True:  # reap: the child, and orphans of the program, which are reparented to us
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                break
            if pid == child:
                return None
        now = time.monotonic()
        if now >= deadline:
            return {"supervisor": "wall_time", "error": "killed after %g s wall time" % config["wall_time_s"]}
        if memory_limit is not None:
            used = _tree_memory_bytes()
            if used > memory_limit:
                return {"supervisor": "memory", "error": "killed: the process tree used %d MiB, over the %d MiB "
                        "memory limit" % (used // MIB, memory_limit // MIB)}
        wait_s = min(config["sample_s"], deadline - now)
        if poller is not None:
            poller.poll(max(1, int(wait_s * 1000)))
        else:
            time.sleep(wait_s)


def _contain_main(config):
    started = time.monotonic()
    uid = int(config["uid"])
    # pid 1's own pipe to the parent (set-up errors, why it ended the run); the
    # harness child closes it before any program code runs, so the program
    # cannot write records the parent trusts.
    control_fd = int(config["control_fd"])
    try:
        job = _read_job()
        ctypes, libc = _build_root(config, uid)
        _refuse_sysv_shared_memory()
        _forbid_syscalls(ctypes, libc)
    except (_SetupError, OSError, ValueError) as error:
        _write_all(control_fd, (json.dumps({"setup_error": _describe(error)}) + "\n").encode())
        os._exit(3)
    child = os.fork()
    if child == 0:
        os.close(control_fd)
        try:
            _drop_to(uid, ctypes, libc)
            os.chdir("/work")
            os.environ.update(HOME="/work", TMPDIR="/tmp")
            run_tests(job)
        except BaseException as error:
            try:
                _write_all(2, ("harness: %s\n" % _describe(error)).encode())
            except BaseException:
                pass
        os._exit(0)
    record = _supervise(child, config, started)
    if record is not None:
        os.kill(-1, signal.SIGKILL)  # from pid 1: every other process of the namespace
        _write_all(control_fd, (json.dumps(record) + "\n").encode())
    os._exit(0)  # pid 1 exits: the kernel kills what is left and the private mounts go with it


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "contain":
        _contain_main(json.loads(sys.argv[2]))
    else:
        _plain_main()
