"""``student_logprob_source``: the config's checks, and the trainer's choice of source on a real batch.

The end-to-end check against real vLLM (TRL ``use_vllm=True``, colocate) is in ``tests/test_vllm_real.py``
(``test_sampler_logprob_source_on_real_vllm_colocate``); these run in the main python without vLLM.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from scope_opd.algorithms import sequence_mean_logp
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

CPU = dict(report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4)
SAMPLER = dict(CPU, use_vllm=True, student_logprob_source="sampler", vllm_importance_sampling_correction=False)


def config(**overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = SCOPEConfig("o", **overrides)
    return args, [str(w.message) for w in caught if "student_logprob_source" in str(w.message)]


def test_default_is_the_forward():
    args, warned = config(**CPU)
    assert args.student_logprob_source == "forward" and not warned
    assert "Not the default" in SCOPEConfig.__dataclass_fields__["student_logprob_source"].metadata["help"]


def test_sampler_with_vllm_and_no_is_correction_is_accepted_silently():
    args, warned = config(**SAMPLER)
    assert args.student_logprob_source == "sampler" and warned == []


def test_unknown_source_names_the_field():
    with pytest.raises(ValueError, match=r"student_logprob_source must be one of \('forward', 'sampler'\), got 'vllm'"):
        SCOPEConfig("o", **dict(CPU, student_logprob_source="vllm"))


def test_sampler_with_transformers_generate_is_accepted_with_any_sampling_options():
    # Read during generate from the model's own logits, before generate's top-k/top-p: not vLLM's processed ones.
    args, warned = config(**dict(CPU, student_logprob_source="sampler", top_p=0.95, top_k=20))
    assert args.student_logprob_source == "sampler" and warned == []


@pytest.mark.parametrize("flag", ["use_transformers_paged", "use_transformers_continuous_batching"])
def test_sampler_with_transformers_continuous_batching_is_refused(flag):
    with pytest.raises(ValueError, match=rf"student_logprob_source='sampler' needs vLLM or transformers' generate"):
        SCOPEConfig("o", **dict(CPU, student_logprob_source="sampler", **{flag: True}))


@pytest.mark.parametrize("overrides, named", [
    (dict(top_p=0.95), "top_p=0.95"),
    (dict(top_k=20), "top_k=20"),
    (dict(min_p=0.05), "min_p=0.05"),
    (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
    (dict(generation_kwargs={"presence_penalty": 0.5}), "presence_penalty=0.5"),
])
def test_sampler_with_a_reshaped_sampling_distribution_is_refused(overrides, named):
    with pytest.raises(ValueError, match=rf"student_logprob_source='sampler' with {named}: vLLM's log-probs"):
        SCOPEConfig("o", **dict(SAMPLER, **overrides))


def test_sampler_with_top_k_off_spelled_minus_one_is_accepted():
    assert config(**dict(SAMPLER, top_k=-1))[1] == []


def test_sampler_with_another_student_logprob_temperature_is_refused():
    with pytest.raises(ValueError, match=r"rollout temperature 0.6, but student_logprob_temperature=1.0"):
        SCOPEConfig("o", **dict(SAMPLER, student_logprob_temperature=1.0))
    assert config(**dict(SAMPLER, student_logprob_temperature=0.6))[1] == []


@pytest.mark.parametrize("overrides", [dict(algorithm="opd"), dict(student_weighting="uniform")])
def test_sampler_where_no_weight_reads_student_logprobs_warns_no_effect(overrides):
    _, warned = config(**dict(SAMPLER, **overrides))
    assert len(warned) == 1 and "has no effect" in warned[0]


@pytest.mark.parametrize("overrides", [dict(vllm_importance_sampling_correction=True), dict(num_iterations=2),
                                       dict(steps_per_generation=2, gradient_accumulation_steps=1)])
def test_sampler_warns_when_trl_runs_the_forward_anyway(overrides):
    _, warned = config(**dict(SAMPLER, **overrides))
    assert len(warned) == 1 and "saves no forward here" in warned[0] and "still use the sampler's" in warned[0]


# -- the trainer's choice, on a real batch -------------------------------------------------------------
#
# These tests build a real trainer and batch (one real step with transformers' generate and the forward),
# then hand `_student_token_logps` a sampler tensor derived from the real forward: the method's contract,
# with a known answer. The end-to-end runs are below (transformers' generate) and in the real-vLLM tier.


class RecordingTrainer(SCOPETrainer):
    """Keeps the last generation batch's output and counts the extra old-log-prob forwards it ran."""

    forwards = 0

    def _generate_and_score_completions(self, inputs):
        self.output = super()._generate_and_score_completions(inputs)
        return self.output

    def _old_per_token_logps(self, output):
        self.forwards += output.get("old_per_token_logps") is None
        return super()._old_per_token_logps(output)


