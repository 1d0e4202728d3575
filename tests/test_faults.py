"""Fault injection: every broken input or component ends in a clear error or a counted, documented handling.

Real processes on loopback, tiny local models, no stand-ins for our own code: teacher servers
are ``scope serve-teacher`` subprocesses (killed with SIGKILL, restarted on the same port); the
broken-vLLM cases use ``tests/fault_helpers.py fake-vllm``, a separate process that imitates a
misbehaving external server. docs/reliability.md lists each case with the test that shows it.
Already covered elsewhere, not repeated here: a dataset row with a missing field or a non-string
prompt, an empty .jsonl, a teacher with another vocabulary and an unreachable server
(tests/test_train_cli.py); kill -9 and resume (tests/test_resume.py); hostile code in the code
verifier (tests/test_code_sandbox.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fault_helpers import HANG_GOLD, RAISE_GOLD, fake_logprob, poison
from scope_opd.checkpointing import last_complete_checkpoint
from scope_opd.cli import main as scope_main
from scope_opd.teachers import ServerTeacher, TeacherServerError
from scope_opd.teachers.tokenizer_check import TokenizerMismatchWarning
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

TESTS_DIR = Path(__file__).parent
PROMPTS = ["Add 12+7.\n", "Add 30+45.\n", "Add 9+9.\n", "Add 61+22.\n"]
ANSWERS = ["19", "75", "18", "83"]
G = 4  # rollouts per prompt: 8 rows = 2 prompt groups per step
EOS = 1  # the char tokenizer's <|endoftext|>
API_KEY_ENV = "SCOPE_FAULT_TEST_KEY"
API_KEY = "sk-fault-test-4f1d9c2e7b"


def always_wrong(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def always_right(prompts, completions, **kwargs):
    return [1.0] * len(completions)


# -- trainer helpers ----------------------------------------------------------------------------


def make_args(tmp_path, **overrides) -> SCOPEConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        algorithm="scope",
        per_device_train_batch_size=2 * G,
        num_generations=G,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        temperature=1.0,
        learning_rate=1e-2,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return SCOPEConfig(**base)


class RecordingTrainer(SCOPETrainer):
    """SCOPETrainer that keeps a copy of each generation batch it built (the inputs of the loss)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generation_batches = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.generation_batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in output.items()})
        return output


