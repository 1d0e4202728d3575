"""The SCOPE maths (paper eqs. 3-7) against worked examples, properties and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_opd import dual_path_weights, opd_weights, scope_loss, sequence_mean_logp
from scope_opd.algorithms import AGGREGATIONS, loss_denominators

NAN = float("nan")


def logp_of_ppl(ppl):
    return -math.log(ppl)


# --- paper Figure 2 --------------------------------------------------------------------------


def test_figure2_worked_example_sum_normalisation():
    """Fig. 2, tau = 1: correct PPL_S 1.2/2.6/3.8 -> .158/.342/.500; incorrect PPL_T 4.5/2.9/1.7 -> .192/.298/.510."""
    group = torch.zeros(6, dtype=torch.long)
    correct = torch.tensor([1, 1, 1, 0, 0, 0])
    student = torch.tensor([logp_of_ppl(p) for p in (1.2, 2.6, 3.8)] + [NAN] * 3)  # unused rows may be NaN
    teacher = torch.tensor([NAN] * 3 + [logp_of_ppl(p) for p in (4.5, 2.9, 1.7)])
    w_stu, w_tea = dual_path_weights(group, correct, student, teacher, tau=1.0, normalization="sum")
    torch.testing.assert_close(w_stu, torch.tensor([0.158, 0.342, 0.500, 0, 0, 0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(w_tea, torch.tensor([0, 0, 0, 0.192, 0.298, 0.510]), atol=1e-3, rtol=0)
    # Exactly zero off-path, not merely small.
    assert (w_stu[3:] == 0).all() and (w_tea[:3] == 0).all()


def test_figure2_mean_normalisation_is_sum_times_path_size():
    group = torch.zeros(6, dtype=torch.long)
    correct = torch.tensor([1, 1, 1, 0, 0, 0])
    student = torch.tensor([logp_of_ppl(p) for p in (1.2, 2.6, 3.8)] + [0.0] * 3)
    teacher = torch.tensor([0.0] * 3 + [logp_of_ppl(p) for p in (4.5, 2.9, 1.7)])
    s_sum, t_sum = dual_path_weights(group, correct, student, teacher, normalization="sum")
    s_mean, t_mean = dual_path_weights(group, correct, student, teacher)  # default "mean"
    torch.testing.assert_close(s_mean, 3 * s_sum)
    torch.testing.assert_close(t_mean, 3 * t_sum)


def test_eq4_eq5_closed_form_with_tau():
    """w_stu = PPL_S^(1/tau)/sum, w_tea = PPL_T^(-1/tau)/sum, checked directly for tau = 0.5 and 2."""
    ppl_s, ppl_t = [1.1, 1.7, 5.0], [1.3, 2.2, 9.0]
    group = torch.zeros(6, dtype=torch.long)
    correct = torch.tensor([True] * 3 + [False] * 3)
    student = torch.tensor([logp_of_ppl(p) for p in ppl_s] + [0.0] * 3)
    teacher = torch.tensor([0.0] * 3 + [logp_of_ppl(p) for p in ppl_t])
    for tau in (0.5, 2.0):
        w_stu, w_tea = dual_path_weights(group, correct, student, teacher, tau=tau, normalization="sum")
        expect_s = torch.tensor([p ** (1 / tau) for p in ppl_s])
        expect_t = torch.tensor([p ** (-1 / tau) for p in ppl_t])
        torch.testing.assert_close(w_stu[:3], expect_s / expect_s.sum())
        torch.testing.assert_close(w_tea[3:], expect_t / expect_t.sum())


# --- ablations (paper Fig. 5) -------------------------------------------------------------------


def _one_group():
    group = torch.zeros(6, dtype=torch.long)
    correct = torch.tensor([1, 1, 1, 0, 0, 0])
    student = torch.tensor([-0.1, -0.9, -1.5, 0.0, 0.0, 0.0])
    teacher = torch.tensor([0.0, 0.0, 0.0, -1.4, -0.8, -0.2])
    return group, correct, student, teacher


def test_ablation_reversed_student_weight_favours_low_perplexity():
    """'inverse' (the authors' released script) puts the most weight on the most confident correct path."""
    group, correct, student, teacher = _one_group()
    paper, _ = dual_path_weights(group, correct, student, teacher)
    released, _ = dual_path_weights(group, correct, student, teacher, student_weighting="inverse")
    assert paper[:3].argmax() == 2  # highest student PPL (logp -1.5) gets most weight, eq. 4
    assert released[:3].argmax() == 0
    # Reversing the sign of the logits reverses the ranking exactly.
    assert torch.equal(paper[:3].argsort(), released[:3].argsort().flip(0))


def test_ablation_reversed_teacher_weight_favours_high_teacher_perplexity():
    group, correct, student, teacher = _one_group()
    _, paper = dual_path_weights(group, correct, student, teacher)
    _, reversed_ = dual_path_weights(group, correct, student, teacher, teacher_weighting="perplexity")
    assert paper[3:].argmax() == 2  # teacher most confident (logp -0.2) -> most weight, eq. 5
    assert reversed_[3:].argmax() == 0


@pytest.mark.parametrize("normalization,value", [("mean", 1.0), ("sum", 1 / 3)])
def test_ablation_without_dpaw_is_uniform(normalization, value):
    group, correct, student, teacher = _one_group()
    w_stu, w_tea = dual_path_weights(
        group, correct, None, None, student_weighting="uniform", teacher_weighting="uniform", normalization=normalization
    )
    torch.testing.assert_close(w_stu, torch.tensor([value] * 3 + [0.0] * 3))
    torch.testing.assert_close(w_tea, torch.tensor([0.0] * 3 + [value] * 3))


def test_ablation_switches_are_independent():
    group, correct, student, teacher = _one_group()
    full_s, full_t = dual_path_weights(group, correct, student, teacher)
    no_t_s, no_t_t = dual_path_weights(group, correct, student, teacher, teacher_weighting="uniform")
    no_s_s, no_s_t = dual_path_weights(group, correct, student, teacher, student_weighting="uniform")
    torch.testing.assert_close(no_t_s, full_s)
    torch.testing.assert_close(no_s_t, full_t)
    torch.testing.assert_close(no_t_t, torch.tensor([0.0] * 3 + [1.0] * 3))
    torch.testing.assert_close(no_s_s, torch.tensor([1.0] * 3 + [0.0] * 3))


# --- edge cases ----------------------------------------------------------------------------------


def test_all_correct_and_all_incorrect_groups_have_one_path():
    group = torch.tensor([7, 7, 7, -3, -3, -3])  # arbitrary integer labels
    correct = torch.tensor([1, 1, 1, 0, 0, 0])
    student = torch.tensor([-0.5, -1.0, -2.0, NAN, NAN, NAN])
    teacher = torch.tensor([NAN, NAN, NAN, -0.5, -1.0, -2.0])
    w_stu, w_tea = dual_path_weights(group, correct, student, teacher, normalization="sum")
    assert w_stu[:3].sum().item() == pytest.approx(1.0) and (w_stu[3:] == 0).all()
    assert w_tea[3:].sum().item() == pytest.approx(1.0) and (w_tea[:3] == 0).all()


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_singleton_path_gets_weight_one(normalization):
    group = torch.tensor([0, 0, 0, 0])
    correct = torch.tensor([1, 0, 0, 0])
    student = torch.tensor([-3.0, 0.0, 0.0, 0.0])
    teacher = torch.tensor([0.0, -0.1, -0.2, -0.3])
    w_stu, _ = dual_path_weights(group, correct, student, teacher, normalization=normalization)
    assert w_stu[0].item() == 1.0


def test_mixed_group_sizes_and_shuffled_rows():
    group = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    correct = torch.tensor([1, 1, 0, 0, 1, 1, 0, 1, 0])
    student = torch.linspace(-2, -0.1, 9)
    teacher = torch.linspace(-0.3, -3, 9)
    w_stu, w_tea = dual_path_weights(group, correct, student, teacher, normalization="sum")
    for g in (0, 1, 2):
        rows = group == g
        for weights, path in ((w_stu, correct.bool()), (w_tea, ~correct.bool())):
            members = rows & path
            if members.any():
                assert weights[members].sum().item() == pytest.approx(1.0, abs=1e-6)
            # Reference: a plain softmax over the members only.
        ref = torch.softmax(-student[rows & correct.bool()], 0)
        torch.testing.assert_close(w_stu[rows & correct.bool()], ref)
        ref = torch.softmax(teacher[rows & ~correct.bool()], 0)
        torch.testing.assert_close(w_tea[rows & ~correct.bool()], ref)


def test_invalid_rows_get_zero_and_leave_the_normalisation():
    group = torch.zeros(4, dtype=torch.long)
    correct = torch.tensor([0, 0, 0, 1])
    teacher = torch.tensor([-0.5, NAN, -1.0, NAN])  # row 1 failed teacher scoring
    student = torch.tensor([0.0, 0.0, 0.0, -1.0])
    valid = torch.tensor([True, False, True, True])
    _, w_tea = dual_path_weights(group, correct, student, teacher, normalization="sum", valid=valid)
    assert w_tea[1] == 0
    torch.testing.assert_close(w_tea[[0, 2]], torch.softmax(torch.tensor([-0.5, -1.0]), 0))


def test_sequence_mean_logp_masks_and_empty_rows_are_nan():
    token_logp = torch.tensor([[-1.0, -3.0, float("-inf")], [-2.0, NAN, NAN], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = sequence_mean_logp(token_logp, mask)
    assert out[0].item() == -2.0 and out[1].item() == -2.0  # garbage on masked positions never read
    assert math.isnan(out[2].item())
    assert torch.exp(-out[0]).item() == pytest.approx(math.e**2)  # PPL, eq. 3


def test_empty_row_used_for_weights_raises_naming_it():
    token_logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    mean = sequence_mean_logp(token_logp, mask)
    with pytest.raises(ValueError, match=r"student_mean_logp .*rows 1"):
        dual_path_weights(torch.tensor([0, 0]), torch.tensor([1, 1]), mean, None)


# --- properties ----------------------------------------------------------------------------------


@st.composite
def batches(draw):
    n_groups = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n_groups, max_size=n_groups))
    group = torch.tensor([g for g, s in enumerate(sizes) for _ in range(s)])
    b = len(group)
    correct = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    vals = st.floats(-8, 0, allow_nan=False)
    student = torch.tensor(draw(st.lists(vals, min_size=b, max_size=b)), dtype=torch.float32)
    teacher = torch.tensor(draw(st.lists(vals, min_size=b, max_size=b)), dtype=torch.float32)
    tau = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return group, correct, student, teacher, tau


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(["mean", "sum"]), st.randoms(use_true_random=False))
def test_properties(batch, normalization, rnd):
    group, correct, student, teacher, tau = batch
    w_stu, w_tea = dual_path_weights(group, correct, student, teacher, tau=tau, normalization=normalization)
    assert (w_stu >= 0).all() and (w_tea >= 0).all()
    assert (w_stu[~correct] == 0).all() and (w_tea[correct] == 0).all()
    for g in group.unique():
        for weights, path in ((w_stu, correct), (w_tea, ~correct)):
            members = (group == g) & path
            if members.any():
                target = 1.0 if normalization == "sum" else float(members.sum())
                assert weights[members].sum().item() == pytest.approx(target, rel=1e-5)
    # Permutation equivariance: shuffling rows shuffles the weights.
    perm = torch.tensor(rnd.sample(range(len(group)), len(group)))
    p_stu, p_tea = dual_path_weights(group[perm], correct[perm], student[perm], teacher[perm], tau=tau, normalization=normalization)
    torch.testing.assert_close(p_stu, w_stu[perm])
    torch.testing.assert_close(p_tea, w_tea[perm])
    # Shift invariance inside a group: adding a per-group constant changes nothing (softmax).
    shift = torch.randn(int(group.max()) + 1)[group]
    s_stu, s_tea = dual_path_weights(group, correct, student + shift, teacher + shift, tau=tau, normalization=normalization)
    torch.testing.assert_close(s_stu, w_stu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_tea, w_tea, atol=1e-5, rtol=1e-5)
    # Relabelling groups changes nothing.
    r_stu, _ = dual_path_weights(group * 13 - 5, correct, student, teacher, tau=tau, normalization=normalization)
    torch.testing.assert_close(r_stu, w_stu)


