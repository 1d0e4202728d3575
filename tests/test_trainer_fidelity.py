"""SCOPETrainer fidelity at the paper presets' settings: aggregation over accumulation and processes,
verdicts with several rewards, off-policy clipping, OPD with G = 1, and the student log-prob temperature."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from scope_opd import scope_loss
from scope_opd.algorithms import loss_denominators
from scope_opd.trainer import SCOPEConfig, SCOPETrainer

from helpers import free_port
from test_trainer import RecordingTrainer, dataset, has_digit_reward, load_student, make_args


class MicroBatchRecorder(SCOPETrainer):
    """Records every micro-batch's inputs, its optimised loss, and the policy's log-probs of exactly those rows."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.micro_batches = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model,
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                inputs["completion_ids"].size(1),
            )
        self.micro_batches.append({"inputs": {k: v for k, v in inputs.items()}, "loss": loss.detach().clone(), "logps": logps})
        return loss


def build(trainer_cls, tmp_path, tiny_pair_dir, algorithm="scope", reward_funcs=(has_digit_reward,), **overrides):
    args = make_args(tmp_path, algorithm, teacher_model=None if algorithm == "grpo" else tiny_pair_dir["teacher"], **overrides)
    return trainer_cls(
        load_student(tiny_pair_dir["student"]), reward_funcs=list(reward_funcs) if reward_funcs else None, args=args,
        train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]),
    )


def expected_micro_loss(micro, aggregation, **kw):
    inputs = micro["inputs"]
    old = inputs.get("old_per_token_logps")
    return scope_loss(
        micro["logps"], micro["logps"] if old is None else old, inputs["teacher_per_token_logps"],
        inputs["scope_loss_mask"], inputs["scope_correct"], inputs["scope_student_weights"],
        inputs["scope_teacher_weights"], aggregation=aggregation, **kw,
    )[0]


# --- aggregation (issue: the authors' per-path denominators) ----------------------------------------