def make_trainer(tiny_pair_dir, args, *, reward_funcs=(always_wrong,), dataset=None, **kwargs) -> RecordingTrainer:
    return RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]),
        reward_funcs=None if reward_funcs is None else list(reward_funcs),
        args=args,
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
        **kwargs,
    )


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_whole_groups_normalised(gen, valid):
    """'mean' normalisation over the rows that survived: a path's weights in a group sum to its valid size."""
    correct = gen["scope_correct"]
    for group in range(len(correct) // G):
        rows = slice(group * G, (group + 1) * G)
        for weights, on_path in ((gen["scope_student_weights"], correct), (gen["scope_teacher_weights"], ~correct)):
            members = (on_path & valid)[rows]
            assert weights[rows][~members].eq(0).all()
            assert weights[rows][members].sum().item() == pytest.approx(float(members.sum()), rel=1e-5)


def row_token_lists(gen) -> tuple[list[list[int]], list[list[int]]]:
    """Unpadded prompt and completion ids of each row (completion = the tokens the mask keeps)."""
    prompts = [p[m.bool()].tolist() for p, m in zip(gen["prompt_ids"], gen["prompt_mask"])]
    lengths = gen["completion_mask"].sum(dim=1).tolist()
    completions = [c[: int(n)].tolist() for c, n in zip(gen["completion_ids"], lengths)]
    return prompts, completions


# -- server processes ---------------------------------------------------------------------------


def _first_line(proc: subprocess.Popen, log: Path) -> str:
    line = proc.stdout.readline()
    assert "serving" in line, f"server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
    return line.rsplit(" on ", 1)[1].strip()


class Servers:
    """Server subprocesses on 127.0.0.1; all killed (by pid) at teardown. Stderr goes to a log file each."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self._urls: dict[str, str] = {}

    def launch(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start without waiting (booting `scope serve-teacher` takes seconds: do it ahead of need)."""
        log = self.log_dir / f"{name}.log"
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
        with open(log, "w") as stderr:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.procs[name] = (proc, log)
        return proc

    def url(self, name: str) -> str:
        """The server's base URL, once it is listening."""
        if name not in self._urls:
            proc, log = self.procs[name]
            self._urls[name] = _first_line(proc, log)
        return self._urls[name]

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text()

    def kill(self, name: str) -> None:
        proc = self.procs[name][0]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def serve_teacher_command(model_path: str, port: int = 0, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scope_opd.cli", "serve-teacher", "--model", model_path, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--device", "cpu", *extra]


def fake_vllm_command(mode: str, *extra: str) -> list[str]:
    return [sys.executable, str(TESTS_DIR / "fault_helpers.py"), "fake-vllm", "--mode", mode, *extra]


# `scope serve-teacher` processes the later tests use, booted in the background while the earlier
# tests run (each boot imports torch and transformers: several seconds on a busy 2-core machine).
PRESTARTED = {
    "restart-victim": (),  # killed mid-run, then restarted on its port
    "kill-victim": (),  # killed for good
    "healthy-keyed": ("--api-key-env", API_KEY_ENV),  # resume target and the secrets test
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    running = Servers(tmp_path_factory.mktemp("servers"))
    yield running
    running.close()


@pytest.fixture(scope="module", autouse=True)
def _boot_teacher_servers_early(request, servers, tiny_pair_dir):
    """Launch PRESTARTED if any selected test of this module uses `teacher_servers` (not for a single -k run)."""
    selected = [item for item in request.session.items if item.module is request.module]
    if any("teacher_servers" in item.fixturenames for item in selected):
        for name, extra in PRESTARTED.items():
            servers.launch(name, serve_teacher_command(tiny_pair_dir["teacher"], 0, *extra),
                           env=dict(os.environ, **{API_KEY_ENV: API_KEY}))


@pytest.fixture
def teacher_servers(servers):
    return servers


@pytest.fixture
def fake_vllm(tmp_path):
    running = Servers(tmp_path)

    def start(mode: str, *extra: str) -> str:
        running.launch(mode, fake_vllm_command(mode, *extra))
        return running.url(mode)

    yield start
    running.close()


def server_args(tmp_path, tiny_pair_dir, url, **overrides) -> SCOPEConfig:
    return make_args(tmp_path, teacher_server_url=url, teacher_tokenizer=tiny_pair_dir["teacher"], **overrides)


def write_config(tmp_path: Path, tiny_pair_dir, **overrides) -> str:
    """A `scope train` YAML file over a 4-row jsonl dataset and the tiny pair."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(PROMPTS, ANSWERS)))
    config = {
        "model_name_or_path": tiny_pair_dir["student"],
        "teacher_model": tiny_pair_dir["teacher"],
        "dataset_name": str(data),
        "verifier": "exact",
        "per_device_train_batch_size": 2 * G,
        "num_generations": G,
        "max_completion_length": 8,
        "max_steps": 1,
        "logging_steps": 1,
        "save_steps": 1,
        "learning_rate": 0.01,
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# =============================================================================== data


def write_parquet(path: Path, columns: dict) -> str:
    Dataset.from_dict(columns).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"question": ["Add 1+1.", "Add 2+2.", "Add 3+3."], "gold": ["2", None, "6"]}, r"row 1: field 'gold' is null"),
        ({"question": ["Add 1+1.", "Add 2+2."]}, r"row 0: missing field 'gold' \(fields present: 'question'\)"),
        ({"question": ["Add 1+1.", "Add 2+2."], "gold": [True, False]},
         r"row 0: field 'gold' must be a string, number"),
        ({"question": [1, 2], "gold": ["2", "4"]}, r"row 0: field 'question' must be a string or a list of"),
        ({"question": ["Add 1+1.", "   "], "gold": ["2", "4"]}, r"row 1: field 'question' is an empty string"),
        (
            {"question": [[{"role": "user", "content": "Add 1+1."}], [{"role": "user", "content": None}]],
             "gold": ["2", "4"]},
            r"row 1: field 'question' must be a string or a list of \{'role', 'content'\} messages",
        ),
    ],
    ids=["answer-null", "answer-column-missing", "answer-bool", "prompt-int", "prompt-blank",
         "chat-message-without-content"],
)
def test_bad_parquet_rows_are_errors_naming_file_and_row(tmp_path, tiny_pair_dir, columns, message):
    config = write_config(tmp_path, tiny_pair_dir)
    data = write_parquet(tmp_path / "train.parquet", columns)
    with pytest.raises(ValueError, match=re.escape(data) + ": " + message):
        scope_main(["train", "--config", config, "--dataset_name", data, "--prompt_field", "question",
                    "--answer_field", "gold"])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": [{"role": "user"}], "gold": "2"},
         "must be a string or a list of {'role', 'content'} messages, got list"),
        ({"question": [{"role": "user", "content": 7}], "gold": "2"}, "must be a string or a list of"),
        ({"question": [], "gold": "2"}, "must be a string or a list of"),
        ({"question": ["Add 1+1."], "gold": "2"}, "must be a string or a list of"),
        ("Add 1+1.", "expected an object with fields, got str"),
    ],
    ids=["message-without-content", "message-content-int", "no-messages", "message-not-a-dict", "row-not-an-object"],
)
def test_bad_chat_message_prompts_are_errors_naming_file_and_line(tmp_path, tiny_pair_dir, row, message):
    good = {"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2+2."}],
            "gold": "4"}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    config = write_config(tmp_path, tiny_pair_dir, prompt_field="question", answer_field="gold")
    with pytest.raises(ValueError, match=re.escape(f"{data}: line 2: ") + ".*" + re.escape(message)):
        scope_main(["train", "--config", config, "--dataset_name", str(data)])


def test_empty_unreadable_or_missing_dataset_files_are_errors_naming_the_file(tmp_path, tiny_pair_dir):
    config = write_config(tmp_path, tiny_pair_dir)
    empty = write_parquet(tmp_path / "empty.parquet", {"prompt": [], "answer": []})
    with pytest.raises(ValueError, match=re.escape(empty) + ": no training rows"):
        scope_main(["train", "--config", config, "--dataset_name", empty])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=re.escape(f"{corrupt}: cannot read this parquet file")):
        scope_main(["train", "--config", config, "--dataset_name", str(corrupt)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "Add 1+1.", "answer": "2"}) + '\n{"prompt": "Add 2+\n')
    with pytest.raises(ValueError, match=re.escape(f"{broken}: line 2: not valid JSON")):
        scope_main(["train", "--config", config, "--dataset_name", str(broken)])
    broken_array = tmp_path / "broken.json"
    broken_array.write_text('[{"prompt": "Add 1+1.", "answer": "2"},\n {"prompt": "Add 2+2." "answer": "4"}]')
    with pytest.raises(ValueError, match=re.escape(f"{broken_array}: not valid JSON")):
        scope_main(["train", "--config", config, "--dataset_name", str(broken_array)])
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,answer\nAdd 1+1.,2\n")
    with pytest.raises(ValueError, match=re.escape(str(csv)) + ": unsupported file type"):
        scope_main(["train", "--config", config, "--dataset_name", str(csv)])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        scope_main(["train", "--config", config, "--dataset_name", str(tmp_path / "nope.jsonl")])


def test_chat_prompts_for_a_student_without_chat_template_fail_at_the_first_step_saying_so(tmp_path, tiny_pair_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "answer": a}) + "\n"
                            for p, a in zip(PROMPTS, ANSWERS)))
    config = write_config(tmp_path, tiny_pair_dir)  # the char tokenizer has no chat template
    with pytest.raises(ValueError, match="tokenizer.chat_template is not set"):
        scope_main(["train", "--config", config, "--dataset_name", str(data)])
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_dataset_smaller_than_one_generation_batch_is_an_error_not_a_zero_step_run(tmp_path, tiny_pair_dir):
    """TRL drops a generation batch that is not full: 1 prompt for 2-prompt batches would train 0 steps."""
    dataset = Dataset.from_dict({"prompt": PROMPTS[:1], "answer": ANSWERS[:1]})
    with pytest.raises(ValueError, match=r"train_dataset has 1 prompts, but one generation batch takes 2 distinct "
                                         r"prompts \(generation_batch_size 8 / num_generations 4\)"):
        make_trainer(tiny_pair_dir, make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]), dataset=dataset)


# =============================================================================== tokenizers


def save_teacher_copy(tiny_pair_dir, path: Path, tokenizer) -> str:
    """The tiny teacher's weights, saved with another tokenizer."""
    AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_teacher_with_another_eos_is_refused_naming_both_unless_allowed(tmp_path, tiny_pair_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["teacher"])
    tokenizer.eos_token = "<|unk|>"  # same vocabulary, other stop token (Qwen3 base vs chat)
    teacher = save_teacher_copy(tiny_pair_dir, tmp_path / "eos_teacher", tokenizer)
    args = make_args(tmp_path, teacher_model=teacher)
    with pytest.raises(ValueError, match=r"disagree on special tokens \(eos_token_id 1 vs 2\)") as info:
        make_trainer(tiny_pair_dir, args)
    assert tiny_pair_dir["student"] in str(info.value) and teacher in str(info.value)
    args = make_args(tmp_path, teacher_model=teacher, teacher_allow_special_token_mismatch=True)
    with pytest.warns(TokenizerMismatchWarning, match="eos_token_id 1 vs 2"):
        make_trainer(tiny_pair_dir, args)


def test_chat_template_on_the_teacher_side_only_warns_and_training_proceeds(tmp_path, tiny_pair_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["teacher"])
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    teacher = save_teacher_copy(tiny_pair_dir, tmp_path / "chat_teacher", tokenizer)
    with pytest.warns(TokenizerMismatchWarning, match=rf"only '{re.escape(teacher)}' has a chat template, "
                      rf"'{re.escape(tiny_pair_dir['student'])}' has none"):
        trainer = make_trainer(tiny_pair_dir, make_args(tmp_path, teacher_model=teacher))
    trainer.train()  # scoring is well defined: the teacher scores the student-formatted ids
    assert math.isfinite(step_logs(trainer)[0]["loss"])


def test_server_teacher_without_a_tokenizer_to_compare_warns_that_the_check_is_skipped(tmp_path, tiny_pair_dir,
                                                                                        fake_vllm):
    url = fake_vllm("nonfinite")  # contacted at start-up only for its /v1/models card (max_model_len)
    args = make_args(tmp_path, teacher_server_url=url)
    with pytest.warns(UserWarning, match=rf"teacher tokenizer not available for '{re.escape(url)}'.*check is "
                                         r"skipped; set teacher_tokenizer"):
        make_trainer(tiny_pair_dir, args)


def test_student_with_a_larger_embedding_table_than_the_teacher_is_refused_naming_both(tmp_path, tiny_pair_dir):
    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    student.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tiny_pair_dir["student"])) + 16)
    student_path = tmp_path / "padded_student"
    student.save_pretrained(student_path)
    AutoTokenizer.from_pretrained(tiny_pair_dir["student"]).save_pretrained(student_path)
    with pytest.raises(ValueError, match=r"can emit token ids up to 114 .* has only 99 embedding rows") as info:
        RecordingTrainer(
            AutoModelForCausalLM.from_pretrained(student_path), reward_funcs=[always_wrong],
            args=make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}),
            processing_class=AutoTokenizer.from_pretrained(student_path),
        )
    assert str(student_path) in str(info.value) and tiny_pair_dir["teacher"] in str(info.value)


