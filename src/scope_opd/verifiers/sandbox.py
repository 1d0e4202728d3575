"""Run untrusted Python programs on test inputs in a contained child process.

Model-generated code runs in a fresh ``python -I -B`` interpreter started by
:func:`run_program`, under every layer this host allows; :func:`describe_isolation`
says which. The strongest working set-up is found once per process by probing
(~50 ms). What was checked on the development machine (Linux 6.x, root with all
capabilities, util-linux 2.38), and how each layer degrades elsewhere:

* **Unprivileged uid** (root only). The kernel never applies ``RLIMIT_NPROC``
  to uid 0, whatever its capabilities: a fork bomb as root is unbounded, and
  root can read and delete anything. So as root the program runs under a
  throw-away uid drawn at random from 2^24 uids above systemd's container range,
  via ``setpriv --reuid --regid --clear-groups --no-new-privs`` (or
  ``Popen(user=...)`` without setpriv). A fresh uid per run makes
  ``RLIMIT_NPROC`` count that run's processes only (a shared uid let one run's
  fork bomb, and its unreaped zombies, starve the next run's threads) and lets
  the leftovers of a run be killed by uid. Where random uids are not mapped (a
  user-namespaced container), it falls back to ``nobody`` (65534). If no
  interpreter can run as such a uid, untrusted code is refused
  (:class:`SandboxUnavailable`), never run as root.
* **Interpreter** runnable by that uid: ``sys.executable``, else the system
  ``python3``, and only one whose file and parent directories are
  world-accessible. Here the venv's interpreter lives under root's 0700 home and
  is skipped: setpriv keeps its capabilities until ``execve``, so that
  interpreter does start, then loads the system's libpython and stdlib instead
  of its own; the probe alone would have accepted it.
* **Namespaces.** ``unshare --net --pid --fork --kill-child`` (with
  ``--user`` when not root; worked here for an unprivileged user too). The
  program sees a network namespace with only a down loopback: no connection
  anywhere, the host's 127.0.0.1 included, even through ``_socket``. Its own pid
  namespace means that killing the run kills every process it made, including
  ones that ``setsid()`` out of the process group. Where ``unshare`` fails
  (Docker's default capabilities and seccomp), runs have no namespaces.
* **Kernel limits**, set by the harness before the program starts:
  ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
  ``RLIMIT_NOFILE``, and ``RLIMIT_CORE = 0``. Not root, ``RLIMIT_NPROC``
  counts all of the user's processes and threads, so inside a busy trainer the
  program can usually start none.
* **Wall time.** The parent kills the process group after ``wall_time_s``
  (then, without a pid namespace and with a fresh uid, every process of that
  uid, by ``kill(-1)`` run as it); coreutils ``timeout`` kills the run 2 s
  later should the parent itself have been killed; the harness dies with its
  parent (``PR_SET_PDEATHSIG``); a per-test alarm bounds each test.
* **Clean environment and directory.** Only PATH/LANG-like variables are passed
  (no API keys); the working directory is fresh, inside a root-owned directory
  so the program cannot swap it for a symlink, and deleted afterwards. Files
  read back from it are opened without following symlinks, only if regular,
  and up to the file-size limit.
* **Python-level socket block** in the harness: the only network layer without
  namespaces, and bypassable (``_socket``, ctypes).

Not contained: reading world-readable files (datasets included) and writing to
world-writable directories such as /tmp (each file bounded by the file-size
limit, not their number); a mount namespace would close both. With neither
namespaces nor a fresh uid (uid 65534 or not root), a process that leaves the
process group survives the run.

The expected outputs never enter the sandbox; the caller compares outputs
(:mod:`scope_opd.verifiers.code`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "ProgramRun",
    "SandboxLimits",
    "SandboxUnavailable",
    "TestOutcome",
    "describe_isolation",
    "run_program",
    "run_programs",
]

_HARNESS_SOURCE_PATH = Path(__file__).with_name("_sandbox_harness.py")
# 0x70000000 upwards: above the 0x00080000-0x6FFFFFFF container range of
# systemd's UID allocation and far from login users; 2^24 uids makes two
# concurrent runs sharing one vanishingly rare.
_RANDOM_UID_BASE = 0x70000000
_RANDOM_UID_COUNT = 1 << 24
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
_STDERR_TAIL_CHARS = 2000


class SandboxUnavailable(RuntimeError):
    """This host offers no way to run untrusted code with the required containment."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (all tests of one program)."""

    wall_time_s: float = 8.0  # whole run, interpreter start-up included; then the process group is killed
    time_per_test_s: float = 4.0  # wall-clock alarm around each test case
    cpu_time_s: int = 8  # RLIMIT_CPU, whole run
    memory_mb: int = 1024  # RLIMIT_AS (address space, MiB)
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads of the sandbox uid
    max_file_mb: int = 32  # RLIMIT_FSIZE (MiB): any one file, captured stdout of a test included
    max_open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class TestOutcome:
    """What one test case did. ``status``: ``"ok"``, ``"error"``, ``"timeout"`` or ``"not_run"``."""

    __test__ = False  # not a pytest test class, despite the name

    status: str
    error: str = ""
    stdout: str | None = None  # stdin/stdout style, when status is "ok"
    returned: object = None  # function-call style: the return value, through JSON