def test_large_tau_tends_to_uniform():
    group, correct, student, teacher = _one_group()
    w_stu, w_tea = dual_path_weights(group, correct, student, teacher, tau=1e6)
    torch.testing.assert_close(w_stu, torch.tensor([1.0] * 3 + [0.0] * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(w_tea, torch.tensor([0.0] * 3 + [1.0] * 3), atol=1e-5, rtol=0)


def test_extreme_logps_are_stable():
    group = torch.zeros(3, dtype=torch.long)
    correct = torch.tensor([1, 1, 1])
    student = torch.tensor([-1e4, -1.0, -5e3])
    w_stu, _ = dual_path_weights(group, correct, student, None, teacher_weighting="uniform", tau=0.5)
    assert torch.isfinite(w_stu).all()
    assert w_stu[0].item() == pytest.approx(3.0)


def test_bf16_inputs_weights_computed_in_fp32():
    group, correct, student, teacher = _one_group()
    w32 = dual_path_weights(group, correct, student, teacher)
    w16 = dual_path_weights(group, correct, student.bfloat16(), teacher.bfloat16())
    assert w16[0].dtype == torch.float32
    torch.testing.assert_close(w16[0], w32[0], atol=2e-2, rtol=0)
    torch.testing.assert_close(w16[1], w32[1], atol=2e-2, rtol=0)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    group, correct, student, teacher = _one_group()
    with pytest.raises(ValueError, match="empty batch"):
        dual_path_weights(group[:0], correct[:0], student[:0], teacher[:0])
    with pytest.raises(ValueError, match=r"teacher_mean_logp has shape \(5,\)"):
        dual_path_weights(group, correct, student, teacher[:5])
    with pytest.raises(ValueError, match="teacher_mean_logp is NaN/inf on rows 4"):
        dual_path_weights(group, correct, student, torch.tensor([0.0, 0, 0, -1, NAN, -1]))
    with pytest.raises(ValueError, match="student_mean_logp is NaN/inf on rows 0"):
        dual_path_weights(group, correct, torch.tensor([float("-inf"), -1, -1, 0, 0, 0]), teacher)
    with pytest.raises(ValueError, match="tau"):
        dual_path_weights(group, correct, student, teacher, tau=0)
    with pytest.raises(ValueError, match="student_weighting"):
        dual_path_weights(group, correct, student, teacher, student_weighting="ppl")
    with pytest.raises(ValueError, match="correct must be boolean"):
        dual_path_weights(group, torch.tensor([0, 2, 1, 0, 0, 0]), student, teacher)
    with pytest.raises(ValueError, match="group_ids must be integer"):
        dual_path_weights(group.float(), correct, student, teacher)


# --- scope_loss: gradients (eq. 6) ---------------------------------------------------------------


def _loss_batch(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    old = -torch.rand(b, t, generator=gen) * 3
    teacher = -torch.rand(b, t, generator=gen) * 3
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[4, 2:] = False
    mask[5, 0:] = False  # an empty row: contributes nothing
    teacher[0] = NAN  # correct row: teacher value must be ignored
    teacher[3, 5:] = float("-inf")  # masked out? no: row 3 is incorrect and fully masked -> set mask
    mask[3, 5:] = False
    correct = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    w_stu = torch.tensor([0.5, 1.2, 1.3, 0, 0, 0])
    w_tea = torch.tensor([0, 0, 0, 0.7, 1.3, 1.0])
    return old.to(dtype), teacher.to(dtype), mask, correct, w_stu, w_tea


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_at_old_policy_matches_analytic(aggregation):
    """At theta = theta_old: d/dlogp = -w_stu on correct tokens, w_tea*(logp - logp_T) on incorrect ones (eq. 6)."""
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    logp = old.clone().requires_grad_(True)
    loss, metrics = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation=aggregation)
    loss.backward()
    per_token = torch.where(correct[:, None], -w_stu[:, None], w_tea[:, None] * (old - torch.nan_to_num(teacher)))
    per_token = torch.where(mask, per_token, 0.0)
    n_tok = mask.sum(1)
    correct_tokens = (mask & correct[:, None]).sum()
    if aggregation == "token-mean":
        expected = per_token / mask.sum()
    elif aggregation == "authors":  # MLE over the correct rows' tokens, OPD over all tokens
        expected = torch.where(correct[:, None], per_token / correct_tokens, per_token / mask.sum())
    elif aggregation == "path-token-mean":  # each path over its own tokens
        expected = torch.where(correct[:, None], per_token / correct_tokens, per_token / (mask.sum() - correct_tokens))
    elif aggregation == "sum":
        expected = per_token
    elif aggregation == "seq-mean-token-sum":
        expected = per_token / (n_tok > 0).sum()
    else:
        expected = per_token / n_tok.clamp(min=1)[:, None] / (n_tok > 0).sum()
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["loss/mle"] + metrics["loss/opd"] == pytest.approx(loss.item(), abs=1e-6)


def test_loss_value_and_metrics():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    loss, metrics = scope_loss(old.clone(), old, teacher, mask, correct, w_stu, w_tea, aggregation="sum")
    # rho = 1 at the old policy: MLE part = -sum w_stu * n_tokens, OPD part = sum w_tea * (logp - logp_T).
    n_tok = mask.sum(1).float()
    expect_mle = -(w_stu * n_tok)[correct].sum()
    log_ratio = torch.where(mask & ~correct[:, None], old - torch.nan_to_num(teacher), 0.0)
    expect_opd = (w_tea[:, None] * log_ratio).sum()
    assert metrics["loss/mle"] == pytest.approx(expect_mle.item(), rel=1e-6)
    assert metrics["loss/opd"] == pytest.approx(expect_opd.item(), rel=1e-6)
    assert metrics["opd/log_ratio_mean"] == pytest.approx((log_ratio.sum() / (mask & ~correct[:, None]).sum()).item())
    assert metrics["frac_correct"] == 0.5
    assert metrics["ratio/mean"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(expect_mle.item() + expect_opd.item(), rel=1e-6)


def test_importance_ratio_enters_linearly_and_log_ratio_is_detached():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    logp = (old + 0.3).requires_grad_(True)
    loss, _ = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation="sum")
    loss.backward()
    rho = torch.exp(torch.tensor(0.3))
    adv = torch.where(correct[:, None], -w_stu[:, None], w_tea[:, None] * (logp.detach() - torch.nan_to_num(teacher)))
    expected = torch.where(mask, adv * rho, 0.0)  # d rho / d logp = rho; sg() term contributes no gradient
    torch.testing.assert_close(logp.grad, expected)


def test_num_items_makes_microbatches_add_up():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    full, _ = scope_loss(old.clone(), old, teacher, mask, correct, w_stu, w_tea, aggregation="token-mean")
    total_tokens = float(mask.sum())
    parts = [
        scope_loss(old[s].clone(), old[s], teacher[s], mask[s], correct[s], w_stu[s], w_tea[s],
                   aggregation="token-mean", num_items=total_tokens)[0]
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_global_per_path_denominators_make_microbatches_add_up(aggregation):
    """Summed loss_denominators of the micro-batches, passed as num_items, reproduce the whole batch (value and grad)."""
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    logp = (old + 0.1).requires_grad_(True)
    full, _ = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation=aggregation)
    full.backward()
    full_grad = logp.grad.clone()
    logp.grad = None
    # Micro-batches that split the paths unevenly, one of them with no correct row at all.
    pieces = (slice(0, 1), slice(1, 3), slice(3, 6))
    num_items = sum(loss_denominators(mask[s], correct[s], aggregation) for s in pieces)
    torch.testing.assert_close(num_items, loss_denominators(mask, correct, aggregation) * (3 if aggregation == "sum" else 1))
    total = sum(
        scope_loss(logp[s], old[s], teacher[s], mask[s], correct[s], w_stu[s], w_tea[s],
                   aggregation=aggregation, num_items=num_items)[0]
        for s in pieces
    )
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, full_grad)


@pytest.mark.parametrize("aggregation", ["authors", "path-token-mean"])
def test_mle_gradient_does_not_shrink_with_the_fraction_of_correct_tokens(aggregation):
    """With token-mean over all tokens the MLE gradient per correct token is 1/N_all, so it shrinks as accuracy
    drops (1, 1/2, 1/4, 1/8 at 100/50/25/12.5% correct tokens); the authors' MLE path divides by correct tokens."""
    grads = {}
    for agg in ("token-mean", aggregation):
        grads[agg] = []
        for n_correct in (8, 4, 2, 1):
            correct = torch.arange(8) < n_correct
            logp = torch.full((8, 5), -1.0, requires_grad=True)
            w_stu = correct.float()
            w_tea = (~correct).float()
            loss, _ = scope_loss(logp, logp.detach(), torch.full((8, 5), -1.0), torch.ones(8, 5, dtype=torch.bool),
                                 correct, w_stu, w_tea, aggregation=agg)
            loss.backward()
            grads[agg].append(-logp.grad[correct].sum().item())  # total MLE gradient mass
    assert grads["token-mean"] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert grads[aggregation] == pytest.approx([1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_an_empty_path_contributes_exactly_zero(aggregation):
    old, teacher, mask, _, _, _ = _loss_batch()
    teacher = torch.nan_to_num(teacher)
    for correct in (torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        w = torch.ones(6)
        logp = old.clone().requires_grad_(True)
        num_items = loss_denominators(mask, correct, aggregation)
        loss, metrics = scope_loss(logp, old, teacher, mask, correct, w * correct, w * ~correct,
                                   aggregation=aggregation, num_items=num_items)
        loss.backward()
        assert torch.isfinite(logp.grad).all()
        empty = "loss/opd" if correct.all() else "loss/mle"
        assert metrics[empty] == 0.0
    # A zero global denominator (no token of that path anywhere) is 0, not NaN.
    zero = scope_loss(old, old, teacher, torch.zeros_like(mask), torch.zeros(6, dtype=torch.bool), torch.zeros(6),
                      torch.ones(6), aggregation=aggregation, num_items=torch.zeros(2))[0]
    assert zero.item() == 0.0


def test_loss_denominators_table():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    correct = torch.tensor([True, False, True, False])
    expect = {"authors": [3, 6], "path-token-mean": [3, 3], "token-mean": [6, 6], "sum": [1, 1],
              "seq-mean-token-sum": [3, 3], "seq-mean-token-mean": [3, 3]}
    assert set(expect) == set(AGGREGATIONS)
    for aggregation, values in expect.items():
        assert loss_denominators(mask, correct, aggregation).tolist() == values, aggregation


def test_ppo_clip_stops_the_gradient_outside_the_trust_region_on_both_paths():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    teacher = torch.nan_to_num(teacher)
    for shift, moving_out in ((0.5, "up"), (-0.5, "down")):
        logp = (old + shift).requires_grad_(True)  # rho = e^0.5 = 1.65 or e^-0.5 = 0.61: outside [0.8, 1.2]
        loss, metrics = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation="sum", clip_epsilon=0.2)
        loss.backward()
        adv = torch.where(correct[:, None], w_stu[:, None], -w_tea[:, None] * (logp.detach() - teacher))
        # PPO: a token is clipped (no gradient) when the ratio left the region in the direction its advantage pushes.
        pushed_out = (adv > 0) if moving_out == "up" else (adv < 0)
        rho = torch.exp(torch.tensor(shift))
        expected = torch.where(mask & ~pushed_out, -adv * rho, 0.0)
        torch.testing.assert_close(logp.grad, expected)
        assert metrics["clip/frac"] == pytest.approx((mask & pushed_out).sum().item() / mask.sum().item())
    # Inside the region clipping changes nothing.
    logp = (old + 0.05).requires_grad_(True)
    a = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, clip_epsilon=0.2)[0]
    b = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea)[0]
    assert a.item() == pytest.approx(b.item())


@pytest.mark.parametrize("opd_advantage", ["current", "old"])
def test_dual_clip_bounds_negative_advantage_tokens(opd_advantage):
    """rho = e^2 on an OPD token the teacher dislikes (A < 0): plain PPO loss rho*|A|; dual clip 3 caps it at 3*|A|.

    logp - logp_T = 3 (current advantage -3) and old_logp - logp_T = 1 (the authors' advantage -1): both negative,
    so the bound applies to each, at its own |A|.
    """
    logp = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-2.0]])
    teacher = torch.tensor([[-3.0]])
    abs_advantage = {"current": 3.0, "old": 1.0}[opd_advantage]
    args = (logp, old, teacher, torch.ones(1, 1, dtype=torch.bool), torch.tensor([False]), torch.zeros(1), torch.ones(1))
    kw = {"aggregation": "sum", "clip_epsilon": 0.2, "opd_advantage": opd_advantage}
    plain, _ = scope_loss(*args, **kw)
    dual, metrics = scope_loss(*args, dual_clip=3.0, **kw)
    assert plain.item() == pytest.approx(math.exp(2.0) * abs_advantage)
    assert dual.item() == pytest.approx(3.0 * abs_advantage)
    assert metrics["clip/frac"] == 1.0
    dual.backward()
    assert logp.grad.item() == 0.0