# =============================================================================== verifiers


def test_verifier_that_raises_hangs_or_gets_a_missing_or_unparsable_gold_scores_zero_and_is_counted(
    tmp_path, tiny_pair_dir
):
    """One step, four prompts: gold RAISE (verifier raises), HANG (sleeps past verifier_timeout), None, '$ $'."""
    dataset = Dataset.from_dict({"prompt": PROMPTS, "answer": [RAISE_GOLD, HANG_GOLD, None, "$ $"]})
    args = make_args(tmp_path, verifier="fault_helpers:faulty_verifier", verifier_timeout=3, num_generations=2,
                     per_device_train_batch_size=8, teacher_model=tiny_pair_dir["teacher"])
    trainer = make_trainer(tiny_pair_dir, args, reward_funcs=None, dataset=dataset)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.train()
    (logged,) = step_logs(trainer)
    assert {k: logged[f"verifier/{k}"] for k in ("calls", "errors", "timeouts", "missing_gold", "invalid_gold")} == {
        "calls": 8, "errors": 2, "timeouts": 2, "missing_gold": 2, "invalid_gold": 2}
    messages = " ".join(str(w.message) for w in caught)
    for text in ("verifier bug: cannot parse", "overran the time limit", "gold answer is missing", "cannot be used"):
        assert text in messages, text
    (gen,) = trainer.generation_batches
    assert not gen["scope_correct"].any()  # every failure scored 0: all rows on the teacher path
    assert logged["scope/frac_correct"] == 0.0 and math.isfinite(logged["loss"])


