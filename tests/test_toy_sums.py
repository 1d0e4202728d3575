"""The multi-strategy sum task: solution formats, splits, verifier, strategy recognition."""

from __future__ import annotations

import pytest
from math_verify import parse, verify

from scope_opd.toy.sums import (
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
    assert EXAMPLE.prompt == "Sum 7+5+9+3+8.\n" and EXAMPLE.answer == "32"
    assert sum_solution(EXAMPLE, "left") == "7+5=12\n12+9=21\n21+3=24\n24+8=32\n\\boxed{32}"
    assert sum_solution(EXAMPLE, "right") == "8+3=11\n11+9=20\n20+5=25\n25+7=32\n\\boxed{32}"
    assert sum_solution(EXAMPLE, "pairs") == "7+5=12\n9+3=12\n12+12=24\n24+8=32\n\\boxed{32}"
    assert sum_solution(EXAMPLE.prompt, "pairs") == sum_solution(EXAMPLE, "pairs")


def test_pairs_with_an_even_count_has_no_trailing_number():
    assert sum_solution(SumProblem((1, 2, 3, 4)), "pairs") == "1+2=3\n3+4=7\n3+7=10\n\\boxed{10}"


def test_every_strategy_is_arithmetically_right_and_differs_on_most_problems():
    problems = sum_problems("test", 300, seed=2)
    distinct = 0
    for problem in problems:
        texts = {s: sum_solution(problem, s) for s in STRATEGIES}
        for text in texts.values():
            *steps, boxed = text.split("\n")
            assert len(steps) == len(problem.numbers) - 1
            for step in steps:
                summands, total = step.split("=")
                x, y = summands.split("+")
                assert int(x) + int(y) == int(total)
            assert steps[-1].endswith(f"={problem.answer}")
            assert verify_sum_answer(boxed, problem.answer) == 1.0
        distinct += len(set(texts.values())) == len(STRATEGIES)
    # Mechanism (a): correct solutions of one problem differ (a palindrome like 3+1+4+1+3 can tie left and right).
    assert distinct / len(problems) > 0.9


def test_strategy_of_a_completion_is_recognised_and_anything_else_is_none():
    for strategy in STRATEGIES:
        assert solution_strategy(EXAMPLE, sum_solution(EXAMPLE, strategy) + "\n") == strategy
    slipped = sum_solution(EXAMPLE, "left").replace("12+9=21\n21+3=24\n24+8=32", "12+9=20\n20+3=23\n23+8=31")
    assert solution_strategy(EXAMPLE, slipped) is None
    assert solution_strategy(EXAMPLE.prompt, "7+5=12") is None


def test_prompt_round_trips_and_bad_input_is_named():
    assert parse_sum_prompt("Sum 7+5+9+3+8.\n") == EXAMPLE
    for bad in ("Sum 7+5.", "Add 7+5.\n", "Sum 7+0+1.\n", "Sum 7.\n", "Sum 12+5.\n"):
        with pytest.raises(ValueError, match="not a sum prompt"):
            parse_sum_prompt(bad)
    with pytest.raises(ValueError, match="1..9"):
        SumProblem((3, 10))
    with pytest.raises(ValueError, match="strategy must be one of"):
        sum_solution(EXAMPLE, "middle")


def test_splits_are_disjoint_up_to_reordering_and_seeded():
    train, test = sum_problems("train"), sum_problems("test")
    assert len(train) + len(test) == 9**5
    assert 0.15 < len(test) / 9**5 < 0.25
    multiset = lambda ps: {tuple(sorted(p.numbers)) for p in ps}  # noqa: E731
    assert not multiset(train) & multiset(test)
    assert sum_problems("train", 50, seed=3) == sum_problems("train", 50, seed=3)
    assert sum_problems("train", 50, seed=3) != sum_problems("train", 50, seed=4)
    assert all(p.split == "test" for p in sum_problems("test", 20, seed=1))
    assert all(len(p.numbers) == 4 for p in sum_problems("train", 10, terms=4))


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
    assert verify_sum_answer("7+5=12\n", "32") == 0.0
    assert verify_sum_answer("\\boxed{30}\\boxed{32}", "32") == 1.0


def test_solutions_parse_with_math_verify_as_the_demo_scores_them():
    for problem in sum_problems("test", 10, seed=5):
        for strategy in STRATEGIES:
            text = sum_solution(problem, strategy)
            assert verify(parse(problem.answer), parse(text))
            assert not verify(parse(problem.answer), parse(text.replace(f"{{{problem.answer}}}", "{99}")))


def test_max_completion_length():
    assert sum_max_completion_chars(5) == max(len(sum_solution(SumProblem((9,) * 5), s)) for s in STRATEGIES) == 41


# --- SFT data and models (quick recipe) ---------------------------------------


def test_sft_mix_is_skewed_for_the_student_and_even_for_the_teacher():
    from collections import Counter

    from scope_opd.toy.models import recipe_for, sft_texts

    recipe = recipe_for("sums")
    student, teacher = sft_texts(recipe, "student", seed=0), sft_texts(recipe, "teacher", seed=0)
    assert len(teacher) == len(sum_problems("train"))  # the teacher sees more data ...
    assert len(student) == round(recipe.student_data_fraction * len(teacher))
    for texts, mix in ((student, recipe.student_mix), (teacher, recipe.teacher_mix)):
        counts = Counter(solution_strategy(prompt, completion) for prompt, completion in texts[:3000])
        for strategy, share in mix:  # ... and more strategies (palindromes tie left/right: small tolerance)
            assert abs(counts[strategy] / 3000 - share) < 0.03, (strategy, counts)
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
    assert model.generation_config.max_new_tokens == 48  # 41 characters + EOS, rounded up to 8
    ids = tokenizer(EXAMPLE.prompt + sum_solution(EXAMPLE, "pairs"), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == EXAMPLE.prompt + sum_solution(EXAMPLE, "pairs")
    assert ensure_toy_models(tmp_path, quick=True, task="sums", progress=False) == paths
    assert not (tmp_path / f"{recipe_for('addition', quick=True).name}-seed0").exists()
