"""Sandbox throughput: the `code` verifier with its pool against plain `subprocess.run`, side by side.

N generated programs (correct, wrong, infinite loop, crash, heavy output, in
turn), each with --tests stdin/stdout test cases, are scored twice per round:

* sandboxed: ``code_score`` through a ``RewardFunction`` pool of --threads
  worker processes (the trainer's path: isolation, limits, one interpreter per
  program for all of its tests);
* plain: a thread pool of --threads running ``subprocess.run([python, file])``
  once per test, no isolation, stopping at the first failed test as
  ``code_score`` does; the same per-test time limit, as an alarm set once the
  interpreter has started (as the sandbox's harness does), with the sandbox's
  wall time as the backstop.

Both should give the expected scores (counted; a warning says how many did
not). Rounds alternate between the two; the median of each is printed, with
the machine, and the last line is
``sandbox overhead: X programs/s sandboxed vs Y plain (Z x)``.

    python benchmarks/bench_sandbox.py [--n 40] [--tests 4] [--threads N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from scope_opd.verifiers import RewardFunction, SandboxLimits, code_score, describe_isolation, sandbox
from scope_opd.verifiers.code import stdout_matches

LIMITS = SandboxLimits(wall_time_s=4.0, time_per_test_s=1.0, cpu_time_s=4, memory_mb=512, max_file_mb=16)

PROGRAMS = {
    "correct": "a, b = map(int, input().split())\nprint(a + b)\n",
    "wrong": "a, b = map(int, input().split())\nprint(a + b + 1)\n",
    "infinite loop": "while True:\n    pass\n",
    "crash": "a, b = map(int, input().split())\nprint(a // (b - b))\n",
    "heavy output": "import sys\nsys.stdout.write('7 ' * 400000)\nprint(sum(map(int, input().split())))\n",
}


# SIGALRM's default action ends the process: the per-test limit, counted from interpreter start-up.
_ALARMED_RUN = (
    "import signal, sys; signal.setitimer(signal.ITIMER_REAL, {seconds}); path = sys.argv[1]; "
    "exec(compile(open(path).read(), path, 'exec'), {{'__name__': '__main__'}})"
)


def make_batch(n: int, tests: int, kinds: list[str]) -> list[tuple[str, str, dict]]:
    """(kind, source, gold) for n programs; kinds in turn."""
    batch = []
    for index in range(n):
        kind = kinds[index % len(kinds)]
        pairs = [(index + t, 3 * t - index) for t in range(tests)]
        gold = {"inputs": [f"{a} {b}\n" for a, b in pairs], "outputs": [f"{a + b}\n" for a, b in pairs]}
        batch.append((kind, PROGRAMS[kind], gold))
    return batch


def plain_score(python: str, source: str, gold: dict, workdir: str) -> float:
    fd, path = tempfile.mkstemp(suffix=".py", dir=workdir)
    with os.fdopen(fd, "w") as file:
        file.write(source)
    try:
        for stdin, expected in zip(gold["inputs"], gold["outputs"]):
            try:
                completed = subprocess.run(
                    [python, "-I", "-B", "-c", _ALARMED_RUN.format(seconds=LIMITS.time_per_test_s), path],
                    input=stdin.encode(),
                    capture_output=True,
                    timeout=LIMITS.wall_time_s,
                )
            except subprocess.TimeoutExpired:
                return 0.0
            if completed.returncode != 0 or not stdout_matches(completed.stdout.decode(errors="replace"), expected):
                return 0.0
        return 1.0
    finally:
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="programs per round")
    parser.add_argument("--tests", type=int, default=4, help="test cases per program")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="concurrent programs, both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(PROGRAMS),
                        help="comma-separated program kinds, in turn (e.g. 'correct' alone for the isolation cost)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(PROGRAMS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; valid: {', '.join(PROGRAMS)}")

    batch = make_batch(args.n, args.tests, kinds)
    completions = [f"```python\n{source}```" for _, source, _ in batch]
    golds = [gold for _, _, gold in batch]
    expected_scores = [1.0 if kind == "correct" else 0.0 for kind, _, _ in batch]
    # The sandbox's own interpreter, so that both sides pay the same start-up.
    python = sandbox._isolation().python
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"sandbox: {describe_isolation()}")
    print(f"{args.n} programs ({', '.join(kinds)}) x {args.tests} tests, {args.threads} at a time, "
          f"{args.rounds} rounds, limits {LIMITS}")

    verifier = functools.partial(code_score, limits=LIMITS)
    sandboxed_s, plain_s = [], []
    mismatches = {"sandboxed": 0, "plain": 0}
    with RewardFunction(verifier, timeout_s=LIMITS.wall_time_s + 10, max_workers=args.threads, name="code") as reward, \
            tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.threads) as plain_pool:
        reward.score(completions[: args.threads], golds[: args.threads])  # forks the workers, probes the host
        for _ in range(args.rounds):
            start = time.perf_counter()
            scores = reward.score(completions, golds)
            sandboxed_s.append(time.perf_counter() - start)
            mismatches["sandboxed"] += sum(a != b for a, b in zip(scores, expected_scores))
            start = time.perf_counter()
            scores = list(plain_pool.map(lambda item: plain_score(python, item[1], item[2], workdir), batch))
            plain_s.append(time.perf_counter() - start)
            mismatches["plain"] += sum(a != b for a, b in zip(scores, expected_scores))
        if any(reward.stats[key] for key in ("errors", "timeouts", "invalid_gold")):
            raise SystemExit(f"verifier failures during the benchmark: {reward.stats}")

    for side, count in mismatches.items():
        if count:  # a correct program over its per-test limit on an overloaded machine, or a real bug
            print(f"WARNING: {count} {side} scores differ from the expected ones over {args.rounds} rounds")
    sandboxed_rate = args.n / statistics.median(sandboxed_s)
    plain_rate = args.n / statistics.median(plain_s)
    print("rounds (s): sandboxed " + " ".join(f"{s:.2f}" for s in sandboxed_s)
          + " | plain " + " ".join(f"{s:.2f}" for s in plain_s))
    print(f"sandbox overhead: {sandboxed_rate:.1f} programs/s sandboxed vs {plain_rate:.1f} plain "
          f"({plain_rate / sandboxed_rate:.2f} x)")


if __name__ == "__main__":
    main()
