"""Run untrusted Python programs on test inputs in a contained child process.

Model-generated code runs in a fresh ``python -I -B`` interpreter started by
:func:`run_program`, under every layer this host allows; :func:`describe_isolation`
says which. The strongest working set-up is found once per process by probing
(a real run per candidate, ~0.1 s each). What was checked on the development
machine (Linux 6.x, root with all capabilities, util-linux 2.38, no cgroup v2),
and how each layer degrades elsewhere:

* **Private filesystem** (root, ``unshare --mount --ipc --uts --net --pid``).
  The harness starts as pid 1 of the new namespaces and builds the run's own
  root: one tmpfs capped at the output budget (``size=``, ``nr_inodes=``) holds
  the only writable places, ``/work`` (0700, the run's uid), ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock``; the system's ``/usr``, ``/lib*``,
  ``/bin``, ``/sbin``, ``/etc/ld.so.cache`` and the interpreter's prefix are bound
  read-only and nosuid; ``/dev`` has null, zero (the host's ``/dev/full``: it
  reads zeros but cannot be mapped), full, random, urandom; ``/proc``
  is this pid namespace's own. ``pivot_root`` then detaches the host's tree
  (``chroot`` where the syscall number is unknown). Nothing of the host's files
  (datasets, the checkout, other runs' work dirs, unix sockets), processes
  (the trainer's command line) or SysV IPC is reachable, and everything the run
  wrote disappears with its namespace; no clean-up walks it. In the run's own
  IPC namespace ``kernel.shmmax``, ``shmall``, ``shmmni`` and ``msgmni`` are 0
  and ``kernel.sem`` is ``0 0 0 0``: no SysV shared memory, message queue or
  semaphore array at all.
* **System call filter** (seccomp, installed by pid 1 before the harness
  starts, kept across the uid change and ``exec``; x86_64 and aarch64, other
  architectures are refused as a set-up error). Refused with ``EPERM``:
  ``memfd_create``/``memfd_secret`` and ``mmap`` with
  ``MAP_SHARED|MAP_ANONYMOUS`` (memory whose pages stay allocated while no
  process's resident count shows them), ``shmget``, ``msgget``, ``semget`` and
  ``io_uring_setup`` (kernel memory no process maps), ``inotify_init``/``fanotify_init``
  (watches pin inodes in kernel caches), ``setsockopt`` of the
  socket buffer sizes (queued data is kernel memory), the kernel keyrings
  (``add_key``, ``request_key``, ``keyctl``: keys outlive the run and may be
  readable by other uids), and ``clone``/``unshare`` with ``CLONE_NEWUSER`` (a
  user namespace of its own would give the program every capability there,
  e.g. to mount a tmpfs no limit counts); ``clone3`` answers ``ENOSYS`` so the C
  library falls back to ``clone``. Shared memory on a file (``/dev/shm``,
  Python's ``multiprocessing``) stays possible, inside the run's size-capped
  tmpfs.
* **Whole-tree limits.** ``RLIMIT_NPROC`` counts every process and thread of the
  run's own uid, so it bounds the tree. Memory: with cgroup v2 mounted at
  ``/sys/fs/cgroup`` with the memory and pids controllers (not the case on the
  development machine: that path is untested here), each run gets
  ``scope-sandbox/run-<uid>`` with ``memory.max`` (memory limit + tmpfs size),
  ``memory.swap.max = 0`` and ``pids.max``, and is killed through
  ``cgroup.kill``. Without it, pid 1 sums the resident anonymous and shared
  memory (``RssAnon + RssShmem``) of every process in the namespace every 10 ms
  and kills the run over ``memory_mb``: a sampled bound (a burst of six
  processes overshot by at most 13 MiB in 10 runs on the development machine
  at load 9, each process still capped by ``RLIMIT_AS``), pages shared by fork
  counted once per process. The routes to memory no process's resident count
  shows are closed: SysV segments, memfd and shared anonymous mappings are
  refused (above), and tmpfs contents count against the output budget.
* **Unprivileged uid** (root only). The kernel never applies ``RLIMIT_NPROC``
  to uid 0, whatever its capabilities: a fork bomb as root is unbounded. Each
  run leases its own uid (0x70000000 + one of 4096 slots, above systemd's
  container range) by an exclusive ``flock`` on a lease file in a root-only
  directory, so concurrent runs in any thread or worker process never share a
  uid, and ``RLIMIT_NPROC`` and clean-up are per run. The harness empties the
  capability bounding and ambient sets, then drops to it with
  ``setresuid``/``setresgid``/no groups (every capability set empty, and no
  user namespace to gain new ones in) and ``PR_SET_NO_NEW_PRIVS``. Where random uids are not mapped (a user-namespaced
  container), everyone shares ``nobody`` (65534). If no interpreter can run as
  such a uid, untrusted code is refused (:class:`SandboxUnavailable`), never run
  as root.
* **Interpreter** runnable by that uid: ``sys.executable``, else the system
  ``python3``, and only one whose file and parent directories are
  world-accessible (a venv under root's 0700 home is skipped).
* **Kernel limits**, set by the harness before the program starts:
  ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
  ``RLIMIT_NOFILE``, and ``RLIMIT_CORE = 0``.
* **Wall time.** pid 1 ends the run at ``wall_time_s``; the parent kills the
  process group 2 s later should pid 1 not have; coreutils ``timeout`` kills it
  a second after that should the parent itself have been killed; when pid 1
  dies the kernel kills the whole namespace. A per-test alarm bounds each test.
* **One output budget** (``output_budget_mb``): the tmpfs size above, and the
  bytes the parent reads back over the run's stdout and stderr pipes (results
  with each test's stdout, return values, stderr). Over it, the run is killed
  and the tests without a result are not run. The job (program and inputs)
  reaches the sandbox as an unlinked stdin file, the results come back as JSON
  lines; the parent never reads a file the program could have touched. A line
  that does not parse (garbage, or JSON nested too deeply: RecursionError) is
  ignored and counted in :attr:`ProgramRun.malformed_records`. pid 1's own
  records (a set-up error, why it ended the run) come on a separate pipe that
  the harness closes before the program starts, so the program cannot forge
  them.

Fallbacks, weaker and documented as such: where a mount namespace cannot be
made (Docker's default seccomp), ``unshare --net --pid`` plus ``setpriv``, or no
namespaces at all (``setpriv`` or ``Popen(user=)``). Then the host's
world-readable files are readable, the work dir is a 0700 directory of the
run's uid inside a root-owned one, and afterwards the run's processes are
killed by uid and its files removed from the work dir and from the top level of
/tmp, /var/tmp, /dev/shm and /run/lock, by a clean-up that neither recurses nor
follows symlinks; memory is bounded per process times ``max_processes``. Not
root: ``unshare --user --net --pid`` at most, as the current user. With neither
namespaces nor a fresh uid, a process that leaves the process group survives.

The expected outputs never enter the sandbox; the caller compares outputs
(:mod:`scope_opd.verifiers.code`), and HumanEval-style checks run outside it on
the plain values it returns (:mod:`scope_opd.verifiers.trusted_check`).
Fallbacks without pid 1 get the seccomp filter only where the harness can
install it itself (best effort), and none of the IPC namespace's sysctls.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

# The sandbox is three files: this one (limits, results, choosing the isolation, one run), the
# host state and clean-up (_sandbox_host), and the job and results plumbing (_sandbox_io); the
# program itself runs under _sandbox_harness.py. Names are imported here so that callers and
# tests keep one place to find them.
from ._sandbox_host import (  # noqa: F401  (re-exported)
    _MINIMAL_ENV,
    _NOBODY_UID,
    _RANDOM_UID_BASE,
    SandboxUnavailable,
    _binds,
    _cgroup_base,
    _cgroup_oom_killed,
    _kill_process_group,
    _kill_processes_of_uid,
    _make_cgroup,
    _remove_cgroup,
    _remove_files_of_uid,
    _remove_tree,
    _state_dir,
    _uid_lease,
    _wait_until_uid_has_no_processes,
)
from ._sandbox_io import (
    _STDERR_TAIL_CHARS,
    _communicate,
    _job_file,
    _Output,
    _parse_control,
    _parse_records,
    _stdin_bytes,
)

__all__ = [
    "ProgramRun",
    "SandboxLimits",
    "SandboxUnavailable",
    "TestOutcome",
    "describe_isolation",
    "run_program",
    "run_programs",
]

_HARNESS_SOURCE = Path(__file__).with_name("_sandbox_harness.py").read_text(encoding="utf-8")
_MIB = 1024 * 1024

# Record framing (JSON keys, escapes) on top of the output itself.
_BUDGET_SLACK_BYTES = 64 * 1024
# How often pid 1 sums the memory of the process tree when there is no cgroup.
_MEMORY_SAMPLE_S = 0.01
# The parent's own wall clock in contained runs, after pid 1's (which normally ends the run).
_CONTAINED_GRACE_S = 2.0
# Files and directories a contained run may create (each inode is kernel memory that no size limit counts).
_TMPFS_INODES = 8192


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (all tests of one program)."""

    wall_time_s: float = 8.0  # whole run, interpreter start-up included; then the whole run is killed
    time_per_test_s: float = 4.0  # wall-clock alarm around each test case
    cpu_time_s: int = 8  # RLIMIT_CPU, per process
    # RLIMIT_AS per process, and the memory of the whole process tree (cgroup
    # memory.max, else the resident memory pid 1 samples every 10 ms).
    memory_mb: int = 1024
    max_processes: int = 16  # RLIMIT_NPROC of the run's own uid: processes and threads of the whole tree
    max_file_mb: int = 32  # RLIMIT_FSIZE (MiB): any one file, captured stdout of a test included
    max_open_files: int = 64  # RLIMIT_NOFILE
    # Everything the run writes (its private tmpfs: work dir, /tmp, /var/tmp,
    # /dev/shm, /run/lock) and everything read back from it (stdout of every
    # test, return values, stderr), in MiB.
    output_budget_mb: int = 64

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class TestOutcome:
    """What one test case did. ``status``: ``"ok"``, ``"error"``, ``"timeout"`` or ``"not_run"``."""

    __test__ = False  # not a pytest test class, despite the name

    status: str
    error: str = ""
    stdout: str | None = None  # stdin/stdout style, when status is "ok"
    returned: object = None  # function-call style: the return value, through JSON
    # Function-call style, status "error": the built-in exception class the call raised, by name
    # (None for any other class, or when the program wrote the record itself without it).
    raised: str | None = None


