"""The registered ``scope`` loss, called through verl's real distillation wrapper, is ``scope_loss``.

Value and gradient, at theta_old and away from it, for every aggregation and surrogate option, with
the step batch split into micro-batches that cut prompt groups (the driver's global denominators
make the micro-batch losses add up to the batch loss).
"""

import dataclasses
import functools
import json

import pytest
import torch
from verl.trainer.distillation.losses import distillation_ppo_loss
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.metric import Metric
from verl.workers.config import DistillationConfig

from scope_opd.algorithms import AGGREGATIONS, scope_loss
from scope_opd.integrations.verl.config import LOSS_OPTIONS_KEY, scope_options
from scope_opd.integrations.verl.loss import compute_scope_distillation_loss
from scope_opd.integrations.verl.trainer import loss_options_json
from scope_opd.integrations.verl.weights import ROW_FIELDS, scope_batch

from verl_batch import compose_config, make_rows, padded_reference, step_batch

# Two prompts x 3 rollouts (mixed verdicts), one all-correct and one all-wrong prompt, one empty response.
SPEC = [
    ("a", 3, 5, 1.0), ("a", 3, 4, 0.0), ("a", 3, 6, 0.0),
    ("b", 2, 3, 1.0), ("b", 2, 5, 1.0), ("b", 2, 2, 0.0),
    ("c", 4, 4, 1.0), ("c", 4, 3, 1.0),
    ("d", 2, 5, 0.0), ("d", 2, 4, 0.0), ("d", 2, 0, 0.0),
]
MICRO_BATCHES = [[0, 3, 6, 8, 10], [1, 4, 7, 9], [2, 5]]  # every group split across micro-batches

OPTION_SETS = {
    "paper": {},
    "authors-clipped": {"mle_surrogate": "logp", "clip_epsilon": 0.2, "dual_clip": 3.0, "opd_advantage": "old"},
    "asymmetric-clip": {"clip_epsilon": 0.2, "clip_epsilon_high": 0.28},
}


