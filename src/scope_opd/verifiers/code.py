"""Code verifier: run the completion's program on the gold test cases in the sandbox.

Gold test cases follow the TACO / APPS convention, as a dict or its JSON text:

* stdin/stdout: ``{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}``
* function call: ``{"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}``
  (a top-level function, or a method of ``class Solution``). As in APPS, an
  expected output wrapped in a one-element list also accepts the bare value,
  unless the gold says ``"apps_wrapped_outputs": false`` (LiveCodeBench, whose
  outputs are the return values themselves: there ``[3]`` is the list ``[3]``).

Output comparison (done here, outside the sandbox). stdout matches when its
lines equal the expected lines up to trailing whitespace and blank lines at
either end, or else when the whitespace-separated tokens match one by one:

* an expected **integer** token (``-12``) matches only a number of exactly that
  value (``-12``, ``-12.0``), compared as decimals, so big integers and
  off-by-one answers never pass;
* an expected **float** token (``0.5``, ``1e-3``: a point or an exponent) matches
  a number within 1e-6, absolute or relative, the usual judge tolerance for
  floating-point answers;
* any other token (``YES``, ``nan``, ``inf``) matches only the same string.

This is LiveCodeBench's rule (exact lines, else exact ``Decimal`` values token
by token; LiveCodeBench matches line by line, we match the token sequence
across lines, as before), with a float tolerance added only where the expected
output is a float. TACO/APPS's harness instead tries ``np.allclose`` on any numeric line,
which passes ``1000001`` for ``1000000``; we do not follow it there.

A function's return value (through JSON) matches with the same rules, by type:
bool and int differ (``1`` is not ``True``), an expected int needs a number of
exactly that value, an expected float one within 1e-6 (NaN matches NaN), strings
and None match exactly, lists and dicts element by element.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterator

from .extract import last_python_block
from .registry import InvalidGoldError
from .sandbox import ProgramRun, SandboxLimits, run_program

__all__ = [
    "TestCases",
    "code_pass_fraction",
    "code_score",
    "parse_test_cases",
    "passed_tests",
    "returned_matches",
    "stdout_matches",
]

_NUMBER_TOKEN = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER_TOKEN = re.compile(r"[+-]?\d+")
_FLOAT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TestCases:
    """Parallel lists of test inputs and expected outputs; ``fn_name`` None means stdin/stdout style."""

    __test__ = False  # not a pytest test class, despite the name

    inputs: list
    outputs: list
    fn_name: str | None = None
    # APPS/TACO store a call's return value wrapped in a one-element list; False: outputs are the values.
    apps_wrapped_outputs: bool = True


def parse_test_cases(gold: object) -> TestCases:
    """:class:`TestCases` from a dict or JSON text.

    Raises:
        InvalidGoldError: not JSON, missing or misaligned ``inputs``/``outputs``, or no test at all.
    """
    if isinstance(gold, (str, bytes)):
        try:
            gold = json.loads(gold)
        except ValueError as error:
            raise InvalidGoldError(f"code test cases are not valid JSON: {error}") from error
        except RecursionError as error:
            raise InvalidGoldError("code test cases are JSON nested too deeply to parse") from error
    if not isinstance(gold, dict):
        raise InvalidGoldError(f"code test cases must be a dict or JSON object, got {type(gold).__name__}")
    inputs, outputs = gold.get("inputs"), gold.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise InvalidGoldError("code test cases need 'inputs' and 'outputs' lists")
    if len(inputs) != len(outputs):
        raise InvalidGoldError(f"{len(inputs)} test inputs but {len(outputs)} expected outputs")
    if not inputs:
        raise InvalidGoldError("no test cases: nothing to verify against")
    fn_name = gold.get("fn_name") or None
    if fn_name is not None and not isinstance(fn_name, str):
        raise InvalidGoldError(f"fn_name must be a string, got {type(fn_name).__name__}")
    wrapped = gold.get("apps_wrapped_outputs", True)
    if not isinstance(wrapped, bool):
        raise InvalidGoldError(f"apps_wrapped_outputs must be true or false, got {wrapped!r}")
    return TestCases(inputs=inputs, outputs=outputs, fn_name=fn_name, apps_wrapped_outputs=wrapped)


def _as_text(expected: object) -> str:
    if isinstance(expected, list):
        return "\n".join(str(line) for line in expected)
    return str(expected)


def _floats_close(actual: float, expected: float) -> bool:
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    return math.isclose(actual, expected, rel_tol=_FLOAT_TOLERANCE, abs_tol=_FLOAT_TOLERANCE)


def _tokens_match(actual: str, expected: str) -> bool:
    if actual == expected:
        return True
    if not (_NUMBER_TOKEN.fullmatch(actual) and _NUMBER_TOKEN.fullmatch(expected)):
        return False
    if _INTEGER_TOKEN.fullmatch(expected):
        # Decimal, not float: exact at any size (float(10**17 + 1) == 10**17), and
        # not int(), which refuses strings of over 4300 digits.
        try:
            return Decimal(actual) == Decimal(expected)
        except InvalidOperation:  # an exponent beyond Decimal's range
            return False
    return _floats_close(float(actual), float(expected))


# A line ends where str.splitlines would end it.
_LINE = re.compile("([^\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]*)(\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]|\\Z)")
_TOKEN = re.compile(r"\S+")  # what str.split() returns


def _lines(text: str) -> Iterator[str]:
    """``text.splitlines()``, one line at a time."""
    position, end = 0, len(text)
    while position < end:
        match = _LINE.match(text, position)
        yield match.group(1)
        if not match.group(2):
            return
        position = match.end()


def _same_sequence(actual: Iterator, expected: list, equal) -> bool:
    """Whether ``actual`` yields exactly ``len(expected)`` items, each ``equal`` to its expected one;
    stops at the first difference, so a long wrong output costs no more than the expected one."""
    count = 0
    for item in actual:
        if count >= len(expected) or not equal(item, expected[count]):
            return False
        count += 1
    return count == len(expected)


def stdout_matches(actual: str, expected: object) -> bool:
    """Whether a program's stdout matches the expected output (see the module docstring).

    The program's output is read line by line and token by token, never split
    into lists: the memory this takes is one stripped copy of the output plus
    lists the size of the expected output, however many lines the program
    printed (the gold is trusted; the output is not).
    """
    expected_text = _as_text(expected)
    expected_lines = [line.rstrip() for line in expected_text.strip().splitlines()]
    stripped = actual.strip()
    if _same_sequence((line.rstrip() for line in _lines(stripped)), expected_lines, str.__eq__):
        return True
    del stripped
    expected_tokens = expected_text.split()
    return _same_sequence((match.group() for match in _TOKEN.finditer(actual)), expected_tokens, _tokens_match)


def _numbers_match(actual: object, expected: int | float) -> bool:
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return False
    if isinstance(expected, int):
        return actual == expected  # exact, also between an int and a float (3.0 is 3)
    try:
        return _floats_close(float(actual), expected)
    except OverflowError:  # an int too large for a float
        return False


def _values_match(actual: object, expected: object) -> bool:
    """Type-aware equality of JSON values (see the module docstring), with an explicit
    stack, so that values nested thousands of levels deep cannot raise RecursionError."""
    pending = [(actual, expected)]
    while pending:
        actual, expected = pending.pop()
        if isinstance(expected, bool) or isinstance(actual, bool):
            # Checked first: bool is a subclass of int, and True == 1 in Python.
            if not (isinstance(expected, bool) and isinstance(actual, bool) and actual == expected):
                return False
        elif isinstance(expected, (int, float)):
            if not _numbers_match(actual, expected):
                return False
        elif isinstance(expected, list):
            if not isinstance(actual, list) or len(actual) != len(expected):
                return False
            pending.extend(zip(actual, expected))
        elif isinstance(expected, dict):
            if not isinstance(actual, dict) or actual.keys() != expected.keys():
                return False
            pending.extend((actual[key], expected[key]) for key in expected)
        elif expected is None:
            if actual is not None:
                return False
        elif type(actual) is not type(expected) or actual != expected:
            return False
    return True


def returned_matches(actual: object, expected: object, apps_wrapped: bool = True) -> bool:
    """Whether a function's return value (through JSON, so tuples are lists) matches the expected output;
    ``apps_wrapped``: the expected output may be the value wrapped in a one-element list (TACO/APPS)."""
    if _values_match(actual, expected):
        return True
    return apps_wrapped and isinstance(expected, list) and len(expected) == 1 and _values_match(actual, expected[0])


def passed_tests(run: ProgramRun, cases: TestCases) -> list[bool]:
    """Per test case, whether it ran to completion with the expected output."""
    passed = []
    for outcome, expected in zip(run.tests, cases.outputs):
        if outcome.status != "ok":
            passed.append(False)
        elif cases.fn_name is None:
            passed.append(outcome.stdout is not None and stdout_matches(outcome.stdout, expected))
        else:
            passed.append(returned_matches(outcome.returned, expected, cases.apps_wrapped_outputs))
    return passed


def _run(completion: str, gold: object, limits: SandboxLimits, stop_at_first_error: bool) -> list[bool]:
    cases = parse_test_cases(gold)
    run = run_program(
        last_python_block(completion),
        cases.inputs,
        fn_name=cases.fn_name,
        limits=limits,
        stop_at_first_error=stop_at_first_error,
    )
    return passed_tests(run, cases)


def code_pass_fraction(completion: str, gold: object, *, limits: SandboxLimits = SandboxLimits()) -> float:
    """Fraction of the gold test cases that the completion's program passes.

    The program is the last ```python fenced block of the completion, else the
    whole completion.

    Raises:
        InvalidGoldError: see :func:`parse_test_cases`.
        SandboxUnavailable: this host cannot contain untrusted code.
    """
    passed = _run(completion, gold, limits, stop_at_first_error=False)
    return sum(passed) / len(passed)


def code_score(completion: str, gold: object, *, limits: SandboxLimits = SandboxLimits()) -> float:
    """1.0 when the completion's program passes every gold test case, else 0.0.

    Like :func:`code_pass_fraction`, but stops at the first error or timeout.
    """
    return 1.0 if all(_run(completion, gold, limits, stop_at_first_error=True)) else 0.0
