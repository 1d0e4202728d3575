"""The code verifier and its sandbox: hostile programs are contained and score 0, correct ones score 1.

The limits below are small so that each hostile program fails fast; the fork bomb
runs under RLIMIT_NPROC and an unprivileged uid (or the current user's limit when
not root), so it cannot exhaust this machine's process table.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from scope_opd.verifiers import RewardFunction, SandboxLimits, code_pass_fraction, code_score, describe_isolation
from scope_opd.verifiers import sandbox
from scope_opd.verifiers.code import parse_test_cases, returned_matches, stdout_matches
from scope_opd.verifiers.registry import InvalidGoldError

FAST = SandboxLimits(wall_time_s=4.0, time_per_test_s=1.5, cpu_time_s=4, memory_mb=256, max_file_mb=4)

ADD_TESTS = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}


def fenced(source: str) -> str:
    return f"Here is my solution.\n```python\n{textwrap.dedent(source).strip()}\n```\n"


def stdio_gold(expected_output: str) -> dict:
    return {"inputs": ["\n"], "outputs": [expected_output]}


def _uid_lease_is_held(uid: int) -> bool:
    """Whether a run still holds ``uid`` (its flock'd lease file): a run of another process, such as the other
    pytest-xdist worker or another test session on this host, whose processes are not left behind but running."""
    from scope_opd.verifiers._sandbox_host import _state_dir

    try:
        fd = os.open(_state_dir() / "uids" / str(uid - sandbox._RANDOM_UID_BASE), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the fd below: runs pick free slots
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _sandbox_uid_processes(wait_s: float = 5.0) -> list[int]:
    """Live processes left under the sandbox's throw-away uids by runs that have ended (root only), once none are
    left or after ``wait_s``. A uid whose lease a run still holds is that run's, not a leftover."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            except OSError:  # exited while we looked
                continue
            real_uid = int(fields["Uid"].split()[0])
            if (real_uid >= sandbox._RANDOM_UID_BASE and not fields["State"].strip().startswith("Z")
                    and not _uid_lease_is_held(real_uid)):
                pids.append(int(status.parent.name))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


# ---------------------------------------------------------------- correct programs


def test_correct_stdin_stdout_solution_scores_one():
    completion = fenced(
        """
        a, b = map(int, input().split())
        print(a + b)
        """
    )
    assert code_score(completion, ADD_TESTS, limits=FAST) == 1.0
    assert code_score(completion, json.dumps(ADD_TESTS), limits=FAST) == 1.0  # TACO stores the JSON text


def test_stdin_is_a_real_file_descriptor():
    completion = fenced(
        """
        import sys
        data = sys.stdin.buffer.read().split()
        sys.stdout.write(str(int(data[0]) + int(data[1])) + "\\n")
        """
    )
    assert code_score(completion, ADD_TESTS, limits=FAST) == 1.0


def test_correct_function_call_solutions_score_one():
    gold = {"fn_name": "add", "inputs": [[1, 2], [10, -3]], "outputs": [[3], [7]]}  # TACO wraps returns in a list
    assert code_score(fenced("def add(a, b):\n    return a + b"), gold, limits=FAST) == 1.0
    leetcode = fenced(
        """
        class Solution:
            def add(self, a, b):
                return a + b
        """
    )
    assert code_score(leetcode, gold, limits=FAST) == 1.0
    assert code_score(fenced("def add(a, b):\n    return a - b"), gold, limits=FAST) == 0.0


def test_completion_without_fence_is_run_whole():
    assert code_score("a, b = map(int, input().split())\nprint(a + b)\n", ADD_TESTS, limits=FAST) == 1.0


def test_wrong_or_broken_programs_score_zero():
    assert code_score(fenced("print(0)"), ADD_TESTS, limits=FAST) == 0.0
    assert code_score(fenced("def f(:\n    pass"), ADD_TESTS, limits=FAST) == 0.0
    assert code_score(fenced("raise SystemExit(1)"), ADD_TESTS, limits=FAST) == 0.0


def test_pass_fraction_counts_each_test():
    gold = {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "4\n", "10\n"]}
    completion = fenced("n = int(input())\nprint(n * n)")
    assert code_pass_fraction(completion, gold, limits=FAST) == pytest.approx(2 / 3)
    assert code_score(completion, gold, limits=FAST) == 0.0