@pytest.mark.parametrize("algorithm", ["scope", "grpo"])
def test_reward_function_passed_by_the_user_has_its_failures_counted_in_the_trainer_logs(
    tmp_path, tiny_pair_dir, algorithm
):
    from fault_helpers import faulty_verifier
    from scope_opd.verifiers import RewardFunction

    reward = RewardFunction(faulty_verifier, timeout_s=5)
    dataset = Dataset.from_dict({"prompt": PROMPTS[:2], "answer": [RAISE_GOLD, "19"]})
    teacher = tiny_pair_dir["teacher"] if algorithm == "scope" else None
    trainer = make_trainer(tiny_pair_dir, make_args(tmp_path, algorithm=algorithm, teacher_model=teacher),
                           reward_funcs=[reward], dataset=dataset)
    with pytest.warns(RuntimeWarning, match="verifier bug"):
        trainer.train()
    (logged,) = step_logs(trainer)
    assert logged["verifier/calls"] == 8 and logged["verifier/errors"] == 4
    reward.close()


def test_plain_reward_callable_that_raises_stops_training_with_its_own_error(tmp_path, tiny_pair_dir):
    """Not our verifier: TRL calls a plain callable directly. Wrap it in RewardFunction to score 0 and count."""

    def broken_reward(prompts, completions, **kwargs):
        raise KeyError("reward needs column 'solution'")

    trainer = make_trainer(tiny_pair_dir, make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]),
                           reward_funcs=[broken_reward])
    with pytest.raises(KeyError, match="reward needs column 'solution'"):
        trainer.train()


def test_unscorable_rollouts_count_as_incorrect_and_are_counted(tmp_path, tiny_pair_dir):
    def no_verdict_for_the_first_group(prompts, completions, **kwargs):
        return [None] * G + [1.0] * (len(completions) - G)  # TRL: None = "this reward does not apply"

    trainer = make_trainer(tiny_pair_dir, make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]),
                           reward_funcs=[no_verdict_for_the_first_group])
    trainer.train()
    (gen,) = trainer.generation_batches
    (logged,) = step_logs(trainer)
    first_group = torch.arange(2 * G) < G
    assert torch.equal(gen["scope_correct"], ~first_group)  # unscorable = incorrect: the teacher path
    assert gen["scope_teacher_weights"][first_group].gt(0).all()
    assert logged["scope/unscorable_rows"] == G and math.isfinite(logged["loss"])
    assert_whole_groups_normalised(gen, torch.ones(2 * G, dtype=torch.bool))


# =============================================================================== rollouts


@pytest.mark.parametrize("verdict", ["all_correct", "all_wrong"])
def test_batch_with_one_path_only_trains_on_that_path_with_whole_group_weights(tmp_path, tiny_pair_dir, verdict):
    reward = always_right if verdict == "all_correct" else always_wrong
    trainer = make_trainer(tiny_pair_dir, make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"]),
                           reward_funcs=[reward])
    trainer.train()
    (gen,) = trainer.generation_batches
    (logged,) = step_logs(trainer)
    assert math.isfinite(logged["loss"])
    assert_whole_groups_normalised(gen, torch.ones(2 * G, dtype=torch.bool))
    if verdict == "all_correct":
        assert gen["scope_correct"].all() and logged["scope/frac_all_correct_groups"] == 1.0
        assert gen["scope_teacher_weights"].eq(0).all() and gen["teacher_per_token_logps"].eq(0).all()
        assert logged["timing/teacher"] == 0.0  # the teacher is never queried
        assert logged["scope/loss/opd"] == 0.0 and logged["loss"] < 0  # -sum(w * rho) / tokens
    else:
        assert not gen["scope_correct"].any() and logged["scope/frac_all_wrong_groups"] == 1.0
        assert gen["scope_student_weights"].eq(0).all()
        assert logged["scope/loss/mle"] == 0.0 and logged["timing/teacher"] > 0