def _authors_ppo_loss(logp, old, teacher, mask, correct, w_stu, w_tea, clip=0.2, dual_clip=3.0):
    """The authors' verl 0.3.1 loss written out token by token (SCOPE_METHOD.md section 9), independent of scope_loss.

    OPD path: advantage A = w_tea * -(old_logp - teacher_logp), fixed per token; verl's compute_policy_loss:
    pg1 = -A * ratio, pg2 = -A * clip(ratio, 1 - 0.2, 1 + 0.2), l = max(pg1, pg2), and for A < 0
    min(l, -A * 3); token-mean over ALL response tokens. MLE path: -logp * w_stu, token-mean over the
    correct rows' tokens. Returns a scalar with autograd through ``logp``.
    """
    b, t = logp.shape
    opd_terms, mle_terms = [], []
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            if correct[i]:
                mle_terms.append(-logp[i, j] * float(w_stu[i]))
                continue
            advantage = float(w_tea[i]) * -(float(old[i, j]) - float(teacher[i, j]))
            ratio = torch.exp(logp[i, j] - float(old[i, j]))
            pg1 = -advantage * ratio
            pg2 = -advantage * torch.clamp(ratio, 1 - clip, 1 + clip)
            token = torch.maximum(pg1, pg2)
            if advantage < 0:
                token = torch.minimum(token, torch.tensor(-advantage * dual_clip))
            opd_terms.append(token)
    n_all = int(mask.sum())
    n_correct = int((mask & correct[:, None]).sum())
    opd = torch.stack(opd_terms).sum() / n_all if opd_terms else logp.sum() * 0
    mle = torch.stack(mle_terms).sum() / n_correct if mle_terms else logp.sum() * 0
    return mle + opd


