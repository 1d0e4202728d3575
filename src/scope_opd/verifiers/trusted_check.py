"""Assert-style checks (HumanEval's ``check(candidate)``) decided outside the candidate's reach.

The candidate's program runs in the sandbox (:func:`~scope_opd.verifiers.sandbox.run_program`,
function-call style with ``typed_values``); the check never enters it. The check
runs in a fresh trusted interpreter (``_check_driver.py``, no candidate code) with
a stand-in for the candidate whose answers are the plain values the sandbox sent
back. So the verdict depends only on plain values compared by trusted code:

* a return value must be built from exact built-in types (None, bool, int,
  float, str, bytes, complex, list, tuple, set, frozenset, dict); anything else
  (an object with its own ``__eq__``, a subclass of int or str) is an error for
  that call, raised in the check as :class:`CandidateError`;
* patched builtins, ``sys.exit`` or ``os._exit``, output imitating the harness,
  frames inspected to read the expected values: all of that happens in the
  sandbox, where neither the check's source nor its verdict is;
* a call that times out, or is not run because the sandbox ended, fails the check.

The calls are found in rounds: the driver runs the check, answering the calls
it knows and recording the others as pending (with a placeholder answer that
lets the check go on); the sandbox then runs the candidate on all pending
calls at once; repeat until a round has no pending call, whose outcome is the
verdict. Most checks take one sandbox run and two driver runs (~0.05 s each).
Checks drawing unseeded random inputs get the same ones each round
(``random.seed(0)``, ``PYTHONHASHSEED=0``).

The check is trusted (it comes from the benchmark, like the gold answers of
other verifiers); the driver still runs under ``RLIMIT_AS`` and the sandbox's
wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .registry import InvalidGoldError
from .sandbox import SandboxLimits, run_program

__all__ = ["CheckVerdict", "run_trusted_check"]

_DRIVER_SOURCE = Path(__file__).with_name("_check_driver.py").read_text(encoding="utf-8")
# Each round finds at least one new call; checks whose later calls hide behind
# `is` comparisons or type checks of earlier answers take more rounds.
MAX_ROUNDS = 24
_DRIVER_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class CheckVerdict:
    """Whether the check passed; ``reason`` says why not ("" when it passed)."""

    passed: bool
    reason: str = ""


def _drive(setup: list[str], check_name: str, fn_name: str, known: dict[str, dict], limits: SandboxLimits) -> dict:
    job = {"setup": setup, "check": check_name, "fn_name": fn_name, "known": list(known.items()),
           "memory_mb": limits.memory_mb}
    with tempfile.TemporaryDirectory(prefix="scope-check-") as cwd:  # nothing importable beside the driver
        completed = subprocess.run(
            [sys.executable, "-s", "-S", "-c", _DRIVER_SOURCE],
            input=json.dumps(job).encode(),
            capture_output=True,
            timeout=limits.wall_time_s + 10,
            cwd=cwd,
            env=_DRIVER_ENV,
            check=False,
        )
    lines = completed.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
        return {"passed": result["passed"] is True, "error": str(result["error"]),
                "pending": [str(key) for key in result["pending"]], "unsupported": result["unsupported"]}
    except (IndexError, ValueError, KeyError, TypeError):
        stderr = completed.stderr.decode("utf-8", "replace")[-500:]
        raise RuntimeError(f"the check driver failed (exit code {completed.returncode}): {stderr}") from None


def run_trusted_check(
    program: str, fn_name: str, setup: list[str], check_name: str = "check", *, limits: SandboxLimits = SandboxLimits()
) -> CheckVerdict:
    """Whether ``check_name(candidate)``, defined by the trusted ``setup`` sources, passes when
    ``candidate`` is ``fn_name`` of the untrusted ``program`` (run in the sandbox).

    Raises:
        InvalidGoldError: the check passes the candidate something that is not a plain
            value (it cannot reach the sandbox), or its calls do not settle in
            :data:`MAX_ROUNDS` rounds.
        SandboxUnavailable: this host cannot contain untrusted code.
    """
    known: dict[str, dict] = {}
    for _ in range(MAX_ROUNDS):
        result = _drive(setup, check_name, fn_name, known, limits)
        if result["unsupported"] is not None:
            raise InvalidGoldError(f"the check cannot be run against a sandboxed candidate: {result['unsupported']}")
        if not result["pending"]:
            return CheckVerdict(result["passed"], "" if result["passed"] else result["error"])
        pending = result["pending"]
        run = run_program(
            program, [json.loads(key) for key in pending], fn_name=fn_name, limits=limits, typed_values=True
        )
        if run.compile_error is not None:
            return CheckVerdict(False, f"the program does not compile: {run.compile_error}")
        for key, outcome in zip(pending, run.tests):
            if outcome.status == "ok":
                known[key] = {"returned": outcome.returned}
            elif outcome.status == "error":
                known[key] = {"error": outcome.error}
            else:  # a timeout, or the run ended before this call: fails whatever the check would do
                return CheckVerdict(False, f"a call of {fn_name} did not finish: {outcome.error}")
    raise InvalidGoldError(f"the check's calls of the candidate did not settle in {MAX_ROUNDS} rounds")