@dataclass(frozen=True)
class ProgramRun:
    """All test cases of one program. ``compile_error`` set means no test ran."""

    tests: tuple[TestOutcome, ...]
    compile_error: str | None
    timed_out: bool  # the run hit wall_time_s and was killed
    stderr_tail: str
    # Why the run was cut short: "wall_time", "memory" or "output_budget"; None when it ended by itself.
    killed_for: str | None = None
    # Result lines that could not be parsed (written by the program, or nested
    # too deeply): ignored, so their tests score 0.
    malformed_records: int = 0


@dataclass(frozen=True)
class _Isolation:
    """How this host starts a sandboxed interpreter; chosen once per process by probing."""

    python: str
    namespaces: bool  # network and pid namespaces at least
    # "harness" (root: unshare adds mount, ipc and uts namespaces, and the harness
    # builds the run's private filesystem, then drops to the run's uid itself),
    # "setpriv", "popen" (Popen(user=)), or None when not root.
    privilege_drop: str | None
    random_uids: bool  # False: everyone shares uid 65534

    @property
    def contained(self) -> bool:
        return self.privilege_drop == "harness"

    def command(self, uid: int | None, wall_time_s: float, config: dict | None = None) -> list[str]:
        command: list[str] = []
        timeout = shutil.which("timeout")
        if timeout:
            # A last wall clock, outside the sandbox, for when the parent that
            # should end the run is itself killed (a verifier timeout): SIGKILL
            # reaches unshare, whose --kill-child takes the namespace down.
            command += [timeout, "--signal=KILL", f"{wall_time_s + _CONTAINED_GRACE_S + 1:g}s"]
        if self.namespaces:
            command += [shutil.which("unshare") or "unshare"]
            if os.geteuid() != 0:
                command += ["--user"]
            if self.contained:
                command += ["--mount", "--ipc", "--uts"]
            command += ["--net", "--pid", "--fork", "--kill-child"]
        if self.privilege_drop == "setpriv":
            command += [
                shutil.which("setpriv") or "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--no-new-privs",
                "--pdeathsig=KILL",
                "--",
            ]
        command += [self.python, "-I", "-B", "-c", _HARNESS_SOURCE]
        if config is not None:
            command += ["contain", json.dumps(config)]
        return command

    def popen_kwargs(self, uid: int | None) -> dict:
        if self.privilege_drop == "popen":
            return {"user": uid, "group": uid, "extra_groups": []}
        return {}

    def describe(self) -> str:
        layers = [f"python={self.python}"]
        if self.contained:
            layers.append("mount+pid+net+ipc+uts namespaces (private read-only root, private tmpfs, private /proc)")
            layers.append("seccomp (no user namespaces, keyrings, memfd, SysV or shared anonymous memory)")
            cgroup = _cgroup_base()
            layers.append(f"cgroup v2 {cgroup}" if cgroup else "no cgroup v2: tree memory sampled by pid 1")
        else:
            layers.append("network+pid namespaces" if self.namespaces else "no namespaces")
        if self.privilege_drop is None:
            layers.append(f"runs as the current user (uid {os.geteuid()})")
        else:
            who = "its own leased uid per run" if self.random_uids else f"uid {_NOBODY_UID}"
            layers.append(f"runs as {who} via {self.privilege_drop}")
        return ", ".join(layers)


