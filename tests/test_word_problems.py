"""The offline word problems of the real-model runs: seeded, disjoint splits, arithmetic that checks out."""

from __future__ import annotations

import re

import pytest

from scope_opd.tasks.word_problems import BOXED_INSTRUCTION, word_problems
from scope_opd.verifiers.math import math_score


def test_same_seed_same_problems_other_seed_other_problems():
    assert word_problems("train", 50, seed=3) == word_problems("train", 50, seed=3)
    assert word_problems("train", 50, seed=3) != word_problems("train", 50, seed=4)


def test_train_and_test_never_share_a_problem_whatever_the_seeds():
    train = {r["question"] for seed in range(3) for r in word_problems("train", 400, seed=seed)}
    test = {r["question"] for seed in range(3) for r in word_problems("test", 100, seed=seed)}
    assert train and test and not train & test
    assert len({r["question"] for r in word_problems("test", 100)}) == 100  # distinct within a split


def test_every_step_of_every_worked_solution_is_true_and_ends_in_the_gold_box():
    for row in word_problems("train", 300, seed=1) + word_problems("test", 100, seed=1):
        assert row["prompt"] == f"{row['question']}\n{BOXED_INSTRUCTION}"
        equations = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", row["solution"])
        assert equations, row["solution"]
        for a, op, b, result in equations:  # recomputed here, not by the generator
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "x": a * b, "/": a / b}[op] == result, row["solution"]
        assert int(equations[-1][3]) == int(row["answer"]) >= 0
        assert math_score(row["solution"], row["answer"]) == 1.0  # what `verifier: math` reads


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        word_problems("validation", 3)
    with pytest.raises(ValueError, match="n must be positive"):
        word_problems("train", 0)
