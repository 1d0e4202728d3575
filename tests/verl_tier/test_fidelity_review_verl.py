"""Outside fidelity review, verl side: the plugin's weights (driver) and loss (actor, through verl's real
distillation wrapper, micro-batches cutting every group) against the token-by-token references of
tests/test_fidelity_review.py, written again without scope_opd. The TRL trainer feeds the same shared
functions (scope_opd.batch, scope_opd.algorithms), which test_fidelity_review.py checks against the same
references, so both engines compute these numbers for the same batch."""

import dataclasses

import pytest
import torch

from scope_opd.integrations.verl.config import scope_options
from scope_opd.integrations.verl.trainer import loss_options_json
from scope_opd.integrations.verl.weights import scope_batch

from test_fidelity_review import ref_loss, ref_mean_logp, ref_weights
from test_loss import SPEC, configs, micro_batch_losses
from verl_batch import make_rows, padded_reference, step_batch

CASES = {  # name -> (scope options, the reference's clip mode, opd_advantage, mle_surrogate)
    "paper-defaults": ({}, "none", "current", "ratio"),
    "authors-release": ({"student_weighting": "inverse", "mle_surrogate": "logp", "clip_epsilon": 0.2,
                         "dual_clip": 3.0, "opd_advantage": "old"}, "authors", "old", "logp"),
    "ppo-sum-tau2": ({"weight_normalization": "sum", "tau": 2.0, "teacher_weighting": "perplexity",
                      "clip_epsilon": 0.2, "loss_aggregation": "seq-mean-token-mean"}, "ppo", "current", "ratio"),
    "ablation-uniform": ({"student_weighting": "uniform", "teacher_weighting": "uniform",
                          "loss_aggregation": "path-token-mean"}, "none", "current", "ratio"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verl_plugin_weights_and_loss_match_the_independent_reference(case):
    extra, clip, opd_advantage, mle_surrogate = CASES[case]
    cfg, actor, distillation = configs()
    options = dataclasses.replace(scope_options(cfg), **extra)
    rows = make_rows(SPEC, seed=5)
    _, _, full = step_batch(rows)
    result = scope_batch(full, torch.zeros(len(rows), dtype=torch.bool), options)
    full.update(result.rows)
    options_json = loss_options_json(options, result.num_items)

    # Weights: eqs. 4-5 / the authors' softmax * n, from the rows' own token values.
    groups = [r.uid for r in rows]
    correct = [r.reward >= 1.0 for r in rows]
    student_mean = [ref_mean_logp(r.old_logp.tolist(), [True] * r.response_len) for r in rows]
    teacher_mean = [ref_mean_logp(r.teacher_logp.tolist(), [True] * r.response_len) for r in rows]
    valid = [r.response_len > 0 for r in rows]
    want_stu, want_tea = ref_weights(groups, correct, valid, student_mean, teacher_mean, tau=options.tau,
                                     normalization=options.weight_normalization,
                                     student_weighting=options.student_weighting,
                                     teacher_weighting=options.teacher_weighting)
    torch.testing.assert_close(result.rows["scope_student_weight"], torch.tensor(want_stu), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.rows["scope_teacher_weight"], torch.tensor(want_tea), rtol=1e-5, atol=1e-6)

    # Loss: the sum of the micro-batch losses through verl's wrapper, value and gradient, at theta != theta_old.
    old, mask = padded_reference(rows, "old_logp")
    teacher, _ = padded_reference(rows, "teacher_logp")
    gen = torch.Generator().manual_seed(13)
    logp_ref = old + 0.4 * torch.randn(old.shape, generator=gen)
    total, grads, _ = micro_batch_losses(actor, distillation, full, rows, options_json, logp_ref)
    ref_logp = logp_ref.clone().requires_grad_(True)
    reference = ref_loss(ref_logp, old.tolist(), teacher.tolist(), mask.tolist(), correct, want_stu, want_tea,
                         aggregation=options.loss_aggregation, clip=clip, opd_advantage=opd_advantage,
                         mle_surrogate=mle_surrogate, eps_high=options.clip_epsilon_high)
    reference.backward()
    assert float(total) == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.where(mask, grads, 0.0), torch.where(mask, ref_logp.grad, 0.0),
                               rtol=1e-4, atol=1e-7)