_isolation_lock = threading.Lock()
_isolation_cache: _Isolation | None = None
_isolation_failure: str | None = None  # also cached: probing again on every program would cost ~0.3 s each


def _candidate_pythons() -> list[str]:
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
    unique: list[str] = []
    for path in candidates:
        if path and os.path.isfile(path) and path not in unique:
            unique.append(path)
    return unique


def _runnable_by_others(path: str) -> bool:
    """Whether any user may execute ``path``: the file and every directory above it are world-accessible.

    Checked explicitly because a probe alone can pass wrongly: ``setpriv`` keeps its
    capabilities until ``execve``, so root's interpreter under a 0700 home directory
    still starts, then loads whatever libpython and stdlib the new uid *can* read.
    """
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def _candidate_isolations() -> Iterable[_Isolation]:
    """Strongest first."""
    has_unshare = shutil.which("unshare") is not None
    has_setpriv = shutil.which("setpriv") is not None
    for python in _candidate_pythons():
        if os.geteuid() != 0:
            if has_unshare:
                yield _Isolation(python, namespaces=True, privilege_drop=None, random_uids=False)
            yield _Isolation(python, namespaces=False, privilege_drop=None, random_uids=False)
            continue
        if not _runnable_by_others(python):
            continue
        for random_uids in (True, False):
            if has_unshare:
                yield _Isolation(python, namespaces=True, privilege_drop="harness", random_uids=random_uids)
            if has_unshare and has_setpriv:
                yield _Isolation(python, namespaces=True, privilege_drop="setpriv", random_uids=random_uids)
            if has_setpriv:
                yield _Isolation(python, namespaces=False, privilege_drop="setpriv", random_uids=random_uids)
            yield _Isolation(python, namespaces=False, privilege_drop="popen", random_uids=random_uids)


