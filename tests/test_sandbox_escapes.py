"""Round 3 of the sandbox's red team: memory the resident-anonymous count did not see, keyrings,
capabilities in a user namespace of the program's own, and records forged on the results pipe.

Each route runs in the real sandbox against a small memory limit (a few hundred
MiB held across processes against 192 MiB), so it is quick; a route is either
refused by the kernel (seccomp, the run's IPC namespace sysctls) or counted by
pid 1 and the run killed for memory.
"""

from __future__ import annotations

import platform
import warnings

import pytest

from helpers import sandbox_runners

from scope_opd.verifiers import RewardFunction, SandboxLimits, SandboxUnavailable, code_score
from scope_opd.verifiers import sandbox

LIMITS = SandboxLimits(wall_time_s=8.0, time_per_test_s=6.0, cpu_time_s=8, memory_mb=192, max_file_mb=64,
                       output_budget_mb=8)


run, stdout_of = sandbox_runners(LIMITS)


# Four processes, each under the per-process address-space limit, together 400 MiB of the given kind.
HOLD_IN_CHILDREN = """
import mmap, os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = {allocate}
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        time.sleep(4)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print("held 400 MiB")
"""


def test_memory_held_across_processes_is_counted(contained):
    # Ordinary memory: was already counted, must stay so (through RssAnon now).
    result = run(HOLD_IN_CHILDREN.format(allocate="bytearray(100 << 20)"))
    assert result.killed_for == "memory", result
    assert result.tests[0].status == "not_run" and "192 MiB memory limit" in result.tests[0].error


def test_shared_anonymous_mappings_are_refused(contained):
    # MAP_SHARED|MAP_ANONYMOUS pages count only in processes that touched them: children could fill
    # one mapping piece by piece and exit, leaving the pages to a parent whose resident count is 0.
    source = """
    import mmap
    try:
        mmap.mmap(-1, 100 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        print("mapped")
    except PermissionError:
        private = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        private[0] = 1
        print("refused, private still works")
    """
    assert stdout_of(source) == "refused, private still works\n"


def test_shared_memory_on_a_file_is_bounded_by_the_runs_tmpfs(contained):
    # The other way to share memory: files in /dev/shm, mapped shared. They live in the run's
    # tmpfs, capped at the output budget (8 MiB here): past it, touching a page is SIGBUS.
    source = """
    import mmap, os, signal
    children = []
    for part in range(3):  # 3 x 6 MiB
        pid = os.fork()
        if pid == 0:
            descriptor = os.open("/dev/shm/hold%d" % part, os.O_RDWR | os.O_CREAT)
            os.ftruncate(descriptor, 6 << 20)  # sparse: no page yet
            block = mmap.mmap(descriptor, 6 << 20, flags=mmap.MAP_SHARED)
            for offset in range(0, 6 << 20, 4096):
                block[offset] = 1
            os._exit(0)
        children.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    for part in range(3):  # room again for this test's stdout, which lives in the same tmpfs
        os.unlink("/dev/shm/hold%d" % part)
    print(any(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS for status in statuses))
    """
    assert stdout_of(source) == "True\n"