def eos_biased_args(tmp_path, tiny_pair_dir, **overrides) -> SCOPEConfig:
    """Rollouts that stop at once, early, or not at all: EOS gets +3 logits. With seed 1 the first batch
    has lengths [8, 2, 2, 3, 3, 8, 4, 1]: rows 0 and 5 truncated (no EOS), row 7 EOS first (empty text)."""
    return make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"], seed=1,
                     generation_kwargs={"sequence_bias": [[[EOS], 3.0]]}, **overrides)


def test_empty_and_truncated_completions_are_trained_on_the_tokens_they_have(tmp_path, tiny_pair_dir):
    trainer = make_trainer(tiny_pair_dir, eos_biased_args(tmp_path, tiny_pair_dir))
    trainer.train()
    (gen,) = trainer.generation_batches
    (logged,) = step_logs(trainer)
    lengths = gen["completion_mask"].sum(dim=1)
    ends_with_eos = gen["completion_ids"].gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1) == EOS
    empty_text = (lengths == 1) & ends_with_eos  # EOS first: no text, one (EOS) token
    truncated = ~ends_with_eos  # hit max_completion_length without EOS
    assert empty_text.any() and truncated.any(), "seed 1 should give both kinds of rollouts"
    assert torch.equal(gen["scope_loss_mask"].sum(dim=1), lengths)  # every row keeps its tokens
    assert gen["scope_teacher_weights"].gt(0).all() and logged["scope/frac_invalid_rows"] == 0.0
    assert math.isfinite(logged["loss"])


def test_masked_truncated_completions_are_dropped_and_groups_shrink(tmp_path, tiny_pair_dir):
    """mask_truncated_completions=True (TRL) leaves truncated rows with no response tokens: invalid, weight 0."""
    trainer = make_trainer(tiny_pair_dir, eos_biased_args(tmp_path, tiny_pair_dir, mask_truncated_completions=True))
    trainer.train()
    (gen,) = trainer.generation_batches
    (logged,) = step_logs(trainer)
    empty = gen["completion_mask"].sum(dim=1) == 0
    assert empty.any() and not empty.all(), "seed 1 should truncate some rollouts, not all"
    assert gen["scope_loss_mask"][empty].eq(0).all() and gen["scope_teacher_weights"][empty].eq(0).all()
    assert logged["scope/frac_invalid_rows"] == pytest.approx(empty.float().mean().item())
    assert_whole_groups_normalised(gen, ~empty)  # weights renormalised over each group's remaining rows
    assert math.isfinite(logged["loss"])


def test_batch_where_every_row_is_dropped_gives_zero_loss_not_nan(tmp_path, tiny_pair_dir):
    args = make_args(tmp_path, teacher_model=tiny_pair_dir["teacher"], mask_truncated_completions=True,
                     generation_kwargs={"suppress_tokens": [EOS]})  # no rollout can stop: all truncated
    trainer = make_trainer(tiny_pair_dir, args)
    trainer.train()
    (gen,) = trainer.generation_batches
    (logged,) = step_logs(trainer)
    assert gen["completion_mask"].eq(0).all()
    assert logged["scope/frac_invalid_rows"] == 1.0 and logged["loss"] == 0.0
    assert gen["scope_teacher_weights"].eq(0).all() and gen["scope_student_weights"].eq(0).all()
    assert math.isfinite(logged["grad_norm"])


# =============================================================================== in-process teacher


