"""The sandbox's leaks found by the red-team pass, each shown contained.

Filesystems, memory of a process tree, sibling runs, the host's processes and
files, unix sockets, SysV shared memory, output size, deep nesting. Tests that
need the private filesystem (mount namespace) skip on hosts that cannot give one
(``describe_isolation()`` says which); the fallback's own guarantees (clean-up
by uid, deep trees) are tested by forcing it.
"""

from __future__ import annotations

import glob
import os
import secrets
import socket
import stat
import tempfile
import textwrap
from pathlib import Path

import pytest

from helpers import sandbox_runners

from scope_opd.verifiers import SandboxLimits, code_score, describe_isolation
from scope_opd.verifiers import sandbox

FAST = SandboxLimits(wall_time_s=4.0, time_per_test_s=2.0, cpu_time_s=4, memory_mb=256, max_file_mb=4,
                     output_budget_mb=8)


run, stdout_of = sandbox_runners(FAST)


@pytest.fixture
def token():
    return f"scope-leak-{secrets.token_hex(6)}"


# ---------------------------------------------------------------- filesystems


def test_files_written_to_shared_temp_dirs_do_not_outlive_the_run(contained, token):
    writer = f"""
    for directory in ("/tmp", "/dev/shm", "/var/tmp", "/run/lock"):
        try:
            with open(directory + "/{token}", "w") as f:
                f.write("left behind")
            print("wrote", directory)
        except OSError as error:
            print("refused", directory, type(error).__name__)
    """
    try:
        stdout = stdout_of(writer)
        assert stdout.count("wrote") == 4  # the program has its own, private, temporary directories
        assert glob.glob(f"/*/{token}") + glob.glob(f"/*/*/{token}") == []
    finally:
        for leaked in glob.glob(f"/*/{token}") + glob.glob(f"/*/*/{token}"):
            os.unlink(leaked)


def test_dev_shm_and_tmp_share_one_bounded_budget(contained, token):
    filler = f"""
    import os
    written, paths = 0, []
    for directory in ("/dev/shm", "/tmp", "/var/tmp", "."):
        for index in range(30):
            paths.append(f"{{directory}}/{token}-{{index}}")
            try:
                with open(paths[-1], "wb") as f:
                    f.write(b"x" * 2 ** 20)
                written += 1
            except OSError:
                break
    for path in paths:  # stdout lives on the same budget: make room to print
        if os.path.exists(path):
            os.unlink(path)
    print(written)
    """
    try:
        written_mib = int(stdout_of(filler))
        # tmpfs size: the output budget, plus the (tiny) inputs and 1 MiB of slack.
        assert written_mib <= FAST.output_budget_mb + 1
    finally:
        for leaked in glob.glob(f"/*/{token}-*") + glob.glob(f"/*/*/{token}-*"):
            os.unlink(leaked)