def test_old_opd_advantage_is_the_authors_ppo_loss_away_from_theta_old():
    """opd_advantage='old' + the authors' clip settings = the authors' loss, value and gradient, at theta != theta_old.

    Row 0 is correct (MLE path). Row 1's tokens (incorrect): (a) logp and old_logp on opposite sides of the teacher,
    so the current and the old advantage have opposite signs (the issue's example: the current advantage gives the
    gradient -0.045, the authors' +0.045); (b) rho = e^1.5 > 3 with A_old < 0: dual-clipped; (c) A_old > 0 with
    rho > 1.2: PPO-clipped; (d) inside the trust region. Row 2 (incorrect, other weight) adds random tokens.
    """
    logp0 = torch.tensor([[-0.3, -0.7, -1.2, -0.2],
                          [-1.1, -0.5, -1.0, -0.9],
                          [-0.4, -2.0, -0.8, -1.5]])
    old = torch.tensor([[-0.5, -0.6, -1.0, -0.9],
                        [-1.0, -2.0, -1.5, -0.85],
                        [-0.6, -1.7, -0.9, -1.4]])
    teacher = torch.tensor([[NAN, NAN, NAN, NAN],
                            [-1.05, -3.0, -0.5, -1.2],
                            [-0.2, -2.5, -0.3, -1.0]])
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    correct = torch.tensor([True, False, False])
    w_stu, w_tea = torch.tensor([1.3, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.6])

    logp = logp0.clone().requires_grad_(True)
    loss, metrics = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation="authors",
                               clip_epsilon=0.2, dual_clip=3.0, mle_surrogate="logp", opd_advantage="old")
    loss.backward()
    ref_logp = logp0.clone().requires_grad_(True)
    reference = _authors_ppo_loss(ref_logp, old, teacher, mask, correct, w_stu, w_tea)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    # The opposite-sign token: the authors' gradient (times the 11 masked tokens of the denominator) is +0.045.
    n_all = int(mask.sum())
    assert logp.grad[1, 0].item() * n_all == pytest.approx(0.05 * math.exp(-0.1), rel=1e-5)
    assert logp.grad[1, 1].item() == 0.0 and logp.grad[1, 2].item() == 0.0  # dual- and PPO-clipped
    # Clipped: (b), (c), and row 2's first two tokens (rho = e^0.2 > 1.2 with A > 0; rho = e^-0.3 < 0.8 with A < 0).
    assert metrics["clip/frac"] == pytest.approx(4 / n_all)
    # The paper's surrogate (default "current") is another loss here, with the other sign on that token.
    logp_current = logp0.clone().requires_grad_(True)
    current, _ = scope_loss(logp_current, old, teacher, mask, correct, w_stu, w_tea, aggregation="authors",
                            clip_epsilon=0.2, dual_clip=3.0, mle_surrogate="logp")
    current.backward()
    assert current.item() != pytest.approx(reference.item(), rel=1e-3)
    assert logp_current.grad[1, 0].item() * n_all == pytest.approx(-0.05 * math.exp(-0.1), rel=1e-5)


