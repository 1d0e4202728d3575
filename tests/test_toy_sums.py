"""The multi-strategy sum task: solution formats, splits, verifier, strategy recognition."""

from __future__ import annotations

import json

import pytest
from math_verify import parse, verify

from scope_opd.toy.sums import (
    DEFAULT_TERMS,
    STRATEGIES,
    SumProblem,
    parse_sum_prompt,
    solution_strategy,
    sum_dataset,
    sum_max_completion_chars,
    sum_problems,
    sum_solution,
    verify_sum_answer,
)

EXAMPLE = SumProblem((7, 5, 9, 3, 8))


def test_solutions_match_the_documented_example():
    assert EXAMPLE.prompt == "7+5+9+3+8\n" and EXAMPLE.answer == "32"
    assert sum_solution(EXAMPLE, "left") == "12+9+3+8\n21+3+8\n24+8\n\\boxed{32}"
    assert sum_solution(EXAMPLE, "right") == "7+5+9+11\n7+5+20\n7+25\n\\boxed{32}"
    assert sum_solution(EXAMPLE, "pairs") == "12+12+8\n24+8\n\\boxed{32}"
    assert sum_solution(EXAMPLE.prompt, "pairs") == sum_solution(EXAMPLE, "pairs")
    four = SumProblem((7, 5, 9, 3))  # the module docstring's example (the default 4 numbers)
    assert [sum_solution(four, s) for s in STRATEGIES] == [
        "12+9+3\n21+3\n\\boxed{24}", "7+5+12\n7+17\n\\boxed{24}", "12+12\n\\boxed{24}"]


def test_pairs_with_an_even_count_merges_every_pair():
    assert sum_solution(SumProblem((1, 2, 3, 4)), "pairs") == "3+7\n\\boxed{10}"
    assert sum_solution(SumProblem((1, 2, 3, 4)), "right") == "1+2+7\n1+9\n\\boxed{10}"


def _rewrites(previous: list[int], terms: list[int]) -> bool:
    """``terms`` is ``previous`` with neighbouring pairs replaced by their sums (one pair, or every pair)."""
    one = [previous[:i] + [previous[i] + previous[i + 1]] + previous[i + 2 :] for i in range(len(previous) - 1)]
    every = [previous[i] + previous[i + 1] for i in range(0, len(previous) - 1, 2)] + previous[len(previous) - len(previous) % 2 :]
    return terms in one or terms == every


@pytest.mark.parametrize("terms", [2, 3, 4, 5])
def test_every_strategy_rewrites_correctly_and_differs_on_most_problems(terms):
    problems = sum_problems("test", min(200, len(sum_problems("test", terms=terms))), seed=2, terms=terms)
    distinct = 0
    for problem in problems:
        texts = {s: sum_solution(problem, s) for s in STRATEGIES}
        for text in texts.values():
            *lines, boxed = text.split("\n")
            assert boxed == f"\\boxed{{{problem.answer}}}"
            previous = list(problem.numbers)
            for line in [*lines, problem.answer]:
                current = [int(t) for t in line.split("+")]
                assert _rewrites(previous, current), (problem, text)
                previous = current
            assert verify_sum_answer(text, problem.answer) == 1.0
        distinct += len(set(texts.values())) == len(STRATEGIES)
    # Mechanism (a): from 4 numbers on, the three solutions of a problem always differ (with 2
    # or 3 numbers pairs is left).
    if terms >= 4:
        assert distinct == len(problems)


def test_strategy_of_a_completion_is_recognised_and_anything_else_is_none():
    for strategy in STRATEGIES:
        assert solution_strategy(EXAMPLE, sum_solution(EXAMPLE, strategy) + "\n") == strategy
    slipped = "12+9+3+8\n20+3+8\n23+8\n\\boxed{31}"
    assert solution_strategy(EXAMPLE, slipped) is None
    assert solution_strategy(EXAMPLE.prompt, "12+9+3+8") is None
    # Three numbers: pairs writes left's text (the first match is named). A palindrome does not
    # tie: right rewrites the end of the line, left its start.
    assert solution_strategy(SumProblem((4, 5, 6)), sum_solution(SumProblem((4, 5, 6)), "pairs")) == "left"
    assert solution_strategy(SumProblem((3, 1, 1, 3)), sum_solution(SumProblem((3, 1, 1, 3)), "right")) == "right"