def test_in_process_teacher_nan_on_some_tokens_drops_those_rows_and_trains_the_others(tmp_path, tiny_pair_dir):
    """A saved teacher whose input embeddings of two tokens are NaN: every row that feeds one of them to the
    teacher gets NaN log-probs, is dropped (weight 0, no loss) and counted; its group shrinks."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    # Pass 1, healthy teacher: see which tokens the student samples with seed 0.
    healthy = make_trainer(tiny_pair_dir, make_args(tmp_path / "healthy", teacher_model=tiny_pair_dir["teacher"]))
    healthy.train()
    prompts, completions = row_token_lists(healthy.generation_batches[0])
    teacher_inputs = [set(p + c[:-1]) for p, c in zip(prompts, completions)]  # the last token is only a target

    def dropped_rows(tokens):
        return torch.tensor([bool(rows & tokens) for rows in teacher_inputs])

    # One token of the first group's prompt (drops that whole group) and one the student sampled that
    # only some rows of the second group feed to the teacher (that group shrinks but keeps rows).
    in_prompt = sorted(set(prompts[0]) - set(prompts[G]))
    # (Not EOS or the pad id: the teacher right-pads its batches with the pad id, and padding must stay finite.)
    in_completions = sorted({t for c in completions for t in c} - {t for p in prompts for t in p}
                            - {EOS, tokenizer.pad_token_id})
    in_prompt, in_completions = next(
        (a, b) for a in in_prompt for b in in_completions if 0 < dropped_rows({a, b})[G:].sum() < G
    )
    dropped = dropped_rows({in_prompt, in_completions})
    assert dropped[:G].all()

    poisoned = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"])
    poisoned.config.tie_word_embeddings = False
    poisoned.lm_head.weight = torch.nn.Parameter(poisoned.lm_head.weight.detach().clone())
    with torch.no_grad():
        poisoned.get_input_embeddings().weight[[in_prompt, in_completions]] = float("nan")
    poisoned_path = tmp_path / "nan_teacher"
    poisoned.save_pretrained(poisoned_path)
    tokenizer.save_pretrained(poisoned_path)

    # Pass 2, same seed, same rollouts, poisoned teacher.
    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = RecordingTrainer(
        student, reward_funcs=[always_wrong], args=make_args(tmp_path, teacher_model=str(poisoned_path)),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}), processing_class=tokenizer,
    )
    trainer.train()
    (gen,) = trainer.generation_batches
    assert row_token_lists(gen) == (prompts, completions)
    (logged,) = step_logs(trainer)
    assert logged["scope/teacher_nonfinite_rows"] == dropped.sum().item()
    assert logged["scope/frac_invalid_rows"] == pytest.approx(dropped.float().mean().item())
    assert gen["scope_loss_mask"][dropped].eq(0).all() and gen["scope_teacher_weights"][dropped].eq(0).all()
    assert gen["scope_teacher_weights"][~dropped].gt(0).all()
    assert torch.isfinite(gen["teacher_per_token_logps"]).all()  # the loss never sees the NaNs
    assert_whole_groups_normalised(gen, ~dropped)
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    assert any(not torch.equal(p.detach(), before[n]) for n, p in student.named_parameters())


def test_custom_teacher_returning_fewer_logprobs_than_tokens_is_an_error_naming_the_row(tmp_path, tiny_pair_dir):
    class OffByOneScorer:
        """A user's TeacherScorer with a bug: drops the last token's log-prob of the third row it gets."""

        def score(self, prompt_ids, completion_ids):
            return [torch.full((len(c) - (i == 2),), -1.0) for i, c in enumerate(completion_ids)]

    trainer = make_trainer(tiny_pair_dir, make_args(tmp_path), teacher=OffByOneScorer())
    with pytest.raises(RuntimeError, match=r"teacher returned \d+ log-probs for row 2 of the generation batch, "
                                           r"whose completion has \d+ tokens"):
        trainer.train()


# =============================================================================== broken vLLM-style servers


def test_server_returning_malformed_json_is_retried_then_a_clear_error(tmp_path, tiny_pair_dir, fake_vllm):
    url = fake_vllm("malformed")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, teacher_max_retries=1))
    with pytest.raises(TeacherServerError, match=re.escape(f"{url}/v1/completions") + r" failed for rows \[\d+\] "
                       r"after 2 attempts: malformed response"):
        trainer.train()
    assert trainer.teacher.counters()["retries"] >= 1


def test_server_returning_fewer_logprobs_than_tokens_is_an_error_naming_the_row(tmp_path, tiny_pair_dir, fake_vllm):
    url = fake_vllm("short")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, teacher_max_retries=0))
    with pytest.raises(TeacherServerError, match=r"for rows \[\d+\] after 1 attempts: malformed response: "
                       r"prompt 0: prompt_logprobs has (\d+) entries for (\d+) tokens") as info:
        trainer.train()
    got, expected = map(int, re.search(r"has (\d+) entries for (\d+) tokens", str(info.value)).groups())
    assert got == expected - 1 and url in str(info.value)


def test_server_slower_than_the_timeout_is_retried_then_a_clear_error(tmp_path, tiny_pair_dir, fake_vllm):
    url = fake_vllm("slow", "--delay", "5")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, teacher_timeout=0.5,
                                                      teacher_max_retries=1))
    with pytest.raises(TeacherServerError, match=re.escape(url) + r".* after 2 attempts: .*(Read timed out|Timeout)"):
        trainer.train()


def test_server_trickling_its_answer_times_out_like_a_slow_one(tmp_path, tiny_pair_dir, fake_vllm):
    """Bytes keep coming, so no socket read ever times out: the limit is on the whole answer."""
    url = fake_vllm("trickle", "--delay", "0.1")  # ~80 bytes/s: a row's answer takes 10 s or more
    # The first answer the trainer waits for is the model card (/v1/models, read at construction to check
    # the context length); it trickles like every other answer, so construction fails the same way.
    trainer = None
    with pytest.raises(TeacherServerError, match=re.escape(url) + r".* after 2 attempts: Timeout: "
                       r"the answer was not complete after 1 s"):
        trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, teacher_timeout=1,
                                                          teacher_max_retries=1))
        trainer.train()
    assert trainer is None or step_logs(trainer) == []


def test_server_answer_that_decodes_past_the_cap_is_refused_naming_the_server_with_bounded_memory(fake_vllm):
    """~1 MiB of gzip on the wire that decodes to 1 GiB: the client stops at its cap, and says whose answer it was."""
    import tracemalloc

    url = fake_vllm("bomb", "--bomb-mib", "1024")
    teacher = ServerTeacher(url, api_key_env=None, max_retries=2, timeout_s=60, max_response_bytes=8 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(TeacherServerError, match=re.escape(f"teacher server {url}/v1/completions answer for rows [0]: "
                                                               "the answer is over max_response_bytes 8388608")):
            teacher.score([[5, 6]], [[7, 8]])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # the cap plus a decoding step, not the 1 GiB the answer decodes to
    assert teacher.counters()["retries"] == 0  # a bomb is not retried


def test_server_answer_compressed_although_identity_was_asked_is_still_read(fake_vllm):
    url = fake_vllm("gzip")
    [logprobs] = ServerTeacher(url, api_key_env=None).score([[5, 6]], [[7, 8]])
    assert logprobs.tolist() == [fake_logprob(7), fake_logprob(8)]


def test_server_slow_only_at_first_succeeds_after_retries(tmp_path, tiny_pair_dir, fake_vllm):
    url = fake_vllm("slow", "--delay", "5", "--slow-requests", "2")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, teacher_timeout=1.5,
                                                      teacher_max_retries=2))
    trainer.train()
    (logged,) = step_logs(trainer)
    assert logged["teacher/retries"] >= 2 and logged["teacher/failures"] == 0
    assert math.isfinite(logged["loss"])


def test_server_nan_and_inf_logprobs_drop_those_rows_and_training_continues(tmp_path, tiny_pair_dir, fake_vllm):
    url = fake_vllm("nonfinite")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, max_steps=2))
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2
    for gen, logged in zip(trainer.generation_batches, logs):
        prompts, completions = row_token_lists(gen)
        kinds = [poison(p + c) for p, c in zip(prompts, completions)]
        dropped = torch.tensor([kind is not None for kind in kinds])
        assert logged["scope/teacher_nonfinite_rows"] == dropped.sum().item()
        assert gen["scope_teacher_weights"][dropped].eq(0).all() and gen["scope_loss_mask"][dropped].eq(0).all()
        assert_whole_groups_normalised(gen, ~dropped)
        assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    every_kind = [poison(p + c) for gen in trainer.generation_batches for p, c in zip(*row_token_lists(gen))]
    assert {"nan", "-inf", None} <= set(every_kind), "the two steps should hold NaN, -inf and clean rows"


def test_vllm_refusing_to_send_nan_drops_those_rows_counts_them_and_training_continues(tmp_path, tiny_pair_dir,
                                                                                       fake_vllm):
    """Real vLLM answers HTTP 400 instead of a NaN log-prob; each such row is scored all-NaN and dropped."""
    url = fake_vllm("nan400")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url, max_steps=2))
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2
    for gen, logged in zip(trainer.generation_batches, logs):
        kinds = [poison(p + c) for p, c in zip(*row_token_lists(gen))]
        dropped = torch.tensor([kind is not None for kind in kinds])
        assert logged["teacher/nan_rows"] == kinds.count("nan") and logged["teacher/failures"] == 0
        assert logged["scope/teacher_nonfinite_rows"] == dropped.sum().item()
        assert gen["scope_teacher_weights"][dropped].eq(0).all() and gen["scope_loss_mask"][dropped].eq(0).all()
        assert_whole_groups_normalised(gen, ~dropped)
        assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
    every_kind = [poison(p + c) for gen in trainer.generation_batches for p, c in zip(*row_token_lists(gen))]
    assert "nan" in every_kind, "the two steps should hold a NaN row"


def test_teacher_max_model_len_too_small_for_the_completion_budget_fails_at_start_naming_both(tmp_path, tiny_pair_dir,
                                                                                              fake_vllm):
    url = fake_vllm("nonfinite", "--max-model-len", "9")
    with pytest.raises(ValueError, match=r"max_model_len 9, but scoring needs 10 tokens: a 1-token prompt .* \+ "
                       r"max_completion_length 8 \+ 1"):
        make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url))


def test_row_too_long_for_the_teacher_fails_before_it_is_sent_naming_row_and_lengths(tmp_path, tiny_pair_dir, fake_vllm):
    """The completion budget fits (checked at start), but prompt + completion does not."""
    url = fake_vllm("nonfinite", "--max-model-len", "12")
    trainer = make_trainer(tiny_pair_dir, server_args(tmp_path, tiny_pair_dir, url))
    assert trainer.teacher.max_model_len == 12
    with pytest.raises(TeacherServerError, match=r"row \d+ has \d+ tokens \(prompt \d+ \+ completion \d+\), too long "
                       r"for the server's max_model_len 12"):
        trainer.train()
    assert trainer.teacher.counters()["requests"] == 1  # the GET /v1/models; no scoring request was sent


# =============================================================================== our teacher server, killed


class KillServer(TrainerCallback):
    """Kills a server process with SIGKILL at the end of a given step, or once a given checkpoint is saved."""

    def __init__(self, kill, *, after_step=None, after_save=None):
        self.kill, self.after_step, self.after_save = kill, after_step, after_save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.after_step:
            self.kill()

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.after_save:
            self.kill()


class RestartOnFirstRetry(logging.Handler):
    """Starts the replacement server once the client logs its first retry: the outage is then certain."""

    def __init__(self, restart):
        super().__init__(logging.WARNING)
        self.restart, self.restarted = restart, threading.Event()
        self._lock = threading.Lock()

    def emit(self, record):
        if "retrying" in record.getMessage():
            with self._lock:
                if not self.restarted.is_set():
                    self.restarted.set()
                    self.restart()


def test_teacher_server_killed_mid_run_and_restarted_training_survives_on_retries(
    tmp_path, tiny_pair_dir, teacher_servers
):
    url = teacher_servers.url("restart-victim")
    port = int(url.rsplit(":", 1)[1])
    # Backoff 0.5 s doubling: 7 retries wait up to 63.5 s in all, ample for a restart to load the model.
    args = server_args(tmp_path, tiny_pair_dir, url, max_steps=3, teacher_max_retries=7)
    trainer = make_trainer(tiny_pair_dir, args, callbacks=[KillServer(lambda: teacher_servers.kill("restart-victim"),
                                                                      after_step=1)])
    restart = RestartOnFirstRetry(lambda: teacher_servers.launch(
        "restarted", serve_teacher_command(tiny_pair_dir["teacher"], port)))
    client_logger = logging.getLogger("scope_opd.teachers.server_client")
    client_logger.addHandler(restart)
    try:
        trainer.train()
    finally:
        client_logger.removeHandler(restart)
    assert restart.restarted.is_set()
    assert teacher_servers.url("restarted") == url  # same port
    logs = step_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert logs[0]["teacher/retries"] == 0 and logs[1]["teacher/retries"] > 0
    assert all(entry["teacher/failures"] == 0 and math.isfinite(entry["loss"]) for entry in logs)


def test_teacher_server_killed_for_good_is_a_clear_error_and_the_last_checkpoint_resumes(
    tmp_path, tiny_pair_dir, teacher_servers, monkeypatch, capsys
):
    url = teacher_servers.url("kill-victim")
    out = tmp_path / "out"
    args = server_args(tmp_path, tiny_pair_dir, url, max_steps=2, save_strategy="steps", save_steps=1,
                       teacher_max_retries=2)
    trainer = make_trainer(tiny_pair_dir, args, callbacks=[KillServer(lambda: teacher_servers.kill("kill-victim"),
                                                                      after_save=1)])
    with pytest.raises(TeacherServerError, match=re.escape(f"teacher server {url}/v1/completions") +
                       r" failed for rows \[\d+\] after 3 attempts: ConnectionError") as info:
        trainer.train()
    assert info.value.url == f"{url}/v1/completions"
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert not (out / "checkpoint-2").exists()

    # Same run, resumed by the CLI against a healthy server (this one wants an API key).
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    config = write_config(tmp_path, tiny_pair_dir, teacher_model=None,
                          teacher_server_url=teacher_servers.url("healthy-keyed"),
                          teacher_tokenizer=tiny_pair_dir["teacher"], teacher_api_key_env=API_KEY_ENV,
                          verifier="exact", max_steps=2, temperature=1.0, seed=0)
    capsys.readouterr()
    assert scope_main(["train", "--config", config, "--resume", "true"]) == 0
    assert f"resuming from {out / 'checkpoint-1'}" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]


# =============================================================================== secrets


def test_api_key_from_the_environment_never_reaches_logs_or_output_files(
    tmp_path, tiny_pair_dir, teacher_servers, monkeypatch, capfd, caplog
):
    url = teacher_servers.url("healthy-keyed")  # `scope serve-teacher --api-key-env` wants the key
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_pair_dir, teacher_model=None, teacher_server_url=url,
                          teacher_tokenizer=tiny_pair_dir["teacher"], teacher_api_key_env=API_KEY_ENV,
                          max_steps=2, save_steps=1, log_level="debug")
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    with caplog.at_level(logging.DEBUG):
        assert scope_main(["train", "--config", config]) == 0  # the server accepted the key
    captured = capfd.readouterr()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert all(entry["teacher/failures"] == 0 for entry in state["log_history"] if "loss" in entry)

    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"trainer_state.json", "training_args.bin", "model.safetensors", "config.json", "README.md"} <= {
        p.name for p in files}
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path
    for name, text in (("stdout", captured.out), ("stderr", captured.err), ("log records", caplog.text),
                       ("server log", teacher_servers.log("healthy-keyed"))):
        assert API_KEY not in text, name
    assert captured.out + captured.err + caplog.text  # something was captured to search

    # A wrong key is refused at once (401 is not retried); the error names the server, not the key.
    monkeypatch.setenv(API_KEY_ENV, "sk-wrong-key-0000")
    with pytest.raises(TeacherServerError, match=re.escape(url) + r".*HTTP 401") as info:
        scope_main(["train", "--config", config, "--output_dir", str(tmp_path / "wrong_key")])
    assert "sk-wrong-key-0000" not in str(info.value) and API_KEY not in str(info.value)