def test_opd_advantages_agree_at_theta_old():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    results = {}
    for advantage in ("current", "old"):
        logp = old.clone().requires_grad_(True)
        loss, _ = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, clip_epsilon=0.2, dual_clip=3.0,
                             opd_advantage=advantage)
        loss.backward()
        results[advantage] = (loss.item(), logp.grad)
    assert results["current"][0] == pytest.approx(results["old"][0], rel=1e-6)
    torch.testing.assert_close(results["current"][1], results["old"][1])
    with pytest.raises(ValueError, match="opd_advantage"):
        scope_loss(old.clone(), old, teacher, mask, correct, w_stu, w_tea, opd_advantage="sampler")


def test_mle_logp_surrogate_is_the_authors_weighted_nll_at_any_theta():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    logp = (old + 0.4).requires_grad_(True)
    loss, metrics = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation="sum",
                               mle_surrogate="logp", clip_epsilon=0.2)
    loss.backward()
    grad_correct = torch.where(mask & correct[:, None], -w_stu[:, None].expand_as(old), 0.0)
    torch.testing.assert_close(torch.where(correct[:, None], logp.grad, 0.0), grad_correct)
    expect_mle = -(w_stu[:, None] * torch.where(mask & correct[:, None], logp.detach(), 0.0)).sum()
    assert metrics["loss/mle"] == pytest.approx(expect_mle.item(), rel=1e-6)


