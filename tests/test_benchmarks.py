"""The benchmark scripts run and print the line their docs promise (no timing asserts: machines are noisy)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, *args: str, timeout: float = 300) -> list[str]:
    result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def test_bench_sandbox_scores_every_kind_of_program_both_ways_and_prints_the_overhead():
    # 5 programs: one of each kind (correct, wrong, infinite loop, crash, heavy output), through the real
    # sandboxed verifier pool and plain subprocess.run; a verifier error or timeout ends the script non-zero.
    lines = run_benchmark("bench_sandbox.py", "--n", "5", "--tests", "2", "--threads", "2", "--rounds", "1")
    assert lines[0].startswith("machine: ") and lines[1].startswith("sandbox: ")
    assert re.fullmatch(r"sandbox overhead: \d+\.\d programs/s sandboxed vs \d+\.\d plain \(\d+\.\d\d x\)", lines[-1]), lines[-1]