def train_one_step(tiny_pair_dir, output_dir, **config) -> RecordingTrainer:
    """One real SCOPE step with transformers' generate on two prompts, a parity reward and the tiny pair."""
    args = SCOPEConfig(
        output_dir=str(output_dir), algorithm="scope", max_completion_length=8, max_steps=1, logging_steps=1,
        save_strategy="no", seed=0, dataloader_num_workers=0, **{**CPU, **config},
    )
    trainer = RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]),
        reward_funcs=[lambda prompts, completions, **kw: [float(len(c) % 2 == 0) for c in completions]],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Add 12+7.\n", "Add 30+45.\n"], "answer": ["19", "75"]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]),
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def batch(tiny_pair_dir, tmp_path_factory):
    trainer = train_one_step(tiny_pair_dir, tmp_path_factory.mktemp("sampler"), temperature=1.0)
    output = {k: v for k, v in trainer.output.items() if k != "old_per_token_logps"}
    correct = trainer.output["scope_correct"].bool()
    assert correct.any() and (~correct).any(), "the toy reward should give a mixed batch"
    return trainer, output, correct


def sampler_like(trainer, output, offset=0.25):
    """The forward's log-probs minus ``offset``: a sampler tensor whose means are known to differ."""
    trainer.args.student_logprob_source = "forward"
    forward = trainer._student_token_logps(output, torch.zeros(output["completion_mask"].shape[0], dtype=torch.bool),
                                           "train").clone()
    return forward, (forward - offset) * output["completion_mask"]


def clear_metrics(trainer):
    for key in ("scope/student_logp_from_sampler", "scope/sampler_logp_fallback_rows", "timing/old_logprob"):
        trainer._metrics["train"].pop(key, None)
    trainer._phase_seconds.pop("old_logprob", None)


