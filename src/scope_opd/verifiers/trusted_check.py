"""Assert-style checks (HumanEval's ``check(candidate)``) decided outside the candidate's reach.

The candidate's program runs in the sandbox (:func:`~scope_opd.verifiers.sandbox.run_program`,
function-call style with ``typed_values``); the check never enters it. The check
runs in a fresh trusted interpreter (``_check_driver.py``, no candidate code) with
a stand-in for the candidate whose answers are the plain values the sandbox sent
back. So the verdict depends only on plain values compared by trusted code:

* a return value must be built from exact built-in types (None, bool, int,
  float, str, bytes, complex, list, tuple, set, frozenset, dict); anything else
  (an object with its own ``__eq__``, a subclass of int or str), or a value too
  large to bring back, fails the check outright: not raised in it as an
  exception, which a check expecting one would catch as a pass;
* an exception the candidate raised is raised in the check as a
  :class:`CandidateError` that is also an instance of the exception's class
  when that class is exactly a built-in one (``except ValueError`` in a check
  catches the candidate's ``ValueError``, not a class of the candidate's own
  that is merely named so);
* patched builtins, ``sys.exit`` or ``os._exit``, output imitating the harness,
  frames inspected to read the expected values: all of that happens in the
  sandbox, where neither the check's source nor its verdict is;
* a call that times out, or is not run because the sandbox ended, fails the check.

The calls are found in rounds: the driver runs the check, answering the calls
it knows and recording the others as pending (with a placeholder answer that
lets the check go on); the sandbox then runs the candidate on all pending
calls at once; repeat until a round has no pending call, whose outcome is the
verdict. Most checks take one sandbox run and two runs of the check, in one driver process.
Checks drawing unseeded random inputs get the same ones each round
(``random.seed(0)``, ``PYTHONHASHSEED=0``).

The check is trusted (it comes from the benchmark, like the gold answers of
other verifiers); the driver still runs under ``RLIMIT_AS`` and the sandbox's
wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ._sandbox_io import RETURN_VALUE_ERROR_PREFIX
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


class _Driver:
    """The trusted interpreter running the check: one per verdict, one JSON line each way per round."""

    def __init__(self, setup: list[str], check_name: str, fn_name: str, limits: SandboxLimits):
        self._timeout_s = limits.wall_time_s + 10
        self._cwd = tempfile.TemporaryDirectory(prefix="scope-check-")  # nothing importable beside the driver
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-s", "-S", "-c", _DRIVER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=self._cwd.name,
            env=_DRIVER_ENV,
        )
        job = {"setup": setup, "check": check_name, "fn_name": fn_name, "memory_mb": limits.memory_mb}
        self._send(job)

    def _send(self, message: object) -> None:
        try:
            self._process.stdin.write(json.dumps(message).encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._fail()

    def result(self) -> dict:
        """The next run's result line."""
        stdout = self._process.stdout.fileno()
        chunks: list[bytes] = []
        deadline = time.monotonic() + self._timeout_s
        while not chunks or not chunks[-1].endswith(b"\n"):
            left_s = deadline - time.monotonic()
            if left_s <= 0 or not select.select([stdout], [], [], left_s)[0]:
                self._fail("timed out")
            chunk = os.read(stdout, 1 << 20)
            if not chunk:
                self._fail()
            chunks.append(chunk)
        try:
            result = json.loads(b"".join(chunks))
            return {"passed": result["passed"] is True, "error": str(result["error"]),
                    "pending": [str(key) for key in result["pending"]], "unsupported": result["unsupported"]}
        except (ValueError, KeyError, TypeError):
            self._fail("wrote a malformed result")

    def answer(self, outcomes: dict[str, dict]) -> None:
        self._send(list(outcomes.items()))

    def _fail(self, what: str = "exited") -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read()[-500:].decode("utf-8", "replace")
        raise RuntimeError(f"the check driver {what} (exit code {self._process.returncode}): {stderr}")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._stderr):
            with contextlib.suppress(OSError):
                stream.close()
        self._cwd.cleanup()


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
    driver = _Driver(setup, check_name, fn_name, limits)
    try:
        for _ in range(MAX_ROUNDS):
            result = driver.result()
            if result["unsupported"] is not None:
                raise InvalidGoldError(
                    f"the check cannot be run against a sandboxed candidate: {result['unsupported']}"
                )
            if not result["pending"]:
                return CheckVerdict(result["passed"], "" if result["passed"] else result["error"])
            pending = result["pending"]
            run = run_program(
                program, [json.loads(key) for key in pending], fn_name=fn_name, limits=limits, typed_values=True
            )
            if run.compile_error is not None:
                return CheckVerdict(False, f"the program does not compile: {run.compile_error}")
            outcomes: dict[str, dict] = {}
            for key, outcome in zip(pending, run.tests):
                if outcome.status == "ok":
                    outcomes[key] = {"returned": outcome.returned}
                elif outcome.status == "error" and outcome.error.startswith(RETURN_VALUE_ERROR_PREFIX):
                    # Not an exception of the candidate's: a check that expects one must not catch it as a pass.
                    return CheckVerdict(False, f"a call of {fn_name} returned what cannot be checked: {outcome.error}")
                elif outcome.status == "error":
                    outcomes[key] = {"error": outcome.error, "raised": outcome.raised}
                else:  # a timeout, or the run ended before this call: fails whatever the check would do
                    return CheckVerdict(False, f"a call of {fn_name} did not finish: {outcome.error}")
            driver.answer(outcomes)
    finally:
        driver.close()
    raise InvalidGoldError(f"the check's calls of the candidate did not settle in {MAX_ROUNDS} rounds")