@functools.lru_cache(maxsize=None)
def _configs(overrides):
    cfg = compose_config(overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    distillation = omega_conf_to_dataclass(cfg.distillation)
    assert isinstance(distillation, DistillationConfig)
    return cfg, actor, distillation


def configs(overrides=()):
    """The paper YAML through Hydra and verl's dataclasses (cached: composing is the slow part)."""
    return _configs(tuple(overrides))


def model_log_probs(rows, logp_ref: torch.Tensor) -> torch.Tensor:
    """Leaf ``[total_nnz]`` like a model forward's flat log-probs: entry ``offset + P - 1 + t`` is token t's."""
    values = []
    for i, r in enumerate(rows):
        seq = torch.full((r.prompt_len + r.response_len,), -7.0)  # prompt positions: never read
        seq[r.prompt_len - 1 : r.prompt_len - 1 + r.response_len] = logp_ref[i, : r.response_len]
        values.append(seq)
    return torch.cat(values).requires_grad_(True)


def micro_batch(full, index, rows, options_json, dp_size=1):
    mb = tu.index_select_tensor_dict(full, index)  # how verl selects rows (dynamic micro-batches)
    sub_rows = [rows[i] for i in index]
    tu.assign_non_tensor(mb, dp_size=dp_size, batch_num_tokens=sum(r.response_len for r in rows),
                         global_batch_size=len(rows))
    tu.assign_non_tensor(mb, **{LOSS_OPTIONS_KEY: options_json})
    return mb, sub_rows


def micro_batch_losses(actor, distillation, full, rows, options_json, logp_ref: torch.Tensor, dp_size=1):
    """verl's loss wrapper over ``MICRO_BATCHES`` at log-probs ``logp_ref``: summed loss, ``[B, T]`` gradient, last metrics."""
    total, grads, metrics = 0.0, torch.zeros_like(logp_ref), None
    for index in MICRO_BATCHES:
        mb, sub_rows = micro_batch(full, index, rows, options_json, dp_size)
        flat = model_log_probs(sub_rows, logp_ref[index])
        nested = torch.nested.nested_tensor_from_jagged(
            flat, offsets=torch.tensor([0] + [r.prompt_len + r.response_len for r in sub_rows]).cumsum(0))
        loss, metrics = distillation_ppo_loss(actor, distillation, model_output={"log_probs": nested}, data=mb)
        loss.backward()
        total = total + loss.detach()
        for j, (i, r) in enumerate(zip(index, sub_rows)):
            start = sum(s.prompt_len + s.response_len for s in sub_rows[:j]) + r.prompt_len - 1
            grads[i, : r.response_len] = flat.grad[start : start + r.response_len]
    return total, grads, metrics


def run_case(aggregation, extra, shift, dp_size=1, overrides=(), logp_scale=1.0, clamp_rows_at=None):
    cfg, actor, distillation = configs(overrides)
    options = dataclasses.replace(scope_options(cfg), loss_aggregation=aggregation, **extra)
    rows = make_rows(SPEC, seed=3)
    for r in rows:  # logp_scale > 1 reaches log-probs far below -10 (make_rows draws them in [-3, -0.05])
        r.old_logp, r.teacher_logp = r.old_logp * logp_scale, r.teacher_logp * logp_scale
        if clamp_rows_at is not None:
            r.old_logp, r.teacher_logp = r.old_logp.clamp_min(clamp_rows_at), r.teacher_logp.clamp_min(clamp_rows_at)
    _, tags, full = step_batch(rows)
    result = scope_batch(full, torch.zeros(len(rows), dtype=torch.bool), options)
    full.update(result.rows)
    options_json = loss_options_json(options, result.num_items)

    old, mask = padded_reference(rows, "old_logp")
    teacher, _ = padded_reference(rows, "teacher_logp")
    gen = torch.Generator().manual_seed(11)
    logp_ref = old + shift * torch.randn(old.shape, generator=gen)

    # Reference: scope_loss on the whole padded batch, its own denominators.
    ref_logp = logp_ref.clone().requires_grad_(True)
    w = result.rows
    ref, _ = scope_loss(ref_logp, old, teacher, mask & w["scope_valid"][:, None], w["scope_correct"],
                        w["scope_student_weight"], w["scope_teacher_weight"], **options.loss_kwargs())
    ref.backward()

    total, grads, metrics = micro_batch_losses(actor, distillation, full, rows, options_json, logp_ref, dp_size)
    return total, ref.detach(), grads, ref_logp.grad, metrics


def test_verls_log_prob_min_clamp_never_reaches_the_scope_loss():
    """verl 0.9.1 clamps log-probs at distillation_loss.log_prob_min_clamp (dataclass default -10) only in its
    top-k losses (fsdp/megatron compute_topk_loss); the sampled-token path that calls the registered 'scope' loss
    passes the student's and teacher's log-probs through unclamped. Guarded here with the clamp at -10 and
    log-probs down to -18: value and gradient are scope_loss of the unclamped inputs."""
    clamp = ["distillation.distillation_loss.log_prob_min_clamp=-10"]
    assert configs(clamp)[2].distillation_loss.log_prob_min_clamp == -10
    total, ref, grads, ref_grads, _ = run_case("authors", {}, 0.3, overrides=clamp, logp_scale=6.0)
    rows = make_rows(SPEC, seed=3)
    teacher, mask = padded_reference(rows, "teacher_logp")
    assert (teacher[mask] * 6.0 < -10).sum() > 5, "the case must hold log-probs below the clamp"
    assert torch.allclose(total, ref, rtol=1e-5, atol=1e-6), (total, ref)
    assert torch.allclose(grads, ref_grads, rtol=1e-4, atol=1e-7)
    # The case is sensitive to the clamp: the same batch with its log-probs clamped at -10 has another loss.
    clamped_total, *_ = run_case("authors", {}, 0.3, logp_scale=6.0, clamp_rows_at=-10.0)
    assert not torch.allclose(total, clamped_total, rtol=1e-3), (total, clamped_total)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
@pytest.mark.parametrize("shift", [0.0, 0.3], ids=["theta_old", "away"])
def test_registered_loss_through_verl_wrapper_equals_scope_loss(aggregation, option_set, shift):
    total, ref, grads, ref_grads, metrics = run_case(aggregation, OPTION_SETS[option_set], shift)
    assert torch.allclose(total, ref, rtol=1e-5, atol=1e-6), (total, ref)
    assert torch.allclose(grads, ref_grads, rtol=1e-4, atol=1e-7)
    assert ref_grads.abs().sum() > 0
    assert isinstance(metrics["scope/loss_mle"], Metric) and "distillation/loss" in metrics


def test_dp_size_scales_the_rank_loss_as_verl_expects():
    # verl divides data-parallel gradients by dp_size; each rank's loss carries the factor back.
    one, ref, *_ = run_case("authors", {}, 0.3, dp_size=1)
    two, *_ = run_case("authors", {}, 0.3, dp_size=2)
    assert torch.allclose(two, 2 * one, rtol=1e-6) and torch.allclose(one, ref, rtol=1e-5)


def test_loss_without_driver_fields_names_the_trainer_mode():
    cfg, actor, distillation = configs()
    rows = make_rows(SPEC[:3])
    _, _, full = step_batch(rows)
    tu.assign_non_tensor(full, dp_size=1, batch_num_tokens=15, global_batch_size=3)
    flat = model_log_probs(rows, padded_reference(rows, "old_logp")[0])
    with pytest.raises(ValueError, match="trainer_mode=scope"):
        compute_scope_distillation_loss(actor, distillation, {"log_probs": flat}, full)


def test_loss_refuses_another_aggregation_mode_of_the_actor():
    cfg, actor, distillation = configs(["actor_rollout_ref.actor.loss_agg_mode=token-mean"])
    with pytest.raises(ValueError, match="loss_agg_mode=token-sum"):
        compute_scope_distillation_loss(actor, distillation, {}, None)


def test_options_travel_as_json_with_the_denominators():
    options = scope_options(compose_config(["scope.loss_aggregation=path-token-mean", "scope.dual_clip=3"]))
    payload = json.loads(loss_options_json(options, [7.0, 9.0]))
    assert payload == {"num_items": [7.0, 9.0], "loss_kwargs": {
        "aggregation": "path-token-mean", "mle_surrogate": "ratio", "clip_epsilon": None,
        "clip_epsilon_high": None, "dual_clip": 3.0, "opd_advantage": "current"}}
    assert set(ROW_FIELDS) == {"scope_correct", "scope_valid", "scope_student_weight", "scope_teacher_weight"}