_PROBE_LIMITS = SandboxLimits(
    wall_time_s=10.0, time_per_test_s=5.0, cpu_time_s=5, memory_mb=512, max_file_mb=1, output_budget_mb=1
)


def _works(isolation: _Isolation) -> bool:
    """Whether a real run under ``isolation`` gives the right answer, under a uid that is not root."""
    probe = "import ctypes, json, os, resource, signal, socket\nprint(os.geteuid() != 0, input())"
    try:
        run = _execute(isolation, probe, ["probe\n"], None, _PROBE_LIMITS, False)
    except (OSError, subprocess.SubprocessError, SandboxUnavailable):
        return False
    must_drop = isolation.privilege_drop is not None
    return run.tests[0].status == "ok" and run.tests[0].stdout == f"{must_drop or os.geteuid() != 0} probe\n"


def _isolation() -> _Isolation:
    """The strongest isolation that works here (probed once per process, ~0.1 s per candidate)."""
    global _isolation_cache, _isolation_failure
    with _isolation_lock:
        if _isolation_cache is None and _isolation_failure is None:
            _isolation_cache = next((candidate for candidate in _candidate_isolations() if _works(candidate)), None)
            if _isolation_cache is None:
                _isolation_failure = (
                    f"cannot start a sandboxed Python interpreter: as root, none of {_candidate_pythons()} "
                    "is world-accessible and runs under an unprivileged uid (the kernel does not limit the "
                    "processes of uid 0, so untrusted code is refused); install a system python3"
                    if os.geteuid() == 0
                    else f"cannot start a sandboxed Python interpreter from {_candidate_pythons()}"
                )
        if _isolation_cache is None:
            raise SandboxUnavailable(_isolation_failure)
        return _isolation_cache


