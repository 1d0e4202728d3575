"""Teacher scoring overlapped with generation: the same weights and loss as the synchronous path.

Streamed (transformers generate, rows sent at EOS): the synchronous baseline is TRL's own path.
Chunked (rollout_chunk_groups): the baseline is the same chunked generation with the teacher
called after the whole batch. Either way the sampled tokens are the same and "same results" is exact.
Teachers are real: ``scope serve-teacher`` (in a thread of this process, one row per forward, so
each row's scores do not depend on which rows share its forward) and the in-process teacher.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import GRPOTrainer

from scope_opd.teachers import InProcessTeacher, TeacherServerError, load_teacher_model
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

TESTS_DIR = Path(__file__).parent
PROMPTS = ["Add 12+7.\n", "Add 30+45.\n", "Add 9+9.\n", "Add 61+22.\n", "Add 5+8.\n", "Add 40+2.\n"]
ANSWERS = ["19", "75", "18", "83", "13", "42"]
G = 4
GROUPS = 3  # prompt groups per generation batch: 3 chunks of one group each
EOS = 1  # the char tokenizer's <|endoftext|>
# The tiny random student rarely samples EOS; a bias makes rows end at different steps, as real rollouts do.
EARLY_EOS = {"sequence_bias": [[[EOS], 2.5]]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingVerifier:
    """Deterministic mixed verdicts (an even token-id sum is "correct"); counts every rollout it verifies."""

    __name__ = "parity"

    def __init__(self):
        self.verified = 0

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.verified += len(completions)
        return [1.0 if sum(ids) % 2 == 0 else 0.0 for ids in completion_ids]


class RecordingTrainer(SCOPETrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generation_batches = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.generation_batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in output.items()})
        return output


def make_trainer(tmp_path, tiny_pair_dir, *, teacher=None, verifier=None, **overrides):
    args = dict(
        output_dir=str(tmp_path / "out"), algorithm="scope", per_device_train_batch_size=GROUPS * G, num_generations=G,
        max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, seed=0, temperature=1.0, learning_rate=1e-2, dataloader_num_workers=0, rollout_chunk_groups=1,
        generation_kwargs=EARLY_EOS,
    )
    args.update(overrides)
    if teacher is None and "teacher_server_url" in args:
        args["teacher_tokenizer"] = tiny_pair_dir["teacher"]
    set_seed(0)
    return RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]),
        reward_funcs=[verifier or CountingVerifier()],
        args=SCOPEConfig(**args),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
        teacher=teacher,
    )


def train(trainer):
    set_seed(0)  # both trainers sample from the same RNG stream
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def one_row_server(tiny_pair_dir):
    from scope_opd.teachers.serve import start_server

    server, thread = start_server(tiny_pair_dir["teacher"], "127.0.0.1", 0, dtype="float32", device="cpu", batch_size=1)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


SCOPE_KEYS = ("completion_ids", "completion_mask", "scope_correct", "scope_student_weights", "scope_teacher_weights",
              "teacher_per_token_logps", "scope_loss_mask", "old_per_token_logps")


def assert_same_training(sync, overlapped, both_paths=True):
    assert len(sync.generation_batches) == len(overlapped.generation_batches) == 2
    for a, b in zip(sync.generation_batches, overlapped.generation_batches):
        assert set(a) == set(b)
        for key in (*SCOPE_KEYS, *(k for k in a if k.startswith("scope_num_items"))):
            if key in a:  # OPD has no old-log-prob forward
                assert torch.equal(a[key], b[key]), key
        if both_paths:
            assert a["scope_correct"].any() and not a["scope_correct"].all(), "the test needs both paths"
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (sync, overlapped)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for (name, p), q in zip(sync.model.state_dict().items(), overlapped.model.state_dict().values()):
        assert torch.equal(p, q), name


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_overlapped_server_teacher_gives_the_synchronous_weights_loss_and_update(tmp_path, tiny_pair_dir, one_row_server):
    url = one_row_server.url
    verifiers = CountingVerifier(), CountingVerifier()
    sync = train(make_trainer(tmp_path / "sync", tiny_pair_dir, teacher_server_url=url, verifier=verifiers[0]))
    overlapped = train(make_trainer(tmp_path / "overlap", tiny_pair_dir, teacher_server_url=url, teacher_overlap=True,
                                    verifier=verifiers[1]))
    assert_same_training(sync, overlapped)
    # Every incorrect row was scored in the background, none had to be scored late.
    incorrect = [int((~b["scope_correct"] & b["completion_mask"].any(1)).sum()) for b in overlapped.generation_batches]
    assert logged(overlapped, "scope/teacher_prefetched_rows") == [float(n) for n in incorrect]
    assert logged(overlapped, "scope/teacher_prefetch_missed_rows") == [0.0, 0.0]
    # The chunk verifier's results were reused by TRL's reward pass: each rollout verified once.
    assert verifiers[0].verified == verifiers[1].verified == 2 * GROUPS * G


def test_streamed_overlap_gives_trls_own_tokens_weights_loss_and_update(tmp_path, tiny_pair_dir, one_row_server):
    """rollout_chunk_groups=0: one generate call, each row verified and sent to the teacher when it emits EOS."""
    url = one_row_server.url
    verifiers = CountingVerifier(), CountingVerifier()
    sync = train(make_trainer(tmp_path / "sync", tiny_pair_dir, teacher_server_url=url, verifier=verifiers[0],
                              rollout_chunk_groups=0))
    streamed = train(make_trainer(tmp_path / "stream", tiny_pair_dir, teacher_server_url=url, teacher_overlap=True,
                                  verifier=verifiers[1], rollout_chunk_groups=0))
    assert_same_training(sync, streamed)
    lengths = sync.generation_batches[0]["completion_mask"].sum(1)
    assert lengths.min() < lengths.max(), "rows should finish at different steps"
    incorrect = [int((~b["scope_correct"] & b["completion_mask"].any(1)).sum()) for b in streamed.generation_batches]
    assert logged(streamed, "scope/teacher_prefetched_rows") == [float(n) for n in incorrect]
    assert logged(streamed, "scope/teacher_prefetch_missed_rows") == [0.0, 0.0]
    assert verifiers[0].verified == verifiers[1].verified == 2 * GROUPS * G


def test_streamed_rows_reach_the_teacher_while_the_batch_is_still_generating(tmp_path, tiny_pair_dir, one_row_server,
                                                                             monkeypatch):
    generating, asked_during_generation = threading.Event(), []
    original = GRPOTrainer._generate_single_turn

    def generate(trainer, *args, **kwargs):
        generating.set()
        try:
            return original(trainer, *args, **kwargs)
        finally:
            generating.clear()

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
    for overlap in (True, False):
        trainer = make_trainer(tmp_path / str(overlap), tiny_pair_dir, teacher_server_url=one_row_server.url,
                               teacher_overlap=overlap, rollout_chunk_groups=0, max_steps=1,
                               max_completion_length=32)  # long enough that early rows' answers come back mid-batch
        score = trainer.teacher.score
        calls = []

        def recording_score(prompt_ids, completion_ids, score=score, calls=calls):
            calls.append(generating.is_set())
            return score(prompt_ids, completion_ids)

        trainer.teacher.score = recording_score
        train(trainer)
        asked_during_generation.append(any(calls))
    assert asked_during_generation == [True, False]


@pytest.mark.parametrize("algorithm", ["scope", "opd"])
def test_overlapped_in_process_teacher_gives_the_synchronous_results(tmp_path, tiny_pair_dir, algorithm):
    def teacher():  # one row per forward: each row's scores are independent of the others'
        return InProcessTeacher(load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu"), batch_size=1)

    sync = train(make_trainer(tmp_path / "sync", tiny_pair_dir, teacher=teacher(), algorithm=algorithm))
    overlapped = train(make_trainer(tmp_path / "overlap", tiny_pair_dir, teacher=teacher(), teacher_overlap=True,
                                    algorithm=algorithm))
    assert_same_training(sync, overlapped, both_paths=algorithm == "scope")
    assert logged(overlapped, "scope/teacher_prefetch_missed_rows") == [0.0, 0.0]
    assert logged(overlapped, "scope/teacher_prefetched_rows")[0] == (GROUPS * G if algorithm == "opd" else
                                                                     float((~overlapped.generation_batches[0]["scope_correct"]).sum()))


class GenerationProbe:
    """Wraps TRL's per-chunk generation: notes, at the start of chunk 2, whether the teacher has been asked yet."""

    def __init__(self, monkeypatch, on_chunk=None):
        self.chunks, self.teacher_called = 0, threading.Event()
        self.asked_before_last_chunk = []
        original = GRPOTrainer._generate_single_turn
        probe = self

        def generate(trainer, prompt_ids, *args, **kwargs):
            probe.chunks += 1
            if probe.chunks % GROUPS == 1:  # a batch's first chunk
                probe.teacher_called.clear()
            if probe.chunks % GROUPS == 0:  # the batch's last chunk: has an earlier chunk's teacher request gone out?
                probe.asked_before_last_chunk.append(probe.teacher_called.wait(timeout=30))
            if on_chunk is not None:
                on_chunk(probe.chunks)
            return original(trainer, prompt_ids, *args, **kwargs)

        monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)

    def wrap(self, teacher):
        score = teacher.score

        def recording_score(prompt_ids, completion_ids):
            self.teacher_called.set()
            return score(prompt_ids, completion_ids)

        teacher.score = recording_score
        return teacher


