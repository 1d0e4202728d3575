"""Gold answers written the way the real benchmark files write them (found by a review of the real files).

- OlympiadBench's multi-answer golds are ONE list element holding several maths spans (``['$69$,$84$']``,
  ids 1664 and 1940 of the test split); stripping only the outer ``$`` used to leave ``69$,$84``, which
  math-verify read as ``69`` alone: the full answer scored 0 and half of it scored 1.
- A maths answer with a sentence's full stop after it (``'$(-\\infty, 0) \\cup\\{1\\}$.'``, id 1970).
- MATH500 writes currency as an escaped dollar (``\\$18.90``); the unescaped-``$`` test took it for a maths
  environment, so the gold was never wrapped and every sample of the problem scored 0 (``invalid_gold``).

Expected scores are what a reader of each problem would mark, written here by hand.
"""

import json

import pytest

from scope_opd.evaluation.benchmarks import BENCHMARK_DIR_ENV, load_benchmark
from scope_opd.verifiers.math import math_score

# (final_answer as in the file, a completion, whether it is right)
OLYMPIAD_CASES = [
    (["$69$,$84$"], r"so the answers are \boxed{69, 84}", True),
    (["$69$,$84$"], r"so the answer is \boxed{69}", False),  # half the answer
    (["$69$,$84$"], r"\boxed{84, 69}", True),
    (["$f(x)=x$,$f(x)=2-x$"], r"\boxed{f(x)=x, f(x)=2-x}", True),
    (["$f(x)=x$,$f(x)=2-x$"], r"\boxed{f(x)=x}", False),
    (["$(-\\infty, 0) \\cup\\{1\\}$."], r"\boxed{(-\infty, 0) \cup \{1\}}", True),
    (["$(-\\infty, 0) \\cup\\{1\\}$."], r"\boxed{(-\infty, 0)}", False),
    (["$2^{1009}$"], r"\boxed{2^{1009}}", True),  # the single-span form, unchanged
    (["2", "3"], r"\boxed{2, 3}", True),  # separate elements, unchanged
]


@pytest.mark.parametrize(("final_answer", "completion", "right"), OLYMPIAD_CASES)
def test_olympiadbench_golds_in_the_real_files_format_score_as_a_reader_would(
    final_answer, completion, right, tmp_path, monkeypatch
):
    row = {"id": 1664, "question": "q", "final_answer": final_answer, "is_multiple_answer": True}
    (tmp_path / "OlympiadBench.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv(BENCHMARK_DIR_ENV, str(tmp_path))
    (problem,) = load_benchmark("OlympiadBench").problems
    assert "$" not in problem.answer, problem.answer
    assert math_score(completion, problem.answer) == (1.0 if right else 0.0), (final_answer, problem.answer)


@pytest.mark.parametrize(
    ("gold", "completion", "right"),
    [
        (r"\$18.90", r"\boxed{18.90}", True),
        (r"\$18.90", r"\boxed{\$18.90}", True),
        (r"\$18.90", r"\boxed{18.80}", False),
        (r"\$32,\!348", r"\boxed{32348}", True),
        (r"\$36", r"\boxed{36}", True),
        (r"$\frac{1}{2}$", r"\boxed{0.5}", True),  # an unescaped dollar still means maths mode
    ],
)
def test_a_gold_with_an_escaped_dollar_is_a_currency_amount_not_a_refused_gold(gold, completion, right):
    assert math_score(completion, gold) == (1.0 if right else 0.0)
