"""`scope train` end to end on tiny local models: YAML + overrides, checkpoints, metrics, KD, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scope_opd.cli import main as scope_main


def write_dataset(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"question": f"Add {a}+{b}.", "gold": str(a + b)} for a, b in [(12, 7), (30, 45), (9, 9), (61, 22)]]


def write_config(tmp_path, tiny_pair_dir, **overrides):
    config = {
        "model_name_or_path": tiny_pair_dir["student"],
        "teacher_model": tiny_pair_dir["teacher"],
        "dataset_name": write_dataset(tmp_path / "train.jsonl", ROWS),
        "prompt_field": "question",
        "answer_field": "gold",
        "verifier": "exact",
        "algorithm": "scope",
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("algorithm", ["scope", "grpo"])
def test_scope_train_writes_checkpoints_and_metrics(tmp_path, tiny_pair_dir, algorithm):
    config = write_config(tmp_path, tiny_pair_dir, algorithm=algorithm)
    # Command-line values override the file (TRL parser conventions).
    assert scope_main(["train", "--config", config, "--max_steps", "1", "--learning_rate", "0.01"]) == 0
    out = tmp_path / "out"
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 1
    logged = state["log_history"][0]
    assert logged["learning_rate"] == 0.01
    assert "timing/generation" in logged and "entropy" in logged
    if algorithm == "scope":
        assert "scope/frac_correct" in logged and "timing/teacher" in logged and "verifier/calls" in logged
    assert (out / "model.safetensors").is_file()


def test_kd_baseline_generates_teacher_data_and_runs_sft(tmp_path, tiny_pair_dir):
    # Random tiny teachers are never right, so keep every sample (kd_keep_only_correct false).
    config = write_config(tmp_path, tiny_pair_dir, algorithm="kd", kd_keep_only_correct=False, kd_samples_per_prompt=2,
                          max_steps=1, save_steps=1)
    assert scope_main(["train", "--config", config]) == 0
    out = tmp_path / "out"
    samples = [json.loads(line) for line in (out / "kd_teacher_samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(ROWS) * 2
    assert {s["prompt"] for s in samples} == {r["question"] for r in ROWS}
    stats = json.loads((out / "kd_stats.json").read_text())
    assert stats["teacher_samples"] == 8 and stats["kept"] == 8
    assert (out / "model.safetensors").is_file()


def test_kd_with_only_wrong_teacher_samples_is_a_clear_error(tmp_path, tiny_pair_dir):
    config = write_config(tmp_path, tiny_pair_dir, algorithm="kd", kd_samples_per_prompt=1, max_steps=1)
    with pytest.raises(ValueError, match="no verified-correct sample"):
        scope_main(["train", "--config", config])


def test_bad_dataset_row_names_file_and_row(tmp_path, tiny_pair_dir):
    rows = ROWS[:2] + [{"question": "Add 1+1."}] + ROWS[2:]
    config = write_config(tmp_path, tiny_pair_dir)
    bad = write_dataset(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 3.*missing field 'gold'"):
        scope_main(["train", "--config", config, "--dataset_name", bad])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty dataset"):
        scope_main(["train", "--config", config, "--dataset_name", str(empty)])
    wrong_type = write_dataset(tmp_path / "wrong.jsonl", [{"question": 17, "gold": "1"}])
    with pytest.raises(ValueError, match=r"wrong\.jsonl.*line 1.*'question' must be a string"):
        scope_main(["train", "--config", config, "--dataset_name", wrong_type])


def test_teacher_with_a_different_tokenizer_is_refused_naming_both(tmp_path, tiny_pair_dir):
    from transformers import AutoModelForCausalLM

    from scope_opd.toy.tokenizer import build_char_tokenizer

    other = tmp_path / "other_teacher"
    AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]).save_pretrained(other)
    build_char_tokenizer(characters="0123456789+=\n abcdefghij").save_pretrained(other)
    config = write_config(tmp_path, tiny_pair_dir, teacher_model=str(other))
    with pytest.raises(ValueError) as err:
        scope_main(["train", "--config", config])
    assert tiny_pair_dir["student"] in str(err.value) and str(other) in str(err.value)


def test_unreachable_teacher_server_is_a_clear_error(tmp_path, tiny_pair_dir):
    from scope_opd.teachers import TeacherServerError

    config = write_config(tmp_path, tiny_pair_dir, teacher_model=None, teacher_server_url="http://127.0.0.1:9",
                          teacher_tokenizer=tiny_pair_dir["teacher"], teacher_max_retries=0, teacher_timeout=2)
    with pytest.raises(TeacherServerError, match="127.0.0.1:9"):
        scope_main(["train", "--config", config])


@pytest.mark.parametrize("null", ["null", "None"])
def test_teacher_model_null_on_the_command_line_unsets_the_presets_teacher(tmp_path, tiny_pair_dir, null):
    """README: `scope train --config ... --teacher_model null --teacher_server_url URL` (a preset naming a teacher)."""
    from scope_opd.teachers import TeacherServerError

    config = write_config(tmp_path, tiny_pair_dir, teacher_server_url=None, teacher_tokenizer=tiny_pair_dir["teacher"],
                          teacher_max_retries=0, teacher_timeout=2)
    # past SCOPEConfig's "not both" check: the run reaches the (unreachable) server
    with pytest.raises(TeacherServerError, match="127.0.0.1:9"):
        scope_main(["train", "--config", config, "--teacher_model", null, "--teacher_server_url", "http://127.0.0.1:9"])


@pytest.mark.parametrize("algorithm", ["scope", "opd", "grpo", "kd"])
def test_toy_presets_run_from_the_repository(tmp_path, monkeypatch, algorithm):
    """configs/toy/*.yaml as shipped, on the quick toy models (built into a temporary cache)."""
    monkeypatch.setenv("SCOPE_OPD_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).parent.parent / "configs" / "toy" / f"{algorithm}.yaml"
    out = tmp_path / algorithm
    extra = ["--kd_keep_only_correct", "false"] if algorithm == "kd" else []  # quick teachers are rarely right
    argv = ["train", "--config", str(config), "--toy_quick", "true", "--max_steps", "1", "--save_steps", "1",
            "--per_device_train_batch_size", "16", "--toy_train_size", "64", "--output_dir", str(out), *extra]
    if algorithm == "kd":
        argv += ["--max_train_samples", "4"]
    assert scope_main(argv) == 0
    assert (out / "checkpoint-1" / "model.safetensors").is_file()
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1


def test_null_and_none_on_the_command_line_are_none_for_optional_fields(tmp_path, tiny_pair_dir):
    """As YAML's null: `--key null` / `--key none` give None for str, int, float and bool optional fields, so a
    preset's teacher can be switched to a server from the command line; report_to keeps its own 'none'."""
    from trl import ModelConfig, TrlParser

    from scope_opd.train_cli import TrainScriptArguments, null_means_none
    from scope_opd.trainer import SCOPEConfig

    config = write_config(tmp_path, tiny_pair_dir, max_train_samples=2, student_logprob_temperature=1.0,
                          verdict_reward="accuracy")
    types = (TrainScriptArguments, SCOPEConfig, ModelConfig)
    parser = TrlParser(types)
    null_means_none(parser, types)
    script, training, model = parser.parse_args_and_config([
        "--config", config, "--teacher_model", "null", "--teacher_server_url", "http://teacher:8000",
        "--max_train_samples", "None", "--student_logprob_temperature", "NULL", "--verdict_reward", "none",
        "--tf32", "null", "--report_to", "none", "--use_cpu", "true"])
    assert training.teacher_model is None and training.teacher_server_url == "http://teacher:8000"
    assert script.max_train_samples is None and training.student_logprob_temperature is None
    assert training.verdict_reward is None and training.tf32 is None
    assert training.report_to == []  # 'none' = no integrations, as documented by transformers
    # A required (non-optional) string keeps the text: "null" is no special value there.
    _, training, _ = parser.parse_args_and_config(["--config", config, "--answer_field", "null", "--use_cpu", "true"])
    assert training.answer_field == "null"
    # The command line the README documents, end to end through `scope --check`.
    assert scope_main(["--check", "train", "--config", config, "--teacher_model", "null",
                       "--teacher_server_url", "http://teacher:8000", "--use_cpu", "true"]) == 0