@pytest.mark.parametrize("aggregation", ["authors", "path-token-mean", "token-mean", "seq-mean-token-mean"])
def test_accumulated_loss_is_scope_loss_of_the_whole_batch_with_global_per_path_counts(tmp_path, tiny_pair_dir, aggregation):
    """Two micro-batches of one optimiser step (GA = 2): each is scope_loss with the whole batch's per-path
    counts, and they add up to scope_loss of the whole generation batch."""
    trainer = build(MicroBatchRecorder, tmp_path, tiny_pair_dir, loss_aggregation=aggregation,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer.train()
    assert len(trainer.micro_batches) == 2
    whole = {k: torch.cat([m["inputs"][k] for m in trainer.micro_batches]) for k in
             ("scope_loss_mask", "scope_correct", "scope_student_weights", "scope_teacher_weights",
              "teacher_per_token_logps", "old_per_token_logps") if k in trainer.micro_batches[0]["inputs"]}
    logps = torch.cat([m["logps"] for m in trainer.micro_batches])
    correct = whole["scope_correct"]
    assert 0 < correct.sum() < len(correct), "fixture should mix right and wrong rollouts"
    expected = scope_loss(logps, whole.get("old_per_token_logps", logps), whole["teacher_per_token_logps"],
                          whole["scope_loss_mask"], correct, whole["scope_student_weights"],
                          whole["scope_teacher_weights"], aggregation=aggregation)[0]
    counts = loss_denominators(whole["scope_loss_mask"], correct, aggregation)
    for micro in trainer.micro_batches:
        assert micro["inputs"]["scope_num_items_mle"].item() == counts[0].item()
        assert micro["inputs"]["scope_num_items_opd"].item() == counts[1].item()
        assert micro["loss"].item() == pytest.approx(expected_micro_loss(micro, aggregation, num_items=counts).item(), rel=1e-5, abs=1e-7)
    total = sum(m["loss"].item() for m in trainer.micro_batches)
    assert total == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_sum_aggregation_is_the_plain_token_sum_of_each_optimiser_step(tmp_path, tiny_pair_dir):
    """GA = 1, steps_per_generation = 2: each optimiser step trains on half the generation batch, and its loss
    is that half's plain token sum (it used to be rescaled by steps_per_generation / GA, i.e. doubled)."""
    trainer = build(MicroBatchRecorder, tmp_path, tiny_pair_dir, loss_aggregation="sum", per_device_train_batch_size=4,
                    steps_per_generation=2, max_steps=2, learning_rate=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(trainer.micro_batches) == 2
    for micro in trainer.micro_batches:
        assert micro["loss"].item() == pytest.approx(expected_micro_loss(micro, "sum").item(), rel=1e-5, abs=1e-6)


DDP_SCRIPT = Path(__file__).parent / "dist_scripts" / "scope_ddp_step.py"


@pytest.mark.parametrize("aggregation", ["authors", "path-token-mean"])
def test_two_processes_with_accumulation_optimise_scope_loss_of_the_global_batch(tmp_path, tiny_pair_dir, aggregation):
    """torchrun --nproc_per_node 2 (gloo, CPU), GA = 2: the mean over processes of the summed micro-batch losses
    (what DDP's gradient average optimises) equals scope_loss of the whole global batch; teacher counters are
    summed over the processes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(DDP_SCRIPT), tiny_pair_dir["student"], tiny_pair_dir["teacher"], str(out), aggregation],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    micro = [m for rank in ranks for m in rank["micro_batches"]]
    assert len(micro) == 4
    keys = ("scope_loss_mask", "scope_correct", "scope_student_weights", "scope_teacher_weights", "teacher_per_token_logps")
    whole = {k: torch.cat([m["inputs"][k] for m in micro]) for k in keys}
    logps = torch.cat([m["logps"] for m in micro])
    old = torch.cat([m["inputs"].get("old_per_token_logps", m["logps"]) for m in micro])
    assert 0 < whole["scope_correct"].sum() < len(whole["scope_correct"])
    expected = scope_loss(logps, old, whole["teacher_per_token_logps"], whole["scope_loss_mask"], whole["scope_correct"],
                          whole["scope_student_weights"], whole["scope_teacher_weights"], aggregation=aggregation)[0]
    optimised = sum(m["loss"].item() for m in micro) / 2  # DDP averages the two processes' gradients
    assert optimised == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    counts = loss_denominators(whole["scope_loss_mask"], whole["scope_correct"], aggregation)
    assert micro[0]["inputs"]["scope_num_items_mle"].item() == counts[0].item()
    logged = json.loads((out / "log_history.json").read_text())[0]
    assert logged["teacher/requests"] == 2.0  # one per process, summed


# --- verdicts with several reward functions ---------------------------------------------------------


def accuracy(prompts, completions, **kwargs):
    return has_digit_reward(prompts, completions)


def well_formatted(prompts, completions, **kwargs):
    return [1.0 for _ in completions]  # every answer "follows the format"


def test_verdict_comes_from_the_named_reward_not_the_weighted_sum(tmp_path, tiny_pair_dir):
    """accuracy + format (weights 1, 1): a wrong, well-formatted answer sums to 1 >= threshold, but is incorrect."""
    trainer = build(RecordingTrainer, tmp_path, tiny_pair_dir, reward_funcs=(accuracy, well_formatted),
                    verdict_reward="accuracy")
    trainer.train()
    (gen,) = trainer.generation_batches
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["student"])
    texts = tokenizer.batch_decode([c[m.bool()] for c, m in zip(gen["completion_ids"], gen["completion_mask"])],
                                   skip_special_tokens=True)
    truth = torch.tensor(has_digit_reward(None, texts)) == 1.0
    assert (~truth).any(), "fixture should have wrong rollouts"
    assert torch.equal(gen["scope_correct"], truth)
    # the format reward is still logged
    assert any(k.startswith("rewards/well_formatted") for k in trainer.state.log_history[0])


def test_several_rewards_without_a_verdict_reward_is_a_clear_error(tmp_path, tiny_pair_dir):
    with pytest.raises(ValueError, match="set verdict_reward"):
        build(SCOPETrainer, tmp_path, tiny_pair_dir, reward_funcs=(accuracy, well_formatted))
    with pytest.raises(ValueError, match="verdict_reward='nope' is not one of"):
        build(SCOPETrainer, tmp_path, tiny_pair_dir, reward_funcs=(accuracy,), verdict_reward="nope")
    # GRPO keeps TRL's weighted sum and needs no verdict reward.
    build(SCOPETrainer, tmp_path, tiny_pair_dir, "grpo", reward_funcs=(accuracy, well_formatted))


def test_the_built_in_verifier_decides_by_default(tmp_path, tiny_pair_dir):
    trainer = build(SCOPETrainer, tmp_path, tiny_pair_dir, reward_funcs=None, verifier="exact")
    assert len(trainer.reward_func_names) == 1 and trainer.verdict_reward_index == 0


# --- off-policy reuse -------------------------------------------------------------------------------


def test_reusing_rollouts_without_clipping_warns(tmp_path):
    cpu = dict(report_to=[], use_cpu=True, bf16=False, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="ratio is unclipped"):
        SCOPEConfig(num_iterations=2, **cpu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SCOPEConfig(num_iterations=2, off_policy_clip="ppo", **cpu)
        SCOPEConfig(**cpu)  # on-policy: nothing to say
    assert not [w for w in caught if "unclipped" in str(w.message)]
    with pytest.raises(ValueError, match="off_policy_clip"):
        SCOPEConfig(off_policy_clip="clip", **cpu)


def _clipped_token_fraction(micro, clip, epsilon=0.2, dual_clip=3.0):
    """Fraction of the micro-batch's loss tokens whose PPO token loss the clip changes, from the definitions:
    A > 0 and rho > 1 + eps, or A < 0 and rho < 1 - eps, or (dual clip) A < 0 and rho > dual_clip. 'authors':
    the MLE path has no ratio (never clipped) and the OPD advantage is the sampling policy's."""
    inputs = micro["inputs"]
    mask = inputs["scope_loss_mask"].bool()
    correct = inputs["scope_correct"].bool()[:, None]
    old = inputs["old_per_token_logps"]
    rho = torch.exp(micro["logps"] - old)
    student = old if clip == "authors" else micro["logps"]
    opd_advantage = -inputs["scope_teacher_weights"][:, None] * (student - inputs["teacher_per_token_logps"])
    advantage = torch.where(correct, inputs["scope_student_weights"][:, None].expand_as(rho), opd_advantage)
    clipped = ((advantage > 0) & (rho > 1 + epsilon)) | ((advantage < 0) & (rho < 1 - epsilon))
    if clip == "authors":
        clipped = (clipped | ((advantage < 0) & (rho > dual_clip))) & ~correct
    return (clipped & mask).sum().item() / mask.sum().item()


def test_opd_advantage_follows_off_policy_clip_unless_set(tmp_path):
    cpu = dict(report_to=[], use_cpu=True, bf16=False, output_dir=str(tmp_path))
    assert SCOPEConfig(**cpu).opd_advantage == "current"
    assert SCOPEConfig(off_policy_clip="ppo", **cpu).opd_advantage == "current"
    assert SCOPEConfig(off_policy_clip="authors", **cpu).opd_advantage == "old"
    # Explicit values are honoured (e.g. the authors' clip with the paper's advantage, an ablation).
    assert SCOPEConfig(off_policy_clip="authors", opd_advantage="current", **cpu).opd_advantage == "current"
    assert SCOPEConfig(off_policy_clip="ppo", opd_advantage="old", **cpu).opd_advantage == "old"
    with pytest.raises(ValueError, match="opd_advantage"):
        SCOPEConfig(opd_advantage="sampler", **cpu)


@pytest.mark.parametrize("clip", ["ppo", "authors"])
def test_second_pass_over_a_generation_batch_is_clipped(tmp_path, tiny_pair_dir, clip):
    """num_iterations = 2 with a large step: on the second pass rho != 1 and the optimised loss is the clipped one;
    'authors' also takes the OPD advantage from the sampling policy (opd_advantage='old'), which changes the loss."""
    trainer = build(MicroBatchRecorder, tmp_path, tiny_pair_dir, num_iterations=2, max_steps=2, learning_rate=0.3,
                    off_policy_clip=clip)
    assert trainer.args.opd_advantage == ("old" if clip == "authors" else "current")
    trainer.train()
    first, second = trainer.micro_batches
    kw = {"clip_epsilon": 0.2, **({"dual_clip": 3.0, "mle_surrogate": "logp", "opd_advantage": "old"}
                                  if clip == "authors" else {"clip_epsilon_high": 0.2})}
    for micro in (first, second):
        expected = expected_micro_loss(micro, "authors", num_items=loss_denominators(
            micro["inputs"]["scope_loss_mask"], micro["inputs"]["scope_correct"], "authors"), **kw)
        assert micro["loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    unclipped = expected_micro_loss(second, "authors")
    rho = torch.exp(second["logps"] - second["inputs"]["old_per_token_logps"])[second["inputs"]["scope_loss_mask"].bool()]
    assert (rho - 1).abs().max() > 0.2, "the second pass should be off-policy"
    assert second["loss"].item() != pytest.approx(unclipped.item(), rel=1e-6)
    if clip == "authors":
        counts = loss_denominators(second["inputs"]["scope_loss_mask"], second["inputs"]["scope_correct"], "authors")
        paper_advantage = expected_micro_loss(second, "authors", num_items=counts, **{**kw, "opd_advantage": "current"})
        assert second["loss"].item() != pytest.approx(paper_advantage.item(), rel=1e-4)
    fraction = _clipped_token_fraction(second, clip)
    assert fraction > 0, "the fixture should clip some tokens on the second pass"
    assert trainer.state.log_history[-2]["scope/clip/frac"] == pytest.approx(fraction, abs=1e-6)


def test_vllm_importance_sampling_correction_weights_scope_tokens_like_grpo(tmp_path, tiny_pair_dir):
    """TRL multiplies GRPO's per-token loss by inputs['importance_sampling_ratio'] with use_vllm; scope does the same."""
    trainer = build(MicroBatchRecorder, tmp_path, tiny_pair_dir)
    trainer.train()
    (micro,) = trainer.micro_batches
    inputs = dict(micro["inputs"])
    ratio = torch.rand(inputs["completion_ids"].shape, generator=torch.Generator().manual_seed(0)) + 0.5
    inputs["importance_sampling_ratio"] = ratio
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    loss, _ = trainer.scope_loss_from_inputs(micro["logps"], inputs, mode="eval")
    counts = torch.stack([inputs["scope_num_items_mle"], inputs["scope_num_items_opd"]])
    expected = expected_micro_loss({**micro, "inputs": inputs}, "authors", num_items=counts, token_weights=ratio)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(expected_micro_loss(micro, "authors", num_items=counts).item(), rel=1e-4)


# --- OPD with one rollout per prompt ------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_opd_with_one_rollout_accepts_any_batch_size_for_training_and_eval(tmp_path, tiny_pair_dir, batch_size):
    cpu = dict(report_to=[], use_cpu=True, bf16=False, output_dir=str(tmp_path))
    config = SCOPEConfig(algorithm="opd", num_generations=1, per_device_train_batch_size=batch_size,
                         per_device_eval_batch_size=batch_size, eval_strategy="steps", eval_steps=1, **cpu)
    assert (config.num_generations, config.per_device_train_batch_size, config.generation_batch_size) == (1, batch_size, batch_size)
    assert (config.num_generations_eval or config.num_generations) == 1
    spg = SCOPEConfig(algorithm="opd", num_generations=1, per_device_train_batch_size=batch_size, steps_per_generation=2,
                      off_policy_clip="ppo", **cpu)
    assert (spg.generation_batch_size, spg.steps_per_generation) == (2 * batch_size, 2)
    trainer = build(RecordingTrainer, tmp_path, tiny_pair_dir, "opd", num_generations=1,
                    per_device_train_batch_size=batch_size)
    trainer.train()
    (gen,) = trainer.generation_batches
    assert gen["completion_ids"].shape[0] == batch_size
    assert torch.equal(gen["scope_teacher_weights"], torch.ones(batch_size))


# --- temperatures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("student_temperature", [None, 1.0])
def test_self_teacher_opd_log_ratio_is_zero_only_at_student_logprob_temperature_one(tmp_path, tiny_pair_dir,
                                                                                     student_temperature):
    """OPD with the student as its own teacher, rollouts at temperature 0.6: with the default convention (student
    log-probs at the rollout temperature, the teacher's at 1) the OPD log-ratio is not zero; with
    student_logprob_temperature=1 both sides are the same distribution and it is zero."""
    args = make_args(tmp_path, "opd", teacher_model=tiny_pair_dir["student"], temperature=0.6,
                     student_logprob_temperature=student_temperature)
    trainer = MicroBatchRecorder(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                                 train_dataset=dataset(),
                                 processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))
    trainer.train()
    (micro,) = trainer.micro_batches
    mask = micro["inputs"]["scope_loss_mask"].bool()
    log_ratio = (micro["logps"] - micro["inputs"]["teacher_per_token_logps"])[mask]
    logged = trainer.state.log_history[0]["scope/opd/log_ratio_mean"]
    assert logged == pytest.approx(log_ratio.mean().item(), abs=1e-5)
    if student_temperature == 1.0:
        assert log_ratio.abs().max().item() < 1e-4
    else:  # (the tiny random model is near uniform, so the gap is small here; 0.13-0.15 nats/token on SmolLM2-135M)
        assert log_ratio.abs().max().item() > 1e-2 and abs(logged) > 1e-3


@pytest.mark.parametrize("student_temperature", [None, 1.0])
def test_student_logprob_temperature(tmp_path, tiny_pair_dir, student_temperature):
    """Default: the student's log-probs are at the rollout temperature (TRL's tempered logits, as the authors' code
    and verl); student_logprob_temperature=1.0 scores them at temperature 1, like the teacher. Sampling is unchanged."""
    trainer = build(RecordingTrainer, tmp_path, tiny_pair_dir, temperature=0.6, student_logprob_temperature=student_temperature)
    trainer.train()
    (gen,) = trainer.generation_batches
    reference = load_student(tiny_pair_dir["student"])
    ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], 1)
    with torch.no_grad():
        logits = reference(ids, attention_mask=torch.cat([gen["prompt_mask"], gen["completion_mask"]], 1)).logits
    logits = logits[:, gen["prompt_ids"].size(1) - 1 : -1]
    expected_t = 0.6 if student_temperature is None else 1.0
    expected = torch.log_softmax(logits / expected_t, -1).gather(-1, gen["completion_ids"][..., None])[..., 0]
    mask = gen["completion_mask"].bool()
    torch.testing.assert_close(gen["old_per_token_logps"][mask], expected[mask], atol=1e-4, rtol=1e-4)