def describe_isolation() -> str:
    """One line saying which containment layers this host gives sandboxed programs."""
    return _isolation().describe()


# ------------------------------------------------------------------ one run

def _execute(
    isolation: _Isolation,
    source: str,
    test_inputs: Sequence,
    fn_name: str | None,
    limits: SandboxLimits,
    stop_at_first_error: bool,
    typed_values: bool = False,
) -> ProgramRun:
    job = {
        "source": source,
        "inputs": list(test_inputs),
        "fn_name": fn_name,
        "limits": asdict(limits),
        "stop_at_first_error": stop_at_first_error,
        "typed_values": typed_values,
    }
    budget_bytes = limits.output_budget_mb * _MIB
    with _job_file(json.dumps(job).encode("utf-8", errors="replace")) as job_file, _uid_lease(isolation) as uid:
        outer = cgroup = config = None
        oom_killed = False
        if isolation.contained:
            input_bytes = sum(_stdin_bytes(item) for item in test_inputs) if fn_name is None else 0
            tmpfs_bytes = budget_bytes + input_bytes + _MIB
            cgroup = _make_cgroup(uid, limits, tmpfs_bytes)
            config = {
                "uid": uid,
                "root": str(_state_dir() / "root"),
                "binds": _binds(isolation.python),
                "tmpfs_bytes": tmpfs_bytes,
                "tmpfs_inodes": _TMPFS_INODES + 2 * len(test_inputs),
                "cgroup": str(cgroup) if cgroup else None,
                "memory_bytes": limits.memory_mb * _MIB,
                "wall_time_s": limits.wall_time_s,
                "sample_s": _MEMORY_SAMPLE_S,
            }
            workdir = "/"
            env = dict(_MINIMAL_ENV)
        else:
            # outer: root-owned, so the program cannot swap its work dir for a symlink;
            # work: private to the run's uid (0700), so no other run can read it.
            outer = tempfile.mkdtemp(prefix="scope-sandbox-")
            workdir = os.path.join(outer, "work")
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chmod(outer, 0o711)
                os.chown(workdir, uid, uid)
            env = {**_MINIMAL_ENV, "HOME": workdir, "TMPDIR": workdir}
        output = _Output(budget_bytes + _BUDGET_SLACK_BYTES)
        process = None
        finished = False
        control_read = control_write = None
        if config is not None:
            control_read, control_write = os.pipe()
            os.set_inheritable(control_write, True)
            config["control_fd"] = control_write
        try:
            process = subprocess.Popen(
                isolation.command(uid, limits.wall_time_s, config),
                cwd=workdir,
                env=env,
                stdin=job_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed as a whole
                close_fds=True,
                pass_fds=() if control_write is None else (control_write,),
                **isolation.popen_kwargs(uid),
            )
            if control_write is not None:
                os.close(control_write)  # pid 1 holds the only write end now: EOF when it exits
                control_write = None
            grace = _CONTAINED_GRACE_S if isolation.contained else 0.0
            finished = _communicate(process, output, time.monotonic() + limits.wall_time_s + grace, control_read)
        finally:
            for fd in (control_read, control_write):
                if fd is not None:
                    os.close(fd)
            if process is not None:
                # Also after a normal exit: children the program forked may still run.
                _kill_process_group(process.pid)
                process.wait()
                process.stdout.close()
                process.stderr.close()
            if uid is not None and isolation.random_uids and (not isolation.namespaces or not finished):
                # Without a pid namespace, or when the namespace was killed from outside
                # (its processes die asynchronously), before the uid goes back to the pool.
                if isolation.namespaces:
                    _wait_until_uid_has_no_processes(uid)
                else:
                    _kill_processes_of_uid(isolation, uid)
            if cgroup is not None:
                oom_killed = _cgroup_oom_killed(cgroup)
                _remove_cgroup(cgroup)
            if outer is not None:
                _remove_tree(outer)
                if uid is not None and isolation.random_uids:
                    _remove_files_of_uid(uid)
    killed_for = None if finished else ("output_budget" if output.over_budget else "wall_time")
    return _collect(output, limits, len(test_inputs), fn_name is None, killed_for, oom_killed)