def test_token_weights_multiply_each_token_loss():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    weights = torch.rand(old.shape, generator=torch.Generator().manual_seed(3))
    logp = (old + 0.2).requires_grad_(True)
    loss, _ = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea, aggregation="sum", token_weights=weights)
    loss.backward()
    rho = math.exp(0.2)
    adv = torch.where(correct[:, None], w_stu[:, None], -w_tea[:, None] * (logp.detach() - torch.nan_to_num(teacher)))
    torch.testing.assert_close(logp.grad, torch.where(mask, -adv * rho * weights, 0.0))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_bf16_loss_gradient_close_to_fp32(aggregation):
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        logp = old.to(dtype).clone().requires_grad_(True)
        loss, _ = scope_loss(logp, old.to(dtype), teacher.to(dtype), mask, correct, w_stu, w_tea, aggregation=aggregation)
        assert loss.dtype == torch.float32
        loss.backward()
        assert logp.grad.dtype == dtype
        grads[dtype] = logp.grad.float()
    torch.testing.assert_close(grads[torch.bfloat16], grads[torch.float32], atol=5e-3, rtol=2e-2)


def test_opd_is_scope_loss_with_everything_on_the_teacher_path():
    """OPD = sampled-token reverse KL on every rollout, uniform weights, whatever the verifier says."""
    old, teacher, mask, _, _, _ = _loss_batch()
    teacher = torch.nan_to_num(teacher, nan=-1.0, neginf=-1.0)
    logp = old.clone().requires_grad_(True)
    correct, w_stu, w_tea = opd_weights(old.shape[0])
    loss, metrics = scope_loss(logp, old, teacher, mask, correct, w_stu, w_tea)
    loss.backward()
    reverse_kl = torch.where(mask, old - teacher, 0.0).sum() / mask.sum()
    assert loss.item() == pytest.approx(reverse_kl.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, torch.where(mask, old - teacher, 0.0) / mask.sum())
    assert metrics["frac_correct"] == 0.0 and metrics["loss/mle"] == 0.0


