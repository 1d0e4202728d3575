"""Round 4 of the sandbox's red team (issue 18, after the seccomp filter and the trusted check):
memory the kernel holds for the run where no resident count of its processes shows it, and the
filter's own edges (other ABIs on x86_64).

Each route runs in the real sandbox against a small memory limit and holds at most a few hundred
MiB (the route is refused, so the tests hold almost nothing once fixed).
"""

from __future__ import annotations

import platform

import pytest

from helpers import sandbox_runners

from scope_opd.verifiers import SandboxLimits
from scope_opd.verifiers import sandbox

LIMITS = SandboxLimits(wall_time_s=8.0, time_per_test_s=6.0, cpu_time_s=8, memory_mb=128, max_file_mb=16,
                       output_budget_mb=8)


_, stdout_of = sandbox_runners(LIMITS)


def test_dev_zero_cannot_be_mapped_shared(contained):
    # A MAP_SHARED mapping of /dev/zero is shared anonymous memory with no MAP_ANONYMOUS flag for
    # the filter to see. Four holders each kept 64 MiB that a child had filled and left: 256 MiB
    # held against 128 MiB, never killed (each holder's own resident count stayed 0).
    source = """
    import mmap, os
    with open("/dev/zero", "rb") as zero:
        zeros = zero.read(4)
    try:
        descriptor = os.open("/dev/zero", os.O_RDWR)
        mmap.mmap(descriptor, 16 << 20, flags=mmap.MAP_SHARED)
        print("mapped", zeros)
    except OSError:
        print("refused", zeros)
    """
    assert stdout_of(source) == "refused b'\\x00\\x00\\x00\\x00'\n"


def test_sysv_message_queues_are_refused(contained):
    # 4000 queues of 16 KiB each took 64 MiB of kernel memory (32000 queues allowed by default: 512 MiB).
    source = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    queue = libc.msgget(0, 0o1600)
    print(queue, ctypes.get_errno() != 0, open("/proc/sys/kernel/msgmni").read().strip())
    """
    assert stdout_of(source) == "-1 True 0\n"


def test_sysv_semaphores_are_refused(contained):
    # 60 arrays of 32000 semaphores took 148 MiB of kernel memory; the defaults allow 32000 arrays.
    source = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    array = libc.semget(0, 32000, 0o1600)
    print(array, ctypes.get_errno() != 0, open("/proc/sys/kernel/sem").read().split())
    """
    assert stdout_of(source) == "-1 True ['0', '0', '0', '0']\n"


def test_io_uring_is_refused(contained):
    # Ring memory is kernel memory (bounded here only by RLIMIT_MEMLOCK, which the host sets), and
    # io_uring operations are not seen by the seccomp filter at all.
    source = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(425, 8, params)
    print(ring, ctypes.get_errno())
    """
    assert stdout_of(source) == "-1 1\n"


# On x86_64 the same process can make i386 system calls (int 0x80) and x32 ones (number | 0x40000000),
# whose numbers differ: the filter must kill the process for both, not read them as x86_64 numbers.
ANOTHER_ABI = """
import ctypes, mmap, os
code = {code}
page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
child = os.fork()
if child == 0:
    ctypes.CFUNCTYPE(ctypes.c_long)(address)()
    os._exit(0)
print(os.waitpid(child, 0)[1] & 0x7F)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="i386 and x32 system calls exist only on x86_64")
@pytest.mark.parametrize(
    "code",
    [
        # mov eax, 29 (i386: pause; as x86_64: shmget) ; int 0x80 ; ret
        b"\xb8\x1d\x00\x00\x00\xcd\x80\xc3",
        # mov eax, 0x40000000 | 29 (x32 shmget) ; syscall ; ret
        b"\xb8\x1d\x00\x00\x40\x0f\x05\xc3",
    ],
    ids=["i386-int-0x80", "x32"],
)
def test_other_abis_are_killed_on_x86_64(contained, code):
    assert stdout_of(ANOTHER_ABI.format(code=code)) == "31\n"  # SIGSYS


FORGED_HUGE_RECORD = """
import os
def f(x):
    # Written straight to the results pipe, in the harness's shape: 2 million empty lists in 6 MiB,
    # which parsed would be 128 MiB of the verifier's memory (64 MiB of them, 1.5 GiB).
    os.write(1, b'{"test": 0, "status": "ok", "error": "", "returned": [' + b"[]," * 2000000 + b'[]]}\\n')
    os._exit(0)
"""


def test_a_record_too_many_values_to_parse_is_an_error_not_verifier_memory():
    from scope_opd.verifiers.code import code_score

    run = sandbox.run_program(FORGED_HUGE_RECORD, [[1]], fn_name="f", limits=LIMITS)
    assert run.tests[0].status == "error" and "JSON values" in run.tests[0].error, run.tests[0]
    assert code_score(FORGED_HUGE_RECORD, {"fn_name": "f", "inputs": [[1]], "outputs": [[]]}, limits=LIMITS) == 0.0


def test_big_honest_outputs_still_pass():
    # Within the bound: a return value of 200,000 items, and a stdout of 3 MiB with commas and brackets.
    from scope_opd.verifiers.code import code_score

    listing = "def f(n):\n    return [[i] for i in range(n)]\n"
    assert code_score(listing, {"fn_name": "f", "inputs": [[200000]], "outputs": [[[i] for i in range(200000)]]},
                      limits=LIMITS) == 1.0
    printing = "n = int(input())\nprint(','.join('[%d]' % i for i in range(n)))\n"
    expected = ",".join("[%d]" % i for i in range(400000)) + "\n"
    assert code_score(printing, {"inputs": ["400000\n"], "outputs": [expected]}, limits=LIMITS) == 1.0


def test_socket_buffers_cannot_be_enlarged(contained):
    # What Unix sockets hold queued is kernel memory: with SO_SNDBUF raised to the host's wmem_max
    # (4 MiB here), one process's 28 datagram socket pairs held 217 MiB against a 128 MiB limit.
    source = """
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    refused = []
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            a.setsockopt(socket.SOL_SOCKET, option, 1 << 24)
            refused.append(False)
        except PermissionError:
            refused.append(True)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # other options still work
    a.send(b"ping")
    print(refused, b.recv(10))
    """
    assert stdout_of(source) == "[True, True] b'ping'\n"


def test_inotify_is_refused(contained):
    # Each watch pins an inode in the kernel's caches, with no file descriptor per watch: one
    # instance over /usr held 33219 watches (+50 MiB of slab) in 4 s, up to max_user_watches per uid.
    source = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    print(libc.inotify_init1(0), ctypes.get_errno())
    """
    assert stdout_of(source) == "-1 1\n"