def _collect(
    output: _Output, limits: SandboxLimits, n_tests: int, stdio: bool, killed_for: str | None, oom_killed: bool
) -> ProgramRun:
    records, malformed = _parse_records(output.results, n_tests)
    supervisor, setup_error = _parse_control(bytes(output.control))
    if setup_error is not None:
        raise SandboxUnavailable(f"the sandbox could not be set up: {setup_error}")
    reasons = {
        "wall_time": f"killed after {limits.wall_time_s:g} s wall time",
        "output_budget": f"killed: the run's output went over the {limits.output_budget_mb} MiB output budget",
    }
    reason = reasons.get(killed_for, "the run ended before it")
    if supervisor is not None:
        killed_for, reason = supervisor["supervisor"], supervisor["error"]
    elif oom_killed:
        killed_for, reason = "memory", f"killed: the process tree went over the {limits.memory_mb} MiB memory limit"
    compile_record = records.get(-1)
    tests = []
    for index in range(n_tests):
        record = records.get(index)
        if record is None or record["status"] not in ("ok", "error", "timeout"):
            if malformed and killed_for is None:
                reason = f"its result could not be read ({malformed} malformed or too deeply nested result lines)"
            tests.append(TestOutcome("not_run", reason))
            continue
        stdout = record.get("stdout") if stdio else None
        if stdio and record["status"] == "ok" and stdout is None:
            tests.append(TestOutcome("error", "stdout missing, not a regular file, or over the size limit"))
            continue
        raised = record.get("raised")
        tests.append(TestOutcome(record["status"], record["error"], stdout, record.get("returned"),
                                 raised if isinstance(raised, str) else None))
    return ProgramRun(
        tests=tuple(tests),
        compile_error=compile_record["error"] if compile_record else None,
        timed_out=killed_for == "wall_time",
        stderr_tail=output.stderr_tail.decode("utf-8", errors="replace")[-_STDERR_TAIL_CHARS:],
        killed_for=killed_for,
        malformed_records=malformed,
    )


def run_program(
    source: str,
    test_inputs: Sequence,
    *,
    fn_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    stop_at_first_error: bool = False,
    typed_values: bool = False,
) -> ProgramRun:
    """Runs ``source`` once per test input inside the sandbox (one interpreter for all tests).

    Args:
        source: the program.
        test_inputs: stdin/stdout style (``fn_name`` None): each item is the stdin
            text (a list is joined as lines). Function-call style: each item is the
            list of positional arguments for ``fn_name``.
        fn_name: function to call (a top-level function, or a method of a LeetCode
            style ``class Solution``); None for stdin/stdout programs.
        limits: see :class:`SandboxLimits`.
        stop_at_first_error: skip the remaining tests after an error or timeout
            (enough when only "all tests pass" matters).
        typed_values: function-call style only: the arguments are, and the
            return values come back as, tagged JSON that keeps tuples, sets,
            dicts with any keys, bytes and complex apart
            (:mod:`scope_opd.verifiers.trusted_check`); a return value that is
            not built from exact built-in types is an error.

    Raises:
        SandboxUnavailable: no containment possible on this host (see module docstring).
    """
    return _execute(_isolation(), source, test_inputs, fn_name, limits, stop_at_first_error, typed_values)


def run_programs(
    programs: Sequence[tuple[str, Sequence, str | None]],
    *,
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int | None = None,
    stop_at_first_error: bool = False,
) -> list[ProgramRun]:
    """:func:`run_program` on ``(source, test_inputs, fn_name)`` triples, ``max_workers`` at a time
    (default: one per CPU), in order.

    Threads suffice here (unlike for in-process verifiers): each thread only waits
    on a child that the wall-time limit is certain to end.
    """
    if max_workers is None:
        max_workers = os.cpu_count() or 1
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")

    def run(program: tuple[str, Sequence, str | None]) -> ProgramRun:
        source, test_inputs, fn_name = program
        return run_program(source, test_inputs, fn_name=fn_name, limits=limits, stop_at_first_error=stop_at_first_error)

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="scope-sandbox") as pool:
        return list(pool.map(run, programs))
