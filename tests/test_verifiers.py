"""Verifiers (math, exact, registry) and RewardFunction's contract: failures and hangs score 0, never crash."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from scope_opd.verifiers import (
    STAT_KEYS,
    InvalidGoldError,
    RewardFunction,
    code_score,
    completion_text,
    exact_score,
    get_verifier,
    normalize_answer,
    verify_batch,
)
from scope_opd.verifiers.extract import final_answer_text, last_boxed_content, last_python_block
from scope_opd.verifiers.math import math_any_score, math_score

# ---------------------------------------------------------------- extraction


def test_last_boxed_content_handles_nesting_and_picks_the_last_complete_box():
    assert last_boxed_content(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed_content(r"\boxed{3} then \boxed{5}") == "5"
    assert last_boxed_content(r"\boxed{7} but truncated \boxed{8") == "7"
    assert last_boxed_content(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed_content(r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}") == r"\begin{pmatrix}1\\2\end{pmatrix}"
    assert last_boxed_content(r"\fbox{4}") == "4"
    assert last_boxed_content(r"final: \boxed 9$") == "9"
    assert last_boxed_content("no box here") is None
    assert last_boxed_content(r"\boxedfoo{1}") is None


def test_final_answer_text_prefers_box_then_marker_then_whole_text():
    assert final_answer_text(r"Answer: 3, but \boxed{4}") == "4"
    assert final_answer_text("work...\n#### 72") == "72"
    assert final_answer_text("The final answer: 12.\nDone") == "12."
    assert final_answer_text("  just 5  ") == "just 5"


def test_last_python_block_takes_the_last_fenced_block_else_everything():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```text\nnot code\n```"
    assert last_python_block(text) == "print(2)\n"
    assert last_python_block("print(3)") == "print(3)"
    assert last_python_block("```python\nprint(4)  # never closed") == "```python\nprint(4)  # never closed"


# ---------------------------------------------------------------- math


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"So the result is \boxed{\frac{1}{2}}.", "0.5"),
        (r"\boxed{19}", "19"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{x^{2}}", "$x^2$"),
        (r"\boxed{\sqrt{3}/2}", r"\frac{\sqrt{3}}{2}"),
        (r"First \boxed{3}, then corrected: \boxed{5}", "5"),
        (r"\boxed{7} and a truncated \boxed{8", "7"),
        (r"\boxed{1000}", "1,000"),
        (r"final: \boxed 9$", "9"),
    ],
)
def test_math_equivalent_answers_score_one(completion, gold):
    assert math_score(completion, gold) == 1.0
    assert math_any_score(completion, gold) == 1.0  # a boxed answer is read the same way by both


# Text of the shape tiny random models emit (tests/conftest.py's tiny_pair_dir): digits among
# noise. math-verify's fallback reads "2" out of it and matched gold "2", inflating eval rates.
RANDOM_MODEL_JUNK = ["Uq 3 2", "x=2", "2", "7+k=2 ... 2", "\\bo 2xed{ 2", "$2$ then zz"]


@pytest.mark.parametrize("junk", RANDOM_MODEL_JUNK)
def test_math_scores_zero_without_a_box_even_when_the_gold_appears_in_the_text(junk):
    assert math_any_score(junk, "2") == 1.0  # what math-verify's fallback alone says
    assert math_score(junk, "2") == 0.0  # the math verifier: the prompt asked for \boxed{}
    assert math_score(junk + " \\boxed{2}", "2") == 1.0  # the same text with the asked-for box


def test_math_a_box_cut_off_by_truncation_is_no_answer_even_if_the_gold_is_inside():
    assert math_score("steps... \\boxed{2", "2") == 0.0
    assert math_score("\\boxed{3}, retried \\boxed{2", "2") == 0.0  # the last complete box is 3


def test_math_any_reads_an_unboxed_answer():
    assert math_any_score("The answer is 42.", "42") == 1.0
    assert math_score("The answer is 42.", "42") == 0.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"\boxed{20}", "19"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"First \boxed{5}, then corrected: \boxed{3}", "5"),  # only the last box counts
        ("I could not solve it.", "19"),  # no answer at all
        ("", "19"),
    ],
)
def test_math_wrong_or_missing_answers_score_zero(completion, gold):
    assert math_score(completion, gold) == 0.0


@pytest.mark.parametrize("gold", [None, "", "   ", "$$", "\\"])
def test_math_unusable_gold_raises_invalid_gold(gold):
    with pytest.raises(InvalidGoldError):
        math_score(r"\boxed{1}", gold)


def test_math_verifier_works_from_worker_threads():
    # math-verify's own timeout uses signal.alarm, which raises ValueError outside the main thread.
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(math_score, [r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["0.5", "4"]))
    assert scores == [1.0, 0.0]


# ---------------------------------------------------------------- exact


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("  $42$ ", "42"),
        ("Yes.", "yes"),
        ("1,234,567", "1234567"),
        ("1.0", "1"),
        ("+2.50", "2.5"),
        ("100", "100"),
        ("-0.0", "0"),
        ("\\$5", "5"),
        ("New   York", "new york"),
        ("1,00", "1,00"),  # not a thousands grouping: left alone
        ("3.14.", "3.14"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    "completion, gold, score",
    [
        (r"The total is \boxed{1,000}", "1000", 1.0),
        ("Working...\n#### 72", "72", 1.0),
        ("Answer: $5$.", "5", 1.0),
        ("answer: 1.0", "1", 1.0),
        ("PARIS", "Paris", 1.0),
        (r"\boxed{1234}", "Natalia sold 1234 clips.\n#### 1,234", 1.0),  # GSM8K-style gold
        ("Answer: 12", "13", 0.0),
        ("the answer is 12 I think", "12", 0.0),  # no marker with a colon: the whole text is compared
        ("", "12", 0.0),
    ],
)
def test_exact_score(completion, gold, score):
    assert exact_score(completion, gold) == score


@pytest.mark.parametrize("gold", [None, "", "$ $"])
def test_exact_unusable_gold_raises_invalid_gold(gold):
    with pytest.raises(InvalidGoldError):
        exact_score("Answer: 1", gold)


# ---------------------------------------------------------------- registry


def test_builtin_names_resolve_to_the_verifiers():
    assert get_verifier("math") is math_score
    assert get_verifier("math_any") is math_any_score
    assert get_verifier("exact") is exact_score
    assert get_verifier("code") is code_score


def test_import_paths_and_callables_resolve():
    assert get_verifier("scope_opd.verifiers.exact:exact_score") is exact_score
    assert get_verifier("scope_opd.verifiers.exact.exact_score") is exact_score
    import operator

    assert get_verifier("operator:eq") is operator.eq

    def mine(completion, gold):
        return 1.0

    assert get_verifier(mine) is mine


def test_unknown_name_error_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown verifier 'maths'.*code, exact, math"):
        get_verifier("maths")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("operator:no_such_function", "no attribute"),
        ("scope_opd.verifiers.registry:BUILTIN_VERIFIERS", "non-callable"),
        (42, "name, an import path or a callable"),
    ],
)
def test_bad_specs_raise_value_error(spec, message):
    with pytest.raises(ValueError, match=message):
        get_verifier(spec)


# ---------------------------------------------------------------- RewardFunction


def _always_raises(completion, gold):
    raise RuntimeError(f"verifier bug on {completion!r}")


def _hangs_on_request(completion, gold):
    if completion == "hang":
        time.sleep(600)
    return 1.0 if completion == gold else 0.0


def _runtime_warnings(records, kind):
    return [r for r in records if issubclass(r.category, RuntimeWarning) and f"stats[{kind!r}]" in str(r.message)]


@pytest.fixture
def math_reward():
    reward = RewardFunction("math", timeout_s=30, max_workers=2)
    yield reward
    reward.close()


def test_reward_function_scores_plain_string_completions(math_reward):
    scores = math_reward(
        prompts=["p1", "p2", "p3"],
        completions=[r"\boxed{\frac{1}{2}}", r"\boxed{19}", r"\boxed{20}"],
        answer=["0.5", "19", "19"],
    )
    assert scores == [1.0, 1.0, 0.0]
    assert math_reward.stats == {"calls": 3, "errors": 0, "timeouts": 0, "missing_gold": 0, "invalid_gold": 0}


def test_reward_function_scores_the_last_assistant_message_of_conversational_completions(math_reward):
    completions = [
        [{"role": "assistant", "content": r"\boxed{19}"}],
        [{"role": "assistant", "content": r"\boxed{18}"}, {"role": "assistant", "content": r"fixed: \boxed{19}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed"}, {"type": "text", "text": "{19}"}]}],
        [{"role": "assistant", "content": r"\boxed{19}"}, {"role": "tool", "content": "ignored"}],
        [{"role": "user", "content": r"\boxed{19}"}],  # no assistant message: nothing to verify
    ]
    assert math_reward(prompts=None, completions=completions, answer=["19"] * 5) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_completion_text_never_raises_on_odd_shapes():
    assert completion_text(None) == ""
    assert completion_text(3) == ""
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text({"role": "assistant", "content": "x"}) == "x"


def test_reward_function_reads_gold_from_the_named_column():
    with RewardFunction("exact", answer_field="solution", max_workers=1) as reward:
        assert reward(prompts=None, completions=["Answer: 3", "Answer: 4"], solution=["3", "3"], answer=["4", "4"]) == [
            1.0,
            0.0,
        ]


def test_reward_function_has_a_name_for_trl_logs():
    with RewardFunction("math") as by_name, RewardFunction(exact_score) as by_callable:
        assert by_name.__name__ == "math"
        assert by_callable.__name__ == "exact_score"
    with RewardFunction("exact", name="accuracy") as named:
        assert named.__name__ == "accuracy"


def test_import_path_verifier_runs_inside_reward_function():
    with RewardFunction("operator:eq", max_workers=1) as reward:
        assert reward.score(["a", "b"], ["a", "a"]) == [1.0, 0.0]


def test_raising_verifier_scores_zero_counts_and_warns_once():
    with RewardFunction(_always_raises, max_workers=2) as reward, warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert reward.score(["a", "b", "c"], ["g", "g", "g"]) == [0.0, 0.0, 0.0]
        assert reward.score(["d"], ["g"]) == [0.0]
        assert reward.stats["errors"] == 4
        assert reward.stats["calls"] == 4
    warned = _runtime_warnings(records, "errors")
    assert len(warned) == 1
    assert "verifier bug on" in str(warned[0].message)


def test_hanging_verifier_scores_zero_within_the_timeout_and_the_pool_recovers():
    timeout_s = 1.0
    with RewardFunction(_hangs_on_request, timeout_s=timeout_s, max_workers=2) as reward:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            start = time.monotonic()
            scores = reward.score(["hang", "x", "hang", "y"], ["x", "x", "x", "y"])
            elapsed = time.monotonic() - start
        assert scores == [0.0, 1.0, 0.0, 1.0]
        assert reward.stats["timeouts"] == 2
        assert len(_runtime_warnings(records, "timeouts")) == 1
        # Two hangs on two workers at once: one timeout's worth of wall time, not the 600 s sleep.
        assert elapsed < timeout_s + 10
        # Hung workers were killed and replaced, not left behind.
        assert len(multiprocessing.active_children()) <= 2
        assert reward.score(["z"], ["z"]) == [1.0]


def test_math_answer_whose_evaluation_holds_the_gil_is_cut_off_at_the_timeout():
    """Comparing 10^(10^8) with 5 makes sympy build a 100-million-digit integer in C code.

    No signal or thread can interrupt that (in a thread it freezes the whole
    process, math-verify's own alarm included); killing the worker process can.
    """
    timeout_s = 2.0
    with RewardFunction("math", timeout_s=timeout_s, max_workers=2) as reward, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.monotonic()
        scores = reward.score([r"\boxed{10^{10^{8}}}", r"\boxed{5}"], ["5", "5"])
        elapsed = time.monotonic() - start
        assert scores == [0.0, 1.0]
        assert reward.stats["timeouts"] == 1
        assert elapsed < timeout_s + 10


def test_verifier_that_kills_its_process_scores_zero_and_is_replaced():
    def dies(completion, gold):
        if completion == "die":
            os._exit(3)
        return 1.0

    with RewardFunction(dies, max_workers=1) as reward, warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert reward.score(["die", "fine"], ["g", "g"]) == [0.0, 1.0]
        assert "worker process died (exit code 3)" in str(_runtime_warnings(records, "errors")[0].message)
        assert reward.stats["errors"] == 1


@pytest.mark.parametrize("bad_score", [float("nan"), 1.5, -0.1, "high"])
def test_scores_outside_zero_one_are_errors(bad_score):
    with RewardFunction(lambda completion, gold: bad_score, max_workers=1) as reward:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert reward.score(["a"], ["g"]) == [0.0]
        assert reward.stats["errors"] == 1


def test_missing_gold_scores_zero_counts_and_warns_once():
    with RewardFunction("math", max_workers=1) as reward, warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        # No answer column at all (e.g. a misnamed answer_field).
        assert reward(prompts=None, completions=[r"\boxed{1}", r"\boxed{2}"]) == [0.0, 0.0]
        # None, NaN (pandas' missing value) and empty strings, next to a valid row.
        scores = reward(prompts=None, completions=[r"\boxed{1}"] * 4, answer=[None, math.nan, "  ", "1"])
        assert scores == [0.0, 0.0, 0.0, 1.0]
        assert reward.stats["missing_gold"] == 5
        assert reward.stats["errors"] == 0
    assert len(_runtime_warnings(records, "missing_gold")) == 1


def test_unparsable_gold_scores_zero_and_counts_as_invalid_gold():
    with RewardFunction("math", max_workers=1) as reward:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert reward.score([r"\boxed{1}", r"\boxed{1}"], ["$$", "1"]) == [0.0, 1.0]
        assert reward.stats["invalid_gold"] == 1
        assert reward.stats["errors"] == 0


def test_stats_delta_returns_increments_since_the_last_call():
    with RewardFunction(_always_raises, max_workers=1) as reward:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reward.score(["a", "b"], ["g", None])
            first = reward.stats_delta()
            reward.score(["c"], ["g"])
            second = reward.stats_delta()
        assert set(first) == set(STAT_KEYS)
        assert first == {"calls": 2, "errors": 1, "timeouts": 0, "missing_gold": 1, "invalid_gold": 0}
        assert second == {"calls": 1, "errors": 1, "timeouts": 0, "missing_gold": 0, "invalid_gold": 0}
        assert reward.stats_delta() == dict.fromkeys(STAT_KEYS, 0)
        assert reward.stats["calls"] == 3  # running totals are kept


def test_reward_function_called_from_several_threads_at_once(math_reward):
    batches = [([rf"\boxed{{{i}}}", rf"\boxed{{{i + 1}}}"], [str(i), str(i)]) for i in range(8)]
    results = {}

    def score(index):
        completions, golds = batches[index]
        results[index] = math_reward(prompts=None, completions=completions, answer=golds)

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {i: [1.0, 0.0] for i in range(len(batches))}
    assert math_reward.stats["calls"] == 16


def test_misaligned_golds_are_a_caller_bug():
    with RewardFunction("exact", max_workers=1) as reward, pytest.raises(ValueError, match="2 completions but 1"):
        reward.score(["a", "b"], ["a"])


def test_verify_batch_accepts_string_and_conversational_completions():
    completions = ["Answer: 3", [{"role": "assistant", "content": "Answer: 4"}], "Answer: 5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert verify_batch("exact", completions, ["3", "4", None], max_workers=1) == [1.0, 1.0, 0.0]