def test_output_comparison_rules():
    assert stdout_matches("3  \n\n", "3\n")
    assert stdout_matches("1 2\n3\n", ["1 2", "3"])
    assert stdout_matches("0.3333333\n", "0.333333333\n")
    assert not stdout_matches("0.34\n", "0.33\n")
    assert not stdout_matches("1 2\n", "1 2 3\n")
    assert returned_matches([1, 2], [[1, 2]])
    assert returned_matches(True, True)
    assert not returned_matches([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    "actual, expected",
    [
        ("1000001\n", "1000000\n"),  # off by one
        (f"{10**9 + 7 - 1000 + 500}\n", f"{10**9 + 7 - 1000}\n"),  # off by 500 near 10^9+7
        ("123456889\n", "123456789\n"),  # off by 100
        (f"{2**100 + 1}\n", f"{2**100}\n"),  # beyond float precision
        ("3.0000001\n", "3\n"),  # an integer answer has no tolerance
        ("1e6\n", "1000001\n"),
        ("-1\n", "1\n"),
        ("True\n", "1\n"),
        ("nan\n", "1.5\n"),
        ("inf\n", "1e308\n"),
        ("NaN\n", "nan\n"),  # non-numeric words compare as strings, exactly
        ("0.1\n", "0.2\n"),
        ("1.000002\n", "1.0\n"),  # just outside the float tolerance
    ],
)
def test_stdout_comparison_has_no_false_passes(actual, expected):
    assert not stdout_matches(actual, expected)


@pytest.mark.parametrize(
    "actual, expected",
    [
        (f"{10**30}\n", f"{10**30}\n"),
        ("3.0\n", "3\n"),  # the same integer value, as LiveCodeBench's Decimal comparison accepts
        ("-0\n", "0\n"),
        ("-0.0\n", "0.0\n"),  # the same float value
        ("0.3333333\n", "0.333333333\n"),  # within 1e-6 of a float answer
        ("1.0000005\n", "1.0\n"),
        ("nan\n", "nan\n"),
        ("inf -inf\n", "inf -inf\n"),
        ("1 2\n3\n", "1 2 3"),  # tokens, whatever the line breaks
    ],
)
def test_stdout_comparison_accepts_equal_values(actual, expected):
    assert stdout_matches(actual, expected)


@pytest.mark.parametrize(
    "actual, expected",
    [
        (1, True),  # bool and int are different types
        (0, [False]),
        (True, 1),
        ([1, 0], [True, False]),
        (10**18 + 1, 10**18),
        (3.0000001, 3),
        (1.00001, 1.0),
        (float("nan"), 1.0),
        (float("inf"), 1e308),
        ("1", 1),
        (None, 0),
        ({"a": 1}, {"a": True}),
        ({"a": 1}, {"b": 1}),
        ([1, 2], [1, 2, 3]),
    ],
)
def test_returned_value_comparison_has_no_false_passes(actual, expected):
    assert not returned_matches(actual, expected)


@pytest.mark.parametrize(
    "actual, expected",
    [
        (True, True),
        (True, [True]),  # TACO's one-element wrapping
        (10**30, 10**30),
        (3.0, 3),
        (-0.0, 0.0),
        (0.1 + 0.2, 0.3),
        (float("nan"), float("nan")),
        (float("-inf"), float("-inf")),
        ([[1, 2], {"k": [None, "s"]}], [[1, 2], {"k": [None, "s"]}]),
    ],
)
def test_returned_value_comparison_accepts_equal_values(actual, expected):
    assert returned_matches(actual, expected)


def test_function_returning_an_int_for_a_bool_problem_scores_zero():
    gold = {"fn_name": "is_even", "inputs": [[2], [3]], "outputs": [[True], [False]]}
    assert code_score(fenced("def is_even(n):\n    return 1 if n % 2 == 0 else 0"), gold, limits=FAST) == 0.0
    assert code_score(fenced("def is_even(n):\n    return n % 2 == 0"), gold, limits=FAST) == 1.0


def test_deeply_nested_values_compare_without_recursion_error():
    deep_actual, deep_expected, deep_other = [], [], [1]
    for _ in range(100_000):
        deep_actual, deep_expected, deep_other = [deep_actual], [deep_expected], [deep_other]
    assert returned_matches(deep_actual, deep_expected)
    assert not returned_matches(deep_actual, deep_other)
    with pytest.raises(InvalidGoldError, match="nested"):
        parse_test_cases('{"inputs": ' + "[" * 100_000 + "]" * 100_000 + ', "outputs": [1]}')


@pytest.mark.parametrize(
    "gold, message",
    [
        ("{not json", "not valid JSON"),
        ({"inputs": ["1"]}, "need 'inputs' and 'outputs'"),
        ({"inputs": ["1"], "outputs": []}, "1 test inputs but 0"),
        ({"inputs": [], "outputs": []}, "no test cases"),
        ([1, 2], "must be a dict"),
    ],
)
def test_malformed_test_cases_are_invalid_gold(gold, message):
    with pytest.raises(InvalidGoldError, match=message):
        parse_test_cases(gold)


# ---------------------------------------------------------------- hostile programs


def test_infinite_loop_is_stopped_and_scores_zero():
    start = time.monotonic()
    assert code_score(fenced("while True:\n    pass"), stdio_gold("done"), limits=FAST) == 0.0
    assert time.monotonic() - start < FAST.wall_time_s + 10


def test_program_that_disarms_the_test_alarm_is_killed_at_wall_time():
    limits = SandboxLimits(wall_time_s=2.0, time_per_test_s=0.5, cpu_time_s=4)
    source = """
    import signal, time
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(600)
    """
    start = time.monotonic()
    run = sandbox.run_program(textwrap.dedent(source), ["\n"], limits=limits)
    assert run.timed_out
    assert run.tests[0].status == "not_run"
    assert time.monotonic() - start < limits.wall_time_s + 10


def _assert_process_limit_is_in_force() -> None:
    """Checked before each fork bomb, so a broken limit fails a test instead of filling the process table."""
    probe = "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    run = sandbox.run_program(probe, ["\n"], limits=FAST)
    assert run.tests[0].stdout == f"{FAST.max_processes}\n", run
    if os.geteuid() == 0:
        uid = sandbox.run_program("import os\nprint(os.getuid())", ["\n"], limits=FAST).tests[0].stdout
        assert int(uid) != 0  # the kernel ignores RLIMIT_NPROC for uid 0


def test_fork_bomb_is_contained_and_leaves_no_process_behind():
    _assert_process_limit_is_in_force()
    bomb = fenced(
        """
        import os
        while True:
            os.fork()
        """
    )
    assert code_score(bomb, stdio_gold("done"), limits=FAST) == 0.0
    if os.geteuid() == 0:
        assert _sandbox_uid_processes() == []


def test_processes_that_leave_the_process_group_are_still_killed():
    escapee = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        time.sleep(600)
    print("parent done")
    """
    run = sandbox.run_program(textwrap.dedent(escapee), ["\n"], limits=FAST)
    assert run.tests[0].stdout == "parent done\n"
    if os.geteuid() == 0:
        assert _sandbox_uid_processes() == []


def test_memory_hog_scores_zero():
    hog = fenced(
        """
        chunks = []
        while True:
            chunks.append(bytearray(10 ** 7))
        print("done")
        """
    )
    assert code_score(hog, stdio_gold("done"), limits=FAST) == 0.0
    run = sandbox.run_program("x = bytearray(2 * 1024 ** 3)\n", ["\n"], limits=FAST)
    assert "MemoryError" in run.tests[0].error


def test_large_file_write_is_cut_at_the_file_size_limit():
    writer = fenced(
        """
        with open("big.bin", "wb") as f:
            f.write(b"x" * (16 * 1024 * 1024))
        print("done")
        """
    )
    assert code_score(writer, stdio_gold("done"), limits=FAST) == 0.0
    run = sandbox.run_program("print('y' * (8 * 1024 * 1024))\n", ["\n"], limits=FAST)
    assert run.tests[0].status == "error"


def test_parent_environment_secrets_do_not_reach_the_program(monkeypatch):
    secret = "scope-test-secret-7f3a9c"
    monkeypatch.setenv("SCOPE_TEST_SECRET", secret)
    reader = f"""
    import os
    print(os.environ.get("SCOPE_TEST_SECRET", "absent"))
    try:
        print(open("/proc/{os.getpid()}/environ", "rb").read().decode(errors="replace"))
    except OSError as error:
        print("denied", type(error).__name__)
    """
    assert code_score(fenced(reader), stdio_gold(secret), limits=FAST) == 0.0
    run = sandbox.run_program(textwrap.dedent(reader), ["\n"], limits=FAST)
    stdout = run.tests[0].stdout
    assert stdout.startswith("absent\n")
    if os.geteuid() == 0:  # as root the program runs under another uid, so the parent's /proc is closed to it
        assert secret not in stdout
        assert "denied" in stdout


def test_expected_outputs_never_enter_the_sandbox():
    snoop = """
    import os
    for root, _, files in os.walk("."):
        for name in files:
            print(open(os.path.join(root, name), errors="replace").read())
    """
    expected = "the-expected-output-91c2"
    assert code_score(fenced(snoop), stdio_gold(expected), limits=FAST) == 0.0
    run = sandbox.run_program(textwrap.dedent(snoop), ["\n"], limits=FAST)
    assert expected not in run.tests[0].stdout


def test_files_the_program_tampers_with_are_read_safely():
    """The parent reads the sandbox's files as root: a FIFO would block it, a symlink could point anywhere."""
    swap_stdout_for_fifo = """
    import os
    os.unlink("stdout_0.txt")
    os.mkfifo("stdout_0.txt")
    """
    swap_stdout_for_symlink = """
    import os
    os.unlink("stdout_0.txt")
    os.symlink("/etc/hostname", "stdout_0.txt")
    """
    garbage_results = """
    with open("results.jsonl", "a") as results:
        results.write("not json\\n{\\"test\\": \\"x\\"}\\n[1, 2]\\n")
    print(42)
    """
    for source in (swap_stdout_for_fifo, swap_stdout_for_symlink):
        run = sandbox.run_program(textwrap.dedent(source), ["\n"], limits=FAST)
        assert run.tests[0].status == "error"
        assert "not a regular file" in run.tests[0].error
    run = sandbox.run_program(textwrap.dedent(garbage_results), ["\n"], limits=FAST)
    assert run.tests[0].stdout == "42\n"


@pytest.fixture
def listening_socket():
    """A TCP listener on 127.0.0.1 owned by this test: the only address the network tests ever try."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    yield listener
    listener.close()


def _connections_accepted(listener: socket.socket) -> int:
    accepted = 0
    try:
        while True:
            connection, _ = listener.accept()
            connection.close()
            accepted += 1
    except (socket.timeout, BlockingIOError):
        return accepted


def test_network_connection_fails_and_scores_zero(listening_socket):
    port = listening_socket.getsockname()[1]
    client = f"""
    import socket
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hi")
    print("connected")
    """
    assert code_score(fenced(client), stdio_gold("connected"), limits=FAST) == 0.0
    assert _connections_accepted(listening_socket) == 0


def test_raw_socket_bypass_is_stopped_by_the_network_namespace(listening_socket):
    if not sandbox._isolation().namespaces:
        pytest.skip(f"no network namespace on this host ({describe_isolation()})")
    port = listening_socket.getsockname()[1]
    # _socket sidesteps the harness's Python-level block; only the namespace stops it.
    client = f"""
    import _socket
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", {port}))
    print("connected")
    """
    run = sandbox.run_program(textwrap.dedent(client), ["\n"], limits=FAST)
    assert run.tests[0].status == "error"
    assert _connections_accepted(listening_socket) == 0


def test_every_isolation_this_host_supports_contains_a_fork_bomb(monkeypatch):
    """The fallbacks (no namespaces, Popen(user=), uid 65534) are what other hosts get: check them here too."""
    working = [isolation for isolation in sandbox._candidate_isolations() if sandbox._works(isolation)]
    assert working, "no sandbox isolation works on this host"
    bomb = """
    import os, time
    if ESCAPE and os.fork() == 0:
        os.setsid()
        time.sleep(600)
    while True:
        os.fork()
    """
    for isolation in working:
        # Without a pid namespace or a fresh uid, nothing can find a process that
        # left the process group (the documented weakest mode): no escapee there.
        can_kill_escapees = isolation.namespaces or isolation.random_uids
        source = textwrap.dedent(bomb).replace("ESCAPE", str(can_kill_escapees))
        monkeypatch.setattr(sandbox, "_isolation_cache", isolation)
        _assert_process_limit_is_in_force()
        run = sandbox.run_program(source, ["\n"], limits=FAST)
        assert run.tests[0].status == "error", isolation.describe()
        assert "Resource temporarily unavailable" in run.tests[0].error, isolation.describe()
        if os.geteuid() == 0 and isolation.random_uids:
            assert _sandbox_uid_processes() == [], isolation.describe()


# ---------------------------------------------------------------- batches


def test_run_programs_runs_a_batch_in_parallel_in_order():
    programs = [(f"print(int(input()) * {k})", [f"{k}\n"], None) for k in range(6)]
    runs = sandbox.run_programs(programs, limits=FAST, max_workers=3)
    assert [run.tests[0].stdout for run in runs] == [f"{k * k}\n" for k in range(6)]


def test_code_reward_function_scores_a_mixed_batch_without_verifier_timeouts():
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),
        fenced("while True:\n    pass"),
        [{"role": "assistant", "content": fenced("print(3)")}],
    ]
    verifier = functools.partial(code_score, limits=FAST)
    with RewardFunction(verifier, timeout_s=30, max_workers=2, name="code") as reward, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = reward(prompts=None, completions=completions, answer=[ADD_TESTS, ADD_TESTS, "{bad json"])
        assert scores == [1.0, 0.0, 0.0]
        assert reward.stats["timeouts"] == 0  # the sandbox's own wall time ends the loop first
        assert reward.stats["invalid_gold"] == 1


# ---------------------------------------------------------------- the verifier's own memory

# VmHWM, this process's own peak (KiB): ru_maxrss would start at the peak of the pytest process that started it
# (Linux carries it over the exec), which hides any growth below it once a worker has run the real-model tests.
_PEAK_OF_SCORING = """
import sys
from scope_opd.verifiers import SandboxLimits, code_score
def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
limits = SandboxLimits(wall_time_s=20, time_per_test_s=15, cpu_time_s=20, max_file_mb=64, output_budget_mb=64)
assert code_score("print(1)", {"inputs": ["\\n"], "outputs": ["1\\n"]}, limits=limits) == 1.0  # the probe, warm
before = peak_kib()
program = "import sys\\nsys.stdout.write('10\\\\n' * (20 * 2 ** 20 // 3))\\n"  # 20 MiB, 7 million short lines
score = code_score(program, {"inputs": ["\\n"], "outputs": ["10\\n10\\n"]}, limits=limits)
print(score, (peak_kib() - before) // 1024)
"""


def test_comparing_millions_of_short_lines_costs_a_few_copies_of_the_output_not_a_list_of_them():
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", _PEAK_OF_SCORING], capture_output=True, text=True, timeout=300,
                               check=False)
    if "SandboxUnavailable" in completed.stderr:
        pytest.skip("no code sandbox on this host")
    score, grown_mib = completed.stdout.split()
    assert score == "0.0"
    # Lists of 7 million line objects took ~1 GiB here (1.6 GB for 33 MB); a few copies of 20 MiB now.
    assert int(grown_mib) < 200, completed.stdout


def test_lines_are_split_where_splitlines_splits():
    from scope_opd.verifiers.code import _lines

    separators = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    pieces = ["", "a", " b ", "\t"] + separators
    texts = [a + b + c for a in pieces for b in pieces for c in pieces]
    for text in texts:
        assert list(_lines(text)) == text.splitlines(), repr(text)
    assert stdout_matches("1\r\n2\x85 3  \n\n", "1\n2\n3") and not stdout_matches("1\n2\n3\n4", "1\n2\n3")