def test_teacher_requests_leave_while_later_groups_are_still_generating(tmp_path, tiny_pair_dir, one_row_server,
                                                                        monkeypatch):
    probe = GenerationProbe(monkeypatch)
    for overlap in (True, False):
        trainer = make_trainer(tmp_path / str(overlap), tiny_pair_dir, teacher_server_url=one_row_server.url,
                               teacher_overlap=overlap, max_steps=1, teacher_timeout=60.0)
        probe.wrap(trainer.teacher)
        if not overlap:
            # Without overlap the teacher is never asked during generation: don't sit out the probe's timeout.
            probe.teacher_called.wait = lambda timeout: probe.teacher_called.is_set()
        train(trainer)
    assert probe.asked_before_last_chunk == [True, False]


class FakeVLLM:
    """tests/fault_helpers.py's imitation of a vLLM server, in its own process (stdlib only: boots in a blink)."""

    def __init__(self):
        self.procs = []

    def start(self, mode, *extra):
        proc = subprocess.Popen([sys.executable, str(TESTS_DIR / "fault_helpers.py"), "fake-vllm", "--mode", mode, *extra],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline()
        assert "serving on" in line, line
        return line.rsplit(" on ", 1)[1].strip()

    def kill(self):
        for proc in self.procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


@pytest.fixture
def fake_vllm():
    servers = FakeVLLM()
    yield servers
    for proc in servers.procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_server_killed_mid_overlap_is_the_synchronous_error_raised_in_the_step(tmp_path, tiny_pair_dir, fake_vllm,
                                                                               monkeypatch):
    url = fake_vllm.start("nonfinite")  # a working server (a few NaN rows, which the trainer drops)

    def kill_after_first_chunk(chunk):
        if chunk == 2:  # chunk 1's rows are with the teacher (or queued); the rest are not generated yet
            fake_vllm.kill()

    GenerationProbe(monkeypatch, on_chunk=kill_after_first_chunk)
    trainer = make_trainer(tmp_path, tiny_pair_dir, teacher_server_url=url, teacher_overlap=True, max_steps=1,
                           teacher_max_retries=1, teacher_timeout=5.0)
    with pytest.raises(TeacherServerError, match=re.escape(f"{url}/v1/completions") + r" failed for rows \[\d+\] "
                       r"after 2 attempts: ConnectionError"):
        train(trainer)
    assert [t for t in threading.enumerate() if t.name.startswith("teacher-overlap")] == []  # nothing left running
    assert [h for h in trainer.state.log_history if "loss" in h] == []


@pytest.mark.parametrize(
    "mode, extra, overrides, message",
    [
        ("malformed", (), dict(teacher_max_retries=1), r"after 2 attempts: malformed response"),
        ("slow", ("--delay", "5"), dict(teacher_timeout=0.5, teacher_max_retries=1), r"after 2 attempts: .*(Read timed out|Timeout)"),
    ],
    ids=["malformed", "slow"],
)
def test_broken_server_mid_overlap_is_the_synchronous_error(tmp_path, tiny_pair_dir, fake_vllm, mode, extra, overrides,
                                                           message):
    url = fake_vllm.start(mode, *extra)
    trainer = make_trainer(tmp_path, tiny_pair_dir, teacher_server_url=url, teacher_overlap=True, max_steps=1, **overrides)
    with pytest.raises(TeacherServerError, match=re.escape(url) + ".*" + message):
        train(trainer)
    assert [t for t in threading.enumerate() if t.name.startswith("teacher-overlap")] == []


def test_overlap_without_a_teacher_or_chunks_is_refused_at_the_first_step(tmp_path, tiny_pair_dir):
    trainer = make_trainer(tmp_path, tiny_pair_dir, algorithm="grpo", teacher_overlap=True, max_steps=1)
    with pytest.raises(ValueError, match="teacher_overlap needs a teacher"):
        train(trainer)


class AllCorrect(CountingVerifier):
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.verified += len(completions)
        return [1.0] * len(completions)


@pytest.mark.parametrize("chunks", [0, 1], ids=["streamed", "chunked"])
def test_a_last_batch_with_nothing_for_the_teacher_leaves_no_overlap_thread_running(tmp_path, tiny_pair_dir, chunks):
    # Every rollout correct: SCOPE's teacher has no rows, so the batch's prefetch is never asked for scores;
    # it must still be closed with the batch, not left running after training ends.
    trainer = train(make_trainer(tmp_path, tiny_pair_dir, teacher_model=tiny_pair_dir["teacher"], teacher_overlap=True,
                                 rollout_chunk_groups=chunks, verifier=AllCorrect()))
    assert all(batch["scope_correct"].all() for batch in trainer.generation_batches)
    assert trainer._teacher_prefetch is None
    assert [t for t in threading.enumerate() if t.name.startswith("teacher-overlap")] == []