@dataclass(frozen=True)
class ProgramRun:
    """All test cases of one program. ``compile_error`` set means no test ran."""

    tests: tuple[TestOutcome, ...]
    compile_error: str | None
    timed_out: bool  # the run hit wall_time_s and was killed
    stderr_tail: str


@dataclass(frozen=True)
class _Isolation:
    """How this host starts a sandboxed interpreter; chosen once per process by probing."""

    python: str
    namespaces: bool  # unshare --net --pid
    privilege_drop: str | None  # "setpriv", "popen" (Popen(user=)), or None when not root
    random_uids: bool  # False: everyone shares uid 65534

    def pick_uid(self) -> int | None:
        if self.privilege_drop is None:
            return None
        return _RANDOM_UID_BASE + secrets.randbelow(_RANDOM_UID_COUNT) if self.random_uids else _NOBODY_UID

    def command(self, uid: int | None, program: Sequence[str], wall_time_s: float | None = None) -> list[str]:
        command: list[str] = []
        timeout = shutil.which("timeout")
        if wall_time_s is not None and timeout:
            # A second wall clock, outside the sandbox, for when the parent that
            # should kill the run is itself killed (a verifier timeout): SIGKILL
            # reaches unshare, whose --kill-child takes the namespace down.
            command += [timeout, "--signal=KILL", f"{wall_time_s + 2:g}s"]
        if self.namespaces:
            command += [shutil.which("unshare") or "unshare"]
            if os.geteuid() != 0:
                command += ["--user"]
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
        return command + [self.python, "-I", "-B", *program]

    def popen_kwargs(self, uid: int | None) -> dict:
        if self.privilege_drop == "popen":
            return {"user": uid, "group": uid, "extra_groups": []}
        return {}

    def describe(self) -> str:
        layers = [f"python={self.python}"]
        layers.append("network+pid namespaces" if self.namespaces else "no namespaces")
        if self.privilege_drop is None:
            layers.append(f"runs as the current user (uid {os.geteuid()})")
        else:
            who = "a fresh random uid per run" if self.random_uids else f"uid {_NOBODY_UID}"
            layers.append(f"runs as {who} via {self.privilege_drop}")
        return ", ".join(layers)


_PROBE_SOURCE = (
    "import ctypes, io, json, os, resource, signal, socket, sys; "
    "sys.exit(3 if os.geteuid() == 0 and {must_drop} else 0)"
)
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
            if has_unshare and has_setpriv:
                yield _Isolation(python, namespaces=True, privilege_drop="setpriv", random_uids=random_uids)
            if has_setpriv:
                yield _Isolation(python, namespaces=False, privilege_drop="setpriv", random_uids=random_uids)
            yield _Isolation(python, namespaces=False, privilege_drop="popen", random_uids=random_uids)