def test_sysv_shared_memory_is_refused_in_the_runs_ipc_namespace(contained):
    source = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    held = 0
    for _ in range(12):  # 384 MiB against a 192 MiB limit, detached: no process maps it
        segment = libc.shmget(0, 32 << 20, 0o1000 | 0o600)
        if segment < 0:
            break
        address = libc.shmat(segment, None, 0)
        ctypes.memset(address, 1, 32 << 20)
        libc.shmdt(ctypes.c_void_p(address))
        held += 32
    print(held, open("/proc/sys/kernel/shmmax").read().strip(), open("/proc/sys/kernel/shmall").read().strip())
    """
    assert stdout_of(source) == "0 0 0\n"


def test_memfd_create_is_refused(contained):
    source = """
    import os
    try:
        descriptor = os.memfd_create("hold")
        for _ in range(12):
            os.write(descriptor, b"x" * (32 << 20))
        print("held")
    except PermissionError:
        print("refused")
    """
    assert stdout_of(source) == "refused\n"


def test_no_user_namespace_so_no_capabilities_and_no_private_tmpfs(contained):
    source = """
    import ctypes, os, platform
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
    results = []
    results.append(libc.unshare(CLONE_NEWUSER) == -1 and ctypes.get_errno() == 1)
    results.append(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == -1 and ctypes.get_errno() == 1)
    if platform.machine() == "x86_64":  # clone(2) itself, as fork with a new user namespace
        child = libc.syscall(56, CLONE_NEWUSER | 17, 0, 0, 0, 0)
        if child == 0:
            os._exit(0)
        results.append(child == -1 and ctypes.get_errno() == 1)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    capabilities = [int(status[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]
    print(all(results), capabilities, status["Seccomp"].strip(), status["NoNewPrivs"].strip())
    """
    assert stdout_of(source) == "True [0, 0, 0, 0, 0] 2 1\n"


def test_ordinary_programs_still_fork_thread_and_run_subprocesses(contained):
    source = """
    import subprocess, sys, threading, multiprocessing
    box = []
    thread = threading.Thread(target=lambda: box.append(1))
    thread.start(); thread.join()
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout.strip()
    print(box, squares, out)
    """
    assert stdout_of(source) == "[1] [1, 2, 3] 42\n"


def test_kernel_keyrings_are_refused(contained):
    # A world-readable key in the run uid's user keyring (-4), then a read of it by id.
    numbers = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no keyring syscall numbers for {platform.machine()} in this test")
    add_key, request_key, keyctl = numbers
    writer = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall({add_key}, b"user", b"scope-sandbox-leak", b"secret", 6, -4)
    if key > 0:
        libc.syscall({keyctl}, 5, key, 0x3F3F3F3F)  # KEYCTL_SETPERM: everyone may read
    print(key, ctypes.get_errno())
    """
    assert stdout_of(writer) == "-1 1\n"
    reader = f"""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    found = libc.syscall({keyctl}, 10, -4, b"user", b"scope-sandbox-leak", 0)  # KEYCTL_SEARCH, user keyring
    errors = [ctypes.get_errno()]
    found = libc.syscall({request_key}, b"user", b"scope-sandbox-leak", None, 0)
    errors.append(ctypes.get_errno())
    print(found, errors)
    """
    assert stdout_of(reader) == "-1 [1, 1]\n"


# ---------------------------------------------------------------- the results pipe and logs

FORGE_ON_EVERY_FD = """
import json, os
for descriptor in range(2, 40):  # all but its own stdout: the results pipe among them
    try:
        os.write(descriptor, ("\\n" + json.dumps({record}) + "\\n").encode())
    except OSError:
        pass
a, b = map(int, input().split())
print(a + b)
"""


@pytest.mark.parametrize(
    "record",
    [
        {"setup_error": "forged\nWARNING injected line"},
        {"supervisor": "memory", "error": "forged kill"},
    ],
    ids=["setup_error", "supervisor"],
)
def test_a_program_cannot_write_records_the_parent_trusts(contained, record):
    source = FORGE_ON_EVERY_FD.format(record=record)
    result = run(source, inputs=["1 2\n"])
    assert result.killed_for is None, result
    assert result.tests[0].status == "ok" and result.tests[0].stdout.endswith("3\n")
    assert result.malformed_records >= 1  # the forged line, counted and ignored
    completion = f"```python\n{source}```"
    assert code_score(completion, {"inputs": ["1 2\n"], "outputs": ["3\n"]}, limits=LIMITS) == 1.0


def _raise_program_text(completion: str, gold: object) -> float:
    raise RuntimeError(completion)


def test_program_text_in_the_reward_warning_is_escaped_and_cut():
    reward = RewardFunction(_raise_program_text, max_workers=1, name="hostile")
    text = "line one\nWARNING forged line\r\x1b[31mred\x1b[0m" + "x" * 100_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reward.score([text], ["gold"]) == [0.0]
    (warning,) = [w for w in caught if "hostile" in str(w.message)]
    message = str(warning.message)
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "\\n" in message and "\\x1b" in message
    assert len(message) < 1000


def test_setup_errors_still_reach_the_parent(contained, monkeypatch):
    # The control pipe carries pid 1's real set-up errors: here the tmpfs mount, refused by the kernel.
    monkeypatch.setattr(sandbox, "_TMPFS_INODES", -10**6)
    with pytest.raises(SandboxUnavailable, match="could not be set up: .*mount tmpfs"):
        sandbox._execute(sandbox._isolation(), "print(1)", ["\n"], None, LIMITS, False)


def test_the_control_pipe_is_closed_before_the_program_runs(contained):
    # Every descriptor the program holds: stdin, the test's stdout, stderr, and the results pipe.
    source = """
    import os
    print(sorted(int(name) for name in os.listdir("/proc/self/fd")))
    """
    descriptors = [int(fd) for fd in stdout_of(source).strip(" []\n").split(",")]
    assert len(descriptors) <= 5, descriptors  # the listing's own descriptor included