def test_loss_bad_inputs():
    old, teacher, mask, correct, w_stu, w_tea = _loss_batch()
    with pytest.raises(ValueError, match="aggregation"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, aggregation="mean")
    with pytest.raises(ValueError, match="mle_surrogate"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, mle_surrogate="nll")
    with pytest.raises(ValueError, match="clip_epsilon"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, clip_epsilon=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, dual_clip=0.5)
    with pytest.raises(ValueError, match="num_items"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, num_items=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="num_items"):
        scope_loss(old, old, teacher, mask, correct, w_stu, w_tea, num_items=float("nan"))
    with pytest.raises(ValueError, match="mask has shape"):
        scope_loss(old, old, teacher, mask[:, :3], correct, w_stu, w_tea)
    with pytest.raises(ValueError, match="empty batch"):
        scope_loss(old[:0], old[:0], teacher[:0], mask[:0], correct[:0], w_stu[:0], w_tea[:0])
    bad_teacher = teacher.clone()
    bad_teacher[4, 0] = NAN  # incorrect row, masked token -> used
    with pytest.raises(ValueError, match="teacher_logp is NaN/inf on masked tokens of incorrect rows 4"):
        scope_loss(old, old, bad_teacher, mask, correct, w_stu, w_tea)
    with pytest.raises(ValueError, match="teacher_logp is required"):
        scope_loss(old, old, None, mask, correct, w_stu, w_tea)
    bad_old = old.clone()
    bad_old[2, 1] = NAN
    with pytest.raises(ValueError, match="old_logp is NaN/inf on masked tokens of rows 2"):
        scope_loss(old, bad_old, teacher, mask, correct, w_stu, w_tea)