def test_sampler_source_uses_the_sampler_logprobs_and_runs_no_forward(batch):
    trainer, output, correct = batch
    forward, sampled = sampler_like(trainer, output)
    clear_metrics(trainer)
    trainer.args.student_logprob_source = "sampler"
    used = trainer._student_token_logps({**output, "sampling_per_token_logps": sampled}, correct, "train")
    mask = output["completion_mask"].bool()
    assert torch.equal(sequence_mean_logp(used, mask), sequence_mean_logp(sampled, mask))
    assert torch.allclose(sequence_mean_logp(used, mask), sequence_mean_logp(forward, mask) - 0.25, atol=1e-6)
    assert trainer._phase_seconds.get("old_logprob", 0.0) == 0.0  # the forward did not run
    assert trainer._metrics["train"]["scope/student_logp_from_sampler"] == [1.0]
    assert trainer._metrics["train"]["scope/sampler_logp_fallback_rows"] == [0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_sampler_logprob_on_a_correct_row_falls_back_to_the_forward_and_is_counted(batch, bad):
    trainer, output, correct = batch
    forward, sampled = sampler_like(trainer, output)
    row = int(correct.nonzero()[0])
    sampled[row, 0] = bad
    clear_metrics(trainer)
    trainer.args.student_logprob_source = "sampler"
    used = trainer._student_token_logps({**output, "sampling_per_token_logps": sampled}, correct, "train")
    assert torch.equal(used, forward)  # the whole batch from one source: the forward
    assert trainer._phase_seconds["old_logprob"] > 0
    assert trainer._metrics["train"]["scope/student_logp_from_sampler"] == [0.0]
    assert trainer._metrics["train"]["scope/sampler_logp_fallback_rows"] == [1.0]


def test_non_finite_sampler_logprob_on_an_incorrect_row_is_not_read_so_no_fallback(batch):
    trainer, output, correct = batch
    _, sampled = sampler_like(trainer, output)
    sampled[int((~correct).nonzero()[0]), 0] = float("nan")
    clear_metrics(trainer)
    trainer.args.student_logprob_source = "sampler"
    used = trainer._student_token_logps({**output, "sampling_per_token_logps": sampled}, correct, "train")
    assert torch.allclose(used, sampled, rtol=0, atol=0, equal_nan=True)  # the NaN stays, on a row no weight reads
    assert trainer._metrics["train"]["scope/sampler_logp_fallback_rows"] == [0.0]


def test_missing_sampler_logprobs_fall_back_to_the_forward_with_a_warning(batch):
    trainer, output, correct = batch
    forward, _ = sampler_like(trainer, output)
    clear_metrics(trainer)
    trainer.args.student_logprob_source = "sampler"
    with pytest.warns(UserWarning, match="returned no log-probs"):
        used = trainer._student_token_logps(output, correct, "train")
    assert torch.equal(used, forward)
    assert trainer._metrics["train"]["scope/student_logp_from_sampler"] == [0.0]
    assert trainer._metrics["train"]["scope/sampler_logp_fallback_rows"] == [float(correct.sum())]


# -- end to end with transformers' generate: the log-probs read while it samples ------------------------


def one_step(tiny_pair_dir, tmp_path, source, **overrides):
    trainer = train_one_step(tiny_pair_dir, tmp_path / source, temperature=0.8, top_k=20, top_p=0.95,
                             student_logprob_source=source, **overrides)
    return trainer, trainer.forwards


@pytest.mark.parametrize("overrides", [{}, dict(teacher_overlap=True), dict(teacher_overlap=True, rollout_chunk_groups=1)],
                         ids=["plain", "overlap-streaming", "overlap-chunks"])
def test_sampler_with_transformers_generate_reads_logprobs_while_sampling_and_skips_the_forward(
        tiny_pair_dir, tmp_path, overrides):
    sampler, sampler_forwards = one_step(tiny_pair_dir, tmp_path, "sampler", **overrides)
    forward, forward_forwards = one_step(tiny_pair_dir, tmp_path, "forward", **overrides)
    out_s, out_f = sampler.output, forward.output
    # Same seed, same policy: the same rollouts, so the two sources can be compared row by row.
    assert torch.equal(out_s["completion_ids"], out_f["completion_ids"])
    mask = out_s["completion_mask"].bool()
    assert "sampling_per_token_logps" in out_s and "sampling_per_token_logps" not in out_f
    assert (sampler_forwards, forward_forwards) == (0, 1)  # the extra old-log-prob forward ran only for 'forward'
    logged = sampler.state.log_history[0]
    assert logged["scope/student_logp_from_sampler"] == 1.0 and logged["scope/sampler_logp_fallback_rows"] == 0.0
    assert logged["timing/old_logprob"] == 0.0
    assert "old_per_token_logps" not in out_s  # the loss's ratio stays exactly 1: TRL's logp.detach()
    # The sampled log-probs equal the forward's token by token (fp32: KV-cache decoding vs one full pass) ...
    sampled = out_s["sampling_per_token_logps"]
    assert (sampled - out_f["old_per_token_logps"]).abs()[mask].max() < 1e-5
    # ... and the weights read them: student-guided weights of the correct rows agree to the same precision.
    correct = out_s["scope_correct"].bool()
    assert correct.any()
    assert torch.allclose(out_s["scope_student_weights"], out_f["scope_student_weights"], atol=1e-5)
    assert torch.allclose(sequence_mean_logp(sampled, mask)[correct],
                          sequence_mean_logp(out_f["old_per_token_logps"], mask)[correct], atol=1e-5)
