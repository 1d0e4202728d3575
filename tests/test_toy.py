"""The toy task (format, splits, verifier) and the toy models' cache (quick recipe only)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from math_verify import parse, verify
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.toy import models as toy_models
from scope_opd.toy.models import RECIPES, ensure_toy_models
from scope_opd.toy.task import (
    ToyProblem,
    parse_toy_prompt,
    toy_dataset,
    toy_max_completion_chars,
    toy_problems,
    toy_solution,
    verify_toy_answer,
)


# --- task -------------------------------------------------------------------


def test_solution_format_matches_the_documented_example():
    problem = ToyProblem(47, 38)
    assert problem.prompt == "Add 47+38.\n"
    assert problem.answer == "85"
    assert toy_solution(problem) == "7+8=15 write 5 carry 1\n4+3+1=8 write 8 carry 0\n\\boxed{85}"
    assert toy_solution(problem.prompt) == toy_solution(problem)


def test_final_carry_becomes_the_leading_digit():
    assert toy_solution(ToyProblem(97, 38)).endswith("9+3+1=13 write 3 carry 1\n\\boxed{135}")


def test_every_step_is_arithmetically_right_for_every_train_and_test_problem():
    for split in ("train", "test"):
        for problem in toy_problems(split):
            *steps, boxed = toy_solution(problem).split("\n")
            assert len(steps) == 2
            assert verify_toy_answer(boxed, problem.answer) == 1.0
            for step in steps:
                summands, rest = step.split("=")
                total = int(rest.split()[0])
                assert sum(int(x) for x in summands.split("+")) == total
                assert rest == f"{total} write {total % 10} carry {total // 10}"


def test_max_completion_length_is_the_all_nines_problem():
    longest = max(len(toy_solution(p)) for split in ("train", "test") for p in toy_problems(split))
    assert toy_max_completion_chars(2) == longest == 59
    assert toy_max_completion_chars(3) == len(toy_solution(ToyProblem(999, 999)))


def test_prompt_round_trips_and_rejects_other_text():
    assert parse_toy_prompt("Add 47+38.\n") == ToyProblem(47, 38)
    with pytest.raises(ValueError):
        parse_toy_prompt("Add 47 + 38")


def test_generation_is_seeded():
    assert toy_problems("train", 50, seed=3) == toy_problems("train", 50, seed=3)
    assert toy_problems("train", 50, seed=3) != toy_problems("train", 50, seed=4)
    assert toy_problems("test", 5, seed=1, digits=4) == toy_problems("test", 5, seed=1, digits=4)
    assert all(len(str(p.a)) == len(str(p.b)) == 4 for p in toy_problems("test", 5, digits=4))


def test_train_and_test_splits_are_disjoint_even_up_to_commutation():
    train, test = toy_problems("train"), toy_problems("test")
    assert len(train) + len(test) == 90 * 90
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    unordered = lambda ps: {frozenset((p.a, p.b)) for p in ps}  # noqa: E731
    assert not unordered(train) & unordered(test)
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    wide_test = toy_problems("test", 200, digits=3)
    assert not set(wide_test) & set(toy_problems("train", 2000, digits=3))
    assert all(p.split == "test" for p in wide_test)


def test_asking_for_more_problems_than_a_split_holds_raises():
    with pytest.raises(ValueError):
        toy_problems("test", len(toy_problems("test")) + 1)
    with pytest.raises(ValueError):
        toy_problems("validation", 1)


def test_dataset_has_the_columns_grpo_consumes():
    data = toy_dataset("test", 16, seed=0)
    assert data.column_names == ["prompt", "answer"]
    assert len(data) == 16
    row = data[0]
    problem = parse_toy_prompt(row["prompt"])
    assert row["answer"] == problem.answer == str(problem.a + problem.b)
    assert toy_dataset("test", 16, seed=0)["prompt"] == data["prompt"]


def test_verifier_checks_only_the_final_boxed_answer():
    right_chain = toy_solution(ToyProblem(47, 38))
    wrong_chain_right_box = "7+8=14 write 4 carry 1\n4+3+1=9 write 9 carry 0\n\\boxed{85}"
    right_chain_wrong_box = right_chain.replace("\\boxed{85}", "\\boxed{94}")
    assert verify_toy_answer(right_chain, "85") == 1.0
    assert verify_toy_answer(wrong_chain_right_box, "85") == 1.0
    assert verify_toy_answer(right_chain_wrong_box, "85") == 0.0
    assert verify_toy_answer("7+8=15 write 5 carry 1\n", "85") == 0.0  # no box
    assert verify_toy_answer("\\boxed{12} then \\boxed{85}", "85") == 1.0  # the last box counts
    assert verify_toy_answer("\\boxed{ 085 }", "85") == 1.0


def test_solutions_parse_with_math_verify():
    for problem in toy_problems("test", 20, seed=5):
        gold = parse(problem.answer)
        assert verify(gold, parse(toy_solution(problem)))
        assert not verify(gold, parse(toy_solution(problem).replace(problem.answer, str(int(problem.answer) + 1))))


# --- models (quick recipe) --------------------------------------------------


def weights_hash(path) -> str:
    state = load_file(str(path / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def quick_models(tmp_path_factory):
    cache = tmp_path_factory.mktemp("toy_cache")
    return cache, ensure_toy_models(cache, seed=0, quick=True, progress=False)


def test_quick_models_load_like_hub_checkpoints(quick_models):
    _, paths = quick_models
    for path in (paths.teacher, paths.student):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "qwen2"
        assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
        assert model.generation_config.eos_token_id == 1 and model.generation_config.pad_token_id == 0
        assert model.generation_config.max_new_tokens >= toy_max_completion_chars(2) + 1
        prompt = tokenizer(["Add 47+38.\n", "Add 9+10.\n"], return_tensors="pt", padding=True)
        out = model.generate(**prompt, max_new_tokens=5)
        assert out.shape[0] == 2 and out.shape[1] <= prompt["input_ids"].shape[1] + 5
    assert len(AutoTokenizer.from_pretrained(paths.teacher)) == len(AutoTokenizer.from_pretrained(paths.student))
    assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths.teacher).parameters()) > sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(paths.student).parameters()
    )


def test_checkpoint_tokenizer_reloads_as_the_char_tokenizer(quick_models):
    # AutoTokenizer turns any qwen2 checkpoint's tokenizer into Qwen2Tokenizer
    # (byte-level BPE); it must still give one token per character with the
    # ids the models were trained on, spaces and newlines included.
    from scope_opd.toy.tokenizer import CHARACTERS, build_char_tokenizer

    _, paths = quick_models
    char = build_char_tokenizer()
    loaded = AutoTokenizer.from_pretrained(paths.student)
    texts = [p.prompt + toy_solution(p) + loaded.eos_token for p in toy_problems("test", 50)] + [CHARACTERS, " a\n\n b "]
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == char(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    batch = loaded(["Add 1+2.\n", "Add 10+20.\n"], padding=True)
    assert batch["input_ids"][0][0] == loaded.pad_token_id  # left padding survives the round trip


def test_cached_models_are_not_rebuilt(quick_models, monkeypatch):
    cache, paths = quick_models

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached toy model")

    monkeypatch.setattr(toy_models, "train_toy_model", fail)
    assert ensure_toy_models(cache, seed=0, quick=True, progress=False) == paths


def test_build_is_deterministic_given_the_seed(quick_models, tmp_path):
    _, paths = quick_models
    again = ensure_toy_models(tmp_path, seed=0, quick=True, progress=False)
    assert weights_hash(again.teacher) == weights_hash(paths.teacher)
    assert weights_hash(again.student) == weights_hash(paths.student)
    info = json.loads((again.teacher.parent / "recipe.json").read_text())
    assert info["seed"] == 0 and info["recipe"]["name"] == RECIPES["quick"].name


def test_a_partial_build_folder_is_ignored(tmp_path, monkeypatch):
    # A killed build leaves only its temporary folder behind; it must neither be
    # picked up nor block the next build.
    final = tmp_path / f"{RECIPES['quick'].name}-seed7"
    partial = tmp_path / f".{final.name}.building-killed"
    (partial / "teacher").mkdir(parents=True)
    (partial / "teacher" / "config.json").write_text("{}")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_models, "train_toy_model", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_models(tmp_path, seed=7, quick=True, progress=False)
    assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]  # our own temp folder was removed
    monkeypatch.undo()

    paths = ensure_toy_models(tmp_path, seed=7, quick=True, progress=False)
    assert paths.teacher == final / "teacher"
    AutoModelForCausalLM.from_pretrained(paths.student)


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_OPD_CACHE", str(tmp_path))
    assert toy_models.default_cache_dir() == tmp_path
    monkeypatch.delenv("SCOPE_OPD_CACHE")
    assert toy_models.default_cache_dir().parts[-2:] == (".cache", "scope_opd")