def _works(isolation: _Isolation) -> bool:
    uid = isolation.pick_uid()
    probe = _PROBE_SOURCE.format(must_drop=isolation.privilege_drop is not None)
    try:
        completed = subprocess.run(
            isolation.command(uid, ["-c", probe]),
            cwd="/",
            env=_MINIMAL_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            **isolation.popen_kwargs(uid),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0


def _isolation() -> _Isolation:
    """The strongest isolation that works here (probed once per process, ~50 ms)."""
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


def _read_untrusted_file(path: Path, max_bytes: int) -> bytes | None:
    """Bytes of a file the sandboxed program could have tampered with, or None.

    None for a missing file, anything but a regular file (a FIFO would block this
    root process forever), a symlink (it could point anywhere), or more than
    ``max_bytes``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return None if size > max_bytes else b"".join(chunks)
    finally:
        os.close(fd)


def _stdin_text(test_input: object) -> str:
    if isinstance(test_input, list):
        return "\n".join(str(line) for line in test_input) + "\n"
    return str(test_input)


def _write_job(
    workdir: Path,
    source: str,
    test_inputs: Sequence,
    fn_name: str | None,
    limits: SandboxLimits,
    stop_at_first_error: bool,
) -> None:
    job = {
        "fn_name": fn_name,
        "n_tests": len(test_inputs),
        "time_per_test_s": limits.time_per_test_s,
        "limits": asdict(limits),
        "stop_at_first_error": stop_at_first_error,
    }
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    (workdir / "solution.py").write_text(source, encoding="utf-8", errors="replace")
    shutil.copyfile(_HARNESS_SOURCE_PATH, workdir / "harness.py")
    if fn_name is None:
        for index, test_input in enumerate(test_inputs):
            (workdir / f"stdin_{index}.txt").write_text(_stdin_text(test_input), encoding="utf-8", errors="replace")
    else:
        (workdir / "args.json").write_text(json.dumps(list(test_inputs)), encoding="utf-8")


def _kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_processes_of_uid(isolation: _Isolation, uid: int) -> None:
    """SIGKILL every process of ``uid`` (kill(-1) run as that uid): leftovers that left the process group."""
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


def _run_harness(isolation: _Isolation, uid: int | None, workdir: Path, stderr_path: Path, wall_time_s: float) -> bool:
    """Runs the harness in ``workdir`` to completion or to the wall-time kill; True when killed."""
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen(
            isolation.command(uid, [str(workdir / "harness.py")], wall_time_s),
            cwd=workdir,
            env={**_MINIMAL_ENV, "HOME": str(workdir), "TMPDIR": str(workdir)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
            **isolation.popen_kwargs(uid),
        )
    timed_out = False
    try:
        process.wait(timeout=wall_time_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Also after a normal exit: children the program forked may still run.
        _kill_process_group(process.pid)
        process.wait()
        if uid is not None and isolation.random_uids and not isolation.namespaces:
            _kill_processes_of_uid(isolation, uid)
    return timed_out


def _read_results(workdir: Path, max_bytes: int) -> dict[int, dict]:
    """Test index -> harness record. Malformed lines (a program writing into the file)
    are ignored, and the last line per test wins: the harness writes a test's
    record after that test's code has run, so it overrides anything the code wrote."""
    raw = _read_untrusted_file(workdir / "results.jsonl", max_bytes) or b""
    records: dict[int, dict] = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            index = int(record["test"])
            record["status"], record["error"] = str(record["status"]), str(record.get("error", ""))
        except (ValueError, KeyError, TypeError):
            continue
        records[index] = record
    return records


def _collect(
    workdir: Path, stderr_path: Path, n_tests: int, stdio: bool, timed_out: bool, limits: SandboxLimits
) -> ProgramRun:
    max_bytes = limits.max_file_mb * 1024 * 1024
    records = _read_results(workdir, max_bytes)
    stderr = (_read_untrusted_file(stderr_path, max_bytes) or b"").decode("utf-8", errors="replace")
    compile_record = records.get(-1)
    tests = []
    for index in range(n_tests):
        record = records.get(index)
        if record is None or record["status"] not in ("ok", "error", "timeout"):
            reason = f"killed after {limits.wall_time_s:g} s wall time" if timed_out else "the run ended before it"
            tests.append(TestOutcome("not_run", reason))
            continue
        stdout = None
        if stdio and record["status"] == "ok":
            raw = _read_untrusted_file(workdir / f"stdout_{index}.txt", max_bytes)
            if raw is None:
                tests.append(TestOutcome("error", "stdout missing, not a regular file, or over the size limit"))
                continue
            stdout = raw.decode("utf-8", errors="replace")
        tests.append(TestOutcome(record["status"], record["error"], stdout, record.get("returned")))
    return ProgramRun(
        tests=tuple(tests),
        compile_error=compile_record["error"] if compile_record else None,
        timed_out=timed_out,
        stderr_tail=stderr[-_STDERR_TAIL_CHARS:],
    )


def run_program(
    source: str,
    test_inputs: Sequence,
    *,
    fn_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    stop_at_first_error: bool = False,
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

    Raises:
        SandboxUnavailable: no containment possible on this host (see module docstring).
    """
    isolation = _isolation()
    uid = isolation.pick_uid()
    # outer: root-owned, where the parent keeps stderr; work: the program's, inside
    # a directory it cannot rename, so it cannot swap in a symlink.
    outer = Path(tempfile.mkdtemp(prefix="scope-sandbox-"))
    try:
        workdir = outer / "work"
        workdir.mkdir()
        _write_job(workdir, source, test_inputs, fn_name, limits, stop_at_first_error)
        if uid is not None:
            os.chmod(outer, 0o711)
            for path in [workdir, *workdir.iterdir()]:
                os.chown(path, uid, uid)
        stderr_path = outer / "stderr.txt"
        timed_out = _run_harness(isolation, uid, workdir, stderr_path, limits.wall_time_s)
        return _collect(workdir, stderr_path, len(test_inputs), fn_name is None, timed_out, limits)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def run_programs(
    programs: Sequence[tuple[str, Sequence, str | None]],
    *,
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int = 4,
    stop_at_first_error: bool = False,
) -> list[ProgramRun]:
    """:func:`run_program` on ``(source, test_inputs, fn_name)`` triples, ``max_workers`` at a time, in order.

    Threads suffice here (unlike for in-process verifiers): each thread only waits
    on a child that the wall-time limit is certain to end.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")

    def run(program: tuple[str, Sequence, str | None]) -> ProgramRun:
        source, test_inputs, fn_name = program
        return run_program(source, test_inputs, fn_name=fn_name, limits=limits, stop_at_first_error=stop_at_first_error)

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="scope-sandbox") as pool:
        return list(pool.map(run, programs))