def test_prompt_round_trips_and_bad_input_is_named():
    assert parse_sum_prompt("7+5+9+3+8\n") == EXAMPLE
    for p in sum_problems("train", 50, seed=7):
        assert parse_sum_prompt(p.prompt) == p
    for bad in ("7+5", "Sum 7+5.\n", "7+0+1\n", "7\n", "12+5\n", "7+5\n\n", " 7+5\n"):
        with pytest.raises(ValueError, match="not a sum prompt"):
            parse_sum_prompt(bad)
    with pytest.raises(ValueError, match=r"1\.\.9, got \(3, 10\)"):
        SumProblem((3, 10))
    with pytest.raises(ValueError, match="not a sum prompt: 'Sum 7"):
        sum_solution("Sum 7+5.\n")
    with pytest.raises(ValueError, match="strategy must be one of"):
        sum_solution(EXAMPLE, "middle")


def test_splits_are_disjoint_up_to_reordering_and_seeded():
    train, test = sum_problems("train"), sum_problems("test")
    assert len(train) + len(test) == 9**DEFAULT_TERMS
    assert 0.15 < len(test) / 9**DEFAULT_TERMS < 0.25
    multiset = lambda ps: {tuple(sorted(p.numbers)) for p in ps}  # noqa: E731
    assert not multiset(train) & multiset(test)
    assert sum_problems("train", 50, seed=3) == sum_problems("train", 50, seed=3)
    assert sum_problems("train", 50, seed=3) != sum_problems("train", 50, seed=4)
    assert all(p.split == "test" for p in sum_problems("test", 20, seed=1))
    assert all(len(p.numbers) == 5 for p in sum_problems("train", 10, terms=5))


def test_asking_for_too_much_or_a_bad_split_raises():
    with pytest.raises(ValueError, match="asked for"):
        sum_problems("test", 9**5)
    with pytest.raises(ValueError, match="split must be one of"):
        sum_problems("validation", 1)
    with pytest.raises(ValueError, match="terms must be"):
        sum_problems("train", 1, terms=7)


def test_dataset_columns_and_gold():
    data = sum_dataset("test", 16, seed=0)
    assert data.column_names == ["prompt", "answer"] and len(data) == 16
    for row in data:
        assert row["answer"] == str(sum(parse_sum_prompt(row["prompt"]).numbers))


def test_verifier_checks_the_last_box_only():
    right = sum_solution(EXAMPLE, "right")
    assert verify_sum_answer(right, "32") == 1.0
    assert verify_sum_answer(right.replace("\\boxed{32}", "\\boxed{31}"), "32") == 0.0
    assert verify_sum_answer("12+9+3+8\n", "32") == 0.0
    assert verify_sum_answer("\\boxed{30}\\boxed{32}", "32") == 1.0


def test_solutions_parse_with_math_verify_as_the_demo_scores_them():
    for problem in sum_problems("test", 10, seed=5):
        for strategy in STRATEGIES:
            text = sum_solution(problem, strategy)
            assert verify(parse(problem.answer), parse(text))
            assert not verify(parse(problem.answer), parse(text.replace(f"{{{problem.answer}}}", "{99}")))


def test_max_completion_length():
    assert sum_max_completion_chars(5) == max(len(sum_solution(SumProblem((9,) * 5), s)) for s in STRATEGIES) == 31
    assert sum_max_completion_chars(4) == len("18+9+9\n27+9\n\\boxed{36}") == 22


# --- SFT data and models (quick recipe) ---------------------------------------