def test_sysv_shared_memory_does_not_outlive_the_run(contained):
    key = 0x5C0BE000 + secrets.randbelow(0xFFF)
    creator = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    print(libc.shmget({key}, 1 << 20, 0o1000 | 0o600) >= 0)  # IPC_CREAT
    """
    # Refused outright now (seccomp, and shmmax = 0 in the run's IPC namespace); the host never sees the key.
    assert stdout_of(creator) == "False\n"
    host_keys = {int(line.split()[0]) for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}
    assert key not in host_keys


def test_the_host_filesystem_is_not_visible(contained, tmp_path):
    # A world-readable file, as a dataset with the gold answers would be.
    marker = f"gold-answer-{secrets.token_hex(6)}"
    public = Path(tempfile.mkdtemp(prefix="scope-public-"))
    try:
        public.chmod(0o755)
        (public / "dataset.jsonl").write_text(marker)
        (public / "dataset.jsonl").chmod(0o644)
        reader = f"""
        import os
        for path in ({str(public / "dataset.jsonl")!r}, {__file__!r}, "/etc/hostname", "/root"):
            try:
                print(open(path).read() if os.path.isfile(path) else os.listdir(path))
            except OSError as error:
                print("absent", path, type(error).__name__)
        print(sorted(os.listdir("/")))
        """
        stdout = stdout_of(reader)
    finally:
        (public / "dataset.jsonl").unlink()
        public.rmdir()
    assert marker not in stdout
    assert "test_the_host_filesystem_is_not_visible" not in stdout  # this very file, in the checkout
    assert stdout.count("absent") == 4
    top_level = set(eval(stdout.splitlines()[-1]))
    assert top_level <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc", "dev", "proc", "tmp",
                         "var", "run", "work"}


def test_the_interpreter_and_the_system_are_read_only(contained):
    writer = """
    import os, sys
    for path in (sys.executable, "/usr/lib/scope-new-file", "/etc/scope-new-file", "/scope-new-file"):
        try:
            open(path, "a").close()
            print("wrote", path)
        except OSError as error:
            print("refused", type(error).__name__)
    """
    assert "wrote" not in stdout_of(writer)


# ---------------------------------------------------------------- processes and memory


def test_host_processes_are_invisible(contained):
    lister = """
    import os
    pids = [name for name in os.listdir("/proc") if name.isdigit()]
    for pid in pids:
        try:
            print(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
        except OSError:
            pass
    print(len(pids), "processes")
    """
    stdout = stdout_of(lister)
    assert "pytest" not in stdout  # the trainer's (here: the test runner's) command line
    assert int(stdout.split()[-2]) <= 2  # pid 1 (the sandbox's supervisor) and the program


def test_memory_of_a_forking_program_is_bounded_for_the_whole_tree():
    # Each child stays under the per-process limit (256 MiB); together they would use 600 MiB.
    forker = """
    import os, time
    children = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            block = b"x" * (100 * 2 ** 20)
            time.sleep(3)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    print("done")
    """
    result = run(forker, limits=SandboxLimits(**{**FAST.__dict__, "wall_time_s": 8.0, "time_per_test_s": 6.0}))
    if not sandbox._isolation().contained:
        pytest.skip(f"the tree's memory is bounded only by processes x address space here ({describe_isolation()})")
    assert result.killed_for == "memory", result
    assert result.tests[0].status == "not_run"
    assert "memory limit" in result.tests[0].error
    assert code_score(f"```python\n{textwrap.dedent(forker)}```", {"inputs": ["\n"], "outputs": ["done\n"]},
                      limits=FAST) == 0.0


def test_concurrent_runs_get_distinct_uids():
    if os.geteuid() != 0 or not sandbox._isolation().random_uids:
        pytest.skip(f"no per-run uid on this host ({describe_isolation()})")
    programs = [("import os, time\ntime.sleep(0.5)\nprint(os.getuid())", ["\n"], None)] * 4
    runs = sandbox.run_programs(programs, limits=FAST, max_workers=4)
    uids = [int(result.tests[0].stdout) for result in runs]
    assert len(set(uids)) == 4 and all(uid >= sandbox._RANDOM_UID_BASE for uid in uids)


# ---------------------------------------------------------------- other runs, sockets


def test_a_run_cannot_read_a_sibling_runs_files():
    secret = f"sibling-secret-{secrets.token_hex(6)}"
    victim = f"""
    import time
    # {secret}
    open("notes.txt", "w").write("{secret}")
    time.sleep(1.5)
    print("victim done")
    """
    snoop = """
    import glob, os, time
    time.sleep(0.5)
    for pattern in ("/tmp/scope-sandbox-*/work/*", "/tmp/scope-sandbox-*/*/*", "/proc/*/cwd/*", "/proc/*/root/work/*"):
        for path in glob.glob(pattern):
            try:
                print(path, open(path, errors="replace").read())
            except OSError as error:
                print(path, type(error).__name__)
    print("snoop done")
    """
    runs = sandbox.run_programs([(textwrap.dedent(victim), ["\n"], None), (textwrap.dedent(snoop), ["\n"], None)],
                                limits=FAST, max_workers=2)
    assert runs[0].tests[0].stdout == "victim done\n"
    assert runs[1].tests[0].status == "ok", runs[1]
    assert secret not in runs[1].tests[0].stdout


def test_filesystem_unix_sockets_of_the_host_are_unreachable():
    public = Path(tempfile.mkdtemp(prefix="scope-socket-"))
    path = public / "trainer.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        public.chmod(0o755)
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(4)
        listener.settimeout(0.3)
        client = f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect({str(path)!r})
            s.sendall(b"hi")
            print("connected")
        except OSError as error:
            print("refused", type(error).__name__)
        """
        stdout = stdout_of(client)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        public.rmdir()
    assert stdout.startswith("refused")


# ---------------------------------------------------------------- output size


def test_sparse_stdout_files_count_against_one_output_budget():
    # Each test's stdout becomes a 3 MiB sparse file (under the 4 MiB file limit); 10 of them are 30 MiB.
    sparse = """
    import os
    print("x", flush=True)
    os.ftruncate(1, 3 * 2 ** 20)
    """
    result = run(sparse, inputs=["\n"] * 10)
    read_back = sum(len(test.stdout or "") for test in result.tests)
    assert read_back <= FAST.output_budget_mb * 2 ** 20
    # Each record is its stdout as JSON, where a NUL byte costs 6: the first test already goes over.
    assert all(test.status == "error" and "output budget" in test.error for test in result.tests), result.tests


def test_stderr_flood_is_cut_at_the_output_budget():
    flood = """
    import sys
    chunk = "e" * (1 << 20)
    for _ in range(64):
        sys.stderr.write(chunk)
    print("done")
    """
    result = run(flood)
    assert result.killed_for == "output_budget", result
    assert result.tests[0].status == "not_run"
    assert "output budget" in result.tests[0].error
    assert len(result.stderr_tail) <= 2000


# ---------------------------------------------------------------- deep nesting


DEEP_NESTER = """
import os
top = os.getcwd()
for base in (top, "/dev/shm"):  # /dev/shm: world-writable too, and tmpfs, so fast to fill on any host
    os.chdir(base)
    for _ in range(1500):  # deeper than Python's recursion limit (shutil.rmtree recursed per level)
        os.mkdir("d")
        os.chdir("d")
deep = ("[" * 100000 + "]" * 100000 + "\\n").encode()
for fd in range(3, 30):  # the results channel is one of these
    try:
        os.write(fd, deep)
    except OSError:
        pass
os.chdir(top)
print(42)
"""


def test_deep_directories_and_deep_json_neither_crash_nor_leak():
    result = run(DEEP_NESTER, limits=SandboxLimits(**{**FAST.__dict__, "wall_time_s": 20.0, "time_per_test_s": 15.0}))
    assert result.tests[0].status == "ok", result
    assert result.tests[0].stdout == "42\n"
    assert result.malformed_records >= 1


def test_deep_directories_are_cleaned_up_without_a_mount_namespace(monkeypatch):
    """The fallback: the work dir on the host, and what the uid left in /tmp, are removed, however deep."""
    if os.geteuid() != 0:
        pytest.skip("clean-up by uid needs root")
    fallback = next(
        (isolation for isolation in sandbox._candidate_isolations()
         if not isolation.contained and isolation.random_uids and sandbox._works(isolation)),
        None,
    )
    if fallback is None:
        pytest.skip("no fallback isolation with per-run uids on this host")
    monkeypatch.setattr(sandbox, "_isolation_cache", fallback)
    monkeypatch.setattr(tempfile, "tempdir", "/dev/shm")  # the work dir on tmpfs: thousands of mkdirs are slow on disk
    uids_before = _sandbox_owned_entries()
    result = run(DEEP_NESTER, limits=SandboxLimits(**{**FAST.__dict__, "wall_time_s": 20.0, "time_per_test_s": 15.0}))
    assert result.tests[0].stdout == "42\n", result
    assert result.malformed_records >= 1
    assert _sandbox_owned_entries() == uids_before == []
    assert glob.glob("/dev/shm/scope-sandbox-*") == []


def test_without_a_pid_namespace_a_lingering_child_does_not_hold_the_run_open(monkeypatch):
    """Its inherited pipes stay open, but the run ends when the harness does, not at the wall time."""
    fallback = next(
        (isolation for isolation in sandbox._candidate_isolations()
         if not isolation.namespaces and sandbox._works(isolation)),
        None,
    )
    if fallback is None:
        pytest.skip("no isolation without namespaces works here")
    monkeypatch.setattr(sandbox, "_isolation_cache", fallback)
    lingerer = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        time.sleep(600)
    print("parent done")
    """
    result = run(lingerer, limits=SandboxLimits(**{**FAST.__dict__, "wall_time_s": 30.0}))
    assert result.tests[0].stdout == "parent done\n"
    assert not result.timed_out and result.killed_for is None, result


def _sandbox_owned_entries() -> list[str]:
    owned = []
    for directory in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        for entry in os.scandir(directory):
            try:
                if entry.stat(follow_symlinks=False).st_uid >= sandbox._RANDOM_UID_BASE:
                    owned.append(entry.path)
            except OSError:
                continue
    return owned


def test_remove_tree_handles_deep_trees_and_symlinks():
    tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("must survive")
    top = tmp_path / "tree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(3000):  # deeper than PATH_MAX allows as one path, and than Python's recursion limit
            os.mkdir("d", dir_fd=fd)
            (Path(f"/proc/self/fd/{fd}") / "f").write_text("x")
            os.symlink(str(outside), "link", dir_fd=fd)
            next_fd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    sandbox._remove_tree(str(top))
    assert not top.exists()
    assert (outside / "keep").read_text() == "must survive"
    assert stat.S_ISDIR(os.lstat(outside).st_mode)
    sandbox._remove_tree(str(tmp_path))