def test_sft_mix_is_skewed_for_the_student_and_even_for_the_teacher():
    from collections import Counter

    from scope_opd.toy.models import recipe_for, sft_texts

    recipe = recipe_for("sums")
    student, teacher = sft_texts(recipe, "student", seed=0), sft_texts(recipe, "teacher", seed=0)
    assert recipe.terms == DEFAULT_TERMS  # the demo draws its problems with the default
    assert len(teacher) == len(sum_problems("train", terms=recipe.terms))  # the teacher sees more data ...
    assert len(student) == round(recipe.student_data_fraction * len(teacher))
    assert min(w for _, w in recipe.student_mix) < max(w for _, w in recipe.student_mix) / 2  # skewed
    for texts, mix in ((student, recipe.student_mix), (teacher, recipe.teacher_mix)):
        counts = Counter(solution_strategy(prompt, completion) for prompt, completion in texts)
        for strategy, share in mix:  # ... and more strategies, in the recipe's shares
            assert abs(counts[strategy] / len(texts) - share) < 0.03, (strategy, counts)
        assert all(len(parse_sum_prompt(prompt).numbers) == recipe.terms for prompt, _ in texts)
        assert all(parse_sum_prompt(prompt).split == "train" for prompt, _ in texts[:500])
    assert sft_texts(recipe, "student", seed=0) == student
    assert sft_texts(recipe, "student", seed=1) != student
    assert sft_texts(recipe_for("addition"), "student") is None


def test_unknown_task_is_named():
    from scope_opd.toy.models import recipe_for

    with pytest.raises(ValueError, match="toy task must be one of"):
        recipe_for("countdown")


def test_quick_sums_models_build_load_and_are_cached_apart_from_addition(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_opd.toy.models import ensure_toy_models, recipe_for

    paths = ensure_toy_models(tmp_path, quick=True, task="sums", progress=False)
    assert paths.teacher.parent.name == f"{recipe_for('sums', quick=True).name}-seed0"
    model = AutoModelForCausalLM.from_pretrained(paths.student)
    tokenizer = AutoTokenizer.from_pretrained(paths.student)
    assert model.generation_config.max_new_tokens == 24  # 4 numbers: 22 characters + EOS, rounded up to 8
    ids = tokenizer(EXAMPLE.prompt + sum_solution(EXAMPLE, "pairs"), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == EXAMPLE.prompt + sum_solution(EXAMPLE, "pairs")
    assert len(ids) == len(EXAMPLE.prompt + sum_solution(EXAMPLE, "pairs"))  # one token per character
    info = json.loads((paths.teacher.parent / "recipe.json").read_text())
    assert info["recipe"]["terms"] == 4 and set(info["build_seconds"]) == {"teacher", "student"}
    assert ensure_toy_models(tmp_path, quick=True, task="sums", progress=False) == paths
    assert not (tmp_path / f"{recipe_for('addition', quick=True).name}-seed0").exists()


def test_calibration_classifies_chains():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_toy.py"
    spec = importlib.util.spec_from_file_location("calibrate_toy", path)
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    four = SumProblem((7, 5, 9, 3))
    for strategy in STRATEGIES:
        assert calibrate.chain_kind(four, sum_solution(four, strategy)) == "valid"
    assert calibrate.chain_kind(four, "7+14+3\n21+3\n\\boxed{24}") == "valid"  # the middle pair: another order
    assert calibrate.chain_kind(four, "11+9+3\n20+3\n\\boxed{23}") == "slip"  # 7+5=11, then followed consistently
    assert calibrate.chain_kind(four, "12+9+3\n20+3\n\\boxed{24}") == "slip"  # compensating: wrong chain, right total
    assert calibrate.chain_kind(four, "12+3\n\\boxed{15}") == "slip"  # pairs with 9+3 written as 3: one wrong term
    assert calibrate.chain_kind(four, "12+9+3+3\n\\boxed{27}") == "broken"  # a term repeated: the line did not shrink
    assert calibrate.chain_kind(four, "3+9+12\n\\boxed{24}") == "broken"  # reordered: two terms off
    assert calibrate.chain_kind(four, "12+9+3\n21+3") == "broken"  # no box
    assert calibrate.chain_kind(four, "12+9+3\n2x\n\\boxed{24}") == "broken"
