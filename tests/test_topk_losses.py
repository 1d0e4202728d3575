"""Top-k teacher losses on the OPD path (issue 20): references written again here, the K = V case, ties, masks."""

from __future__ import annotations

import pytest
import torch

from scope_opd.algorithms import student_tail_log_mass, topk_forward_kl, topk_reverse_kl

VOCAB = 11


def _reverse_reference(student_logits_s: torch.Tensor, teacher_logp_s: torch.Tensor) -> torch.Tensor:
    """KL(p~ || q~) per position, from probabilities in float64 (renormalise by dividing by the sum)."""
    p = student_logits_s.double().exp()
    p = p / p.sum(-1, keepdim=True)
    q = teacher_logp_s.double().exp()
    q = q / q.sum(-1, keepdim=True)
    return (p * (p / q).log()).sum(-1)


def _forward_reference(student_logp_s: torch.Tensor, teacher_logp_s: torch.Tensor) -> torch.Tensor:
    """KL over K + 1 buckets (top-k and the rest), from probabilities in float64, no clamp (tails are not tiny here)."""
    p = student_logp_s.double().exp()
    q = teacher_logp_s.double().exp()
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    return (q * (q / p).log()).sum(-1) + q_tail * (q_tail / p_tail).log()


def _setup(seed=0, batch=3, length=5, k=4, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    student_logits = (2 * torch.randn(batch, length, vocab, generator=generator)).requires_grad_()
    teacher_logp = torch.log_softmax(2 * torch.randn(batch, length, vocab, generator=generator), dim=-1)
    top_logp, top_ids = teacher_logp.topk(k, dim=-1)
    return student_logits, teacher_logp, top_logp, top_ids


def test_topk_reverse_matches_renormalised_reference_value_and_gradient():
    logits, _, top_logp, top_ids = _setup()
    mask = torch.ones(3, 5, dtype=torch.bool)
    ours = topk_reverse_kl(logits.gather(-1, top_ids), top_logp, mask, teacher_topk_ids=top_ids)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    reference = _reverse_reference(logits.gather(-1, top_ids), top_logp)
    (grad_reference,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours.double(), grad_reference.double(), atol=1e-5, rtol=1e-5)
    # The documented gradient: p~ (log p~ - log q~ - loss) on the top-k, nothing outside it.
    p = torch.softmax(logits.detach().gather(-1, top_ids), -1)
    q = torch.softmax(top_logp, -1)
    expected = torch.zeros_like(logits).scatter(-1, top_ids, p * (p.log() - q.log() - ours.detach()[..., None]))
    torch.testing.assert_close(grad_ours, expected, atol=1e-5, rtol=1e-5)


def test_topk_forward_matches_tail_bucket_reference_value_and_gradient():
    logits, _, top_logp, top_ids = _setup(seed=1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    lse = torch.logsumexp(logits, dim=-1)
    ours = topk_forward_kl(logits.gather(-1, top_ids), lse, top_logp, mask, teacher_topk_ids=top_ids)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    reference = _forward_reference(torch.log_softmax(logits.double(), -1).gather(-1, top_ids), top_logp)
    (grad_reference,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours.double(), grad_reference.double(), atol=1e-5, rtol=1e-5)
    # The documented gradient: softmax(z) - target, the teacher's tail spread like the student's tail.
    p = torch.softmax(logits.detach().double(), -1)
    on_topk = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top_ids, True)
    p_tail = torch.where(on_topk, 0.0, p).sum(-1, keepdim=True)
    q_tail = 1 - top_logp.double().exp().sum(-1, keepdim=True)
    target = torch.where(on_topk, torch.zeros_like(p).scatter(-1, top_ids, top_logp.double().exp()), p * q_tail / p_tail)
    torch.testing.assert_close(grad_ours.double(), p - target, atol=1e-5, rtol=1e-5)
    assert (ours >= -1e-6).all()


@pytest.mark.parametrize("loss", ["topk_reverse", "topk_forward"])
def test_k_equal_to_vocabulary_is_the_full_vocabulary_kl_value_and_gradient(loss):
    logits, teacher_logp, top_logp, top_ids = _setup(seed=2, k=VOCAB)
    mask = torch.ones(3, 5, dtype=torch.bool)
    if loss == "topk_reverse":
        ours = topk_reverse_kl(logits.gather(-1, top_ids), top_logp, mask, teacher_topk_ids=top_ids)
        student_logp = torch.log_softmax(logits.double(), -1)
        full = (student_logp.exp() * (student_logp - teacher_logp.double())).sum(-1)  # KL(pi_theta || pi_T)
    else:
        ours = topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), top_logp, mask, teacher_topk_ids=top_ids)
        student_logp = torch.log_softmax(logits.double(), -1)
        full = (teacher_logp.double().exp() * (teacher_logp.double() - student_logp)).sum(-1)  # KL(pi_T || pi_theta)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    (grad_full,) = torch.autograd.grad(full.sum(), logits)
    torch.testing.assert_close(ours.double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours.double(), grad_full.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["topk_reverse", "topk_forward"])
def test_ties_in_the_teacher_top_k(loss):
    """Tied teacher log-probs (inside the top-k and at its boundary): any order and any tied pick is scored as given."""
    torch.manual_seed(3)
    logits = torch.randn(1, 2, VOCAB, requires_grad=True)
    # Probabilities .3, .2, .2, .2 (ids 1, 2, 3 tie; with K = 3 one of them is left out) and the rest spread.
    probs = torch.tensor([0.3, 0.2, 0.2, 0.2] + [0.1 / (VOCAB - 4)] * (VOCAB - 4))
    teacher_logp = probs.log().expand(1, 2, VOCAB)
    picks = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 3]), torch.tensor([3, 1, 0])]
    values = []
    for ids in picks:
        top_ids = ids.expand(1, 2, 3)
        top_logp = teacher_logp.gather(-1, top_ids)
        mask = torch.ones(1, 2, dtype=torch.bool)
        if loss == "topk_reverse":
            ours = topk_reverse_kl(logits.gather(-1, top_ids), top_logp, mask, teacher_topk_ids=top_ids)
            reference = _reverse_reference(logits.gather(-1, top_ids), top_logp)
        else:
            ours = topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), top_logp, mask, teacher_topk_ids=top_ids)
            reference = _forward_reference(torch.log_softmax(logits.double(), -1).gather(-1, top_ids), top_logp)
        torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-5)
        values.append(ours.detach())
    # The same set in another order gives the same loss: only the set of ids matters.
    permuted = torch.tensor([2, 0, 1]).expand(1, 2, 3)
    mask = torch.ones(1, 2, dtype=torch.bool)
    if loss == "topk_reverse":
        again = topk_reverse_kl(logits.gather(-1, permuted), teacher_logp.gather(-1, permuted), mask)
    else:
        again = topk_forward_kl(logits.gather(-1, permuted), torch.logsumexp(logits, -1), teacher_logp.gather(-1, permuted), mask)
    torch.testing.assert_close(again.detach(), values[0])
    # A repeated id is not a tie: it would count one token's mass twice.
    repeated = torch.tensor([0, 1, 1]).expand(1, 2, 3)
    with pytest.raises(ValueError, match="teacher_topk_ids repeats a token id .* rows 0"):
        if loss == "topk_reverse":
            topk_reverse_kl(logits.gather(-1, repeated), teacher_logp.gather(-1, repeated), torch.ones(1, 2), teacher_topk_ids=repeated)
        else:
            topk_forward_kl(
                logits.gather(-1, repeated), torch.logsumexp(logits, -1), teacher_logp.gather(-1, repeated), torch.ones(1, 2),
                teacher_topk_ids=repeated,
            )


@pytest.mark.parametrize("loss", ["topk_reverse", "topk_forward"])
def test_masked_positions_contribute_nothing_even_when_they_hold_nan(loss):
    logits, _, top_logp, top_ids = _setup(seed=4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    student = logits.gather(-1, top_ids)
    lse = torch.logsumexp(logits, -1)
    # Padding garbage on masked positions: NaN student values, +/-inf teacher values, a NaN logsumexp.
    student_garbage = torch.where(mask[..., None], student, float("nan"))
    teacher_garbage = torch.where(mask[..., None], top_logp, float("inf"))
    lse_garbage = torch.where(mask, lse, float("nan"))
    if loss == "topk_reverse":
        ours = topk_reverse_kl(student_garbage, teacher_garbage, mask)
        clean = topk_reverse_kl(student, top_logp, torch.ones_like(mask))
    else:
        ours = topk_forward_kl(student_garbage, lse_garbage, teacher_garbage, mask)
        clean = topk_forward_kl(student, lse, top_logp, torch.ones_like(mask))
    assert (ours[~mask] == 0).all()
    torch.testing.assert_close(ours[mask], clean[mask])
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("loss", ["topk_reverse", "topk_forward"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_teacher_values_on_used_positions_are_refused_naming_the_row(loss, bad):
    """As scope_loss refuses a NaN/inf teacher_logp on an incorrect row's token (never a silent wrong loss)."""
    logits, _, top_logp, top_ids = _setup(seed=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    poisoned = top_logp.clone()
    poisoned[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"teacher_topk_logp is NaN/inf on masked tokens of rows 1"):
        if loss == "topk_reverse":
            topk_reverse_kl(logits.gather(-1, top_ids), poisoned, mask)
        else:
            topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), poisoned, mask)


def test_forward_refuses_teacher_logits_passed_for_log_probs():
    logits, _, top_logp, top_ids = _setup(seed=6)
    mask = torch.ones(3, 5, dtype=torch.bool)
    teacher_logits = top_logp + 5.0  # un-normalised: the top-k "probabilities" add up to more than 1
    with pytest.raises(ValueError, match="adds up to more than probability 1"):
        topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), teacher_logits, mask)


def test_shape_mismatch_is_named():
    logits, _, top_logp, top_ids = _setup()
    with pytest.raises(ValueError, match="teacher_topk_logp has shape"):
        topk_reverse_kl(logits.gather(-1, top_ids), top_logp[..., :2], torch.ones(3, 5))
    with pytest.raises(ValueError, match="student_logsumexp has shape"):
        topk_forward_kl(logits.gather(-1, top_ids), torch.zeros(3), top_logp, torch.ones(3, 5))


@pytest.mark.parametrize("gap", [10.0, 14.0, 18.0, 25.0])
def test_topk_forward_with_a_tiny_student_tail_keeps_its_gradient(gap):
    """The student's top-k holds all but ~45 e^-gap of its mass (1e-3 .. 6e-10), the teacher's tail holds 1e-3: the tail
    gradient pulls mass back to the tail. From the full logits (student_tail_log_mass) it matches a float64 reference;
    1 - sum_k p_k in float32 would round the tail to the 1e-7 clamp and push the wrong way."""
    vocab, k = 50, 5
    logits = torch.zeros(2, 1, vocab)
    logits[..., :k] = gap
    logits[1, 0, k:] = torch.linspace(-3.0, 3.0, vocab - k)  # a second position, uneven tail
    logits[1, 0, :k] += gap
    logits.requires_grad_(True)
    top_ids = torch.arange(k).expand(2, 1, k)
    teacher = torch.full((2, 1, k), torch.tensor(0.999 / k).log().item())
    mask = torch.ones(2, 1, dtype=torch.bool)
    ours = topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), teacher, mask,
                           teacher_topk_ids=top_ids, student_tail_logp=student_tail_log_mass(logits, top_ids))
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)

    # float64 reference: the tail bucket from the log-softmax outside the top-k, written out again.
    z = logits.detach().double().requires_grad_(True)
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    s, s_tail = logp[..., :k], torch.logsumexp(logp[..., k:], -1)
    t = teacher.double()
    t_tail = torch.log1p(-t.exp().sum(-1))
    reference = (t.exp() * (t - s)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    (grad_reference,) = torch.autograd.grad(reference.sum(), z)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-6)
    # on the top-k, float32 rounding of p_j - q_j (~2e-4) ; on the tail, each logit's own small gradient to 0.1%
    torch.testing.assert_close(grad_ours[..., :k].double(), grad_reference[..., :k], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grad_ours[..., k:].double(), grad_reference[..., k:], rtol=1e-3, atol=1e-12)
    # the tail logits' total gradient is s_tail - t_tail < 0: it pulls mass back to the tail
    tail_total = grad_ours[..., k:].sum(-1).double()
    torch.testing.assert_close(tail_total, s_tail.detach().exp() - t_tail.exp(), rtol=1e-3, atol=1e-12)
    assert (tail_total < -5e-4).all(), tail_total


def test_student_tail_log_mass_against_float64_and_an_empty_tail():
    torch.manual_seed(4)
    logits = (3 * torch.randn(2, 3, VOCAB)).requires_grad_(True)
    top_ids = torch.stack([torch.randperm(VOCAB)[:4] for _ in range(6)]).reshape(2, 3, 4)
    ours = student_tail_log_mass(logits, top_ids)
    probs = torch.softmax(logits.detach().double(), -1)
    outside = torch.ones_like(probs, dtype=torch.bool).scatter(-1, top_ids, False)
    torch.testing.assert_close(ours.detach().double(), torch.where(outside, probs, 0.0).sum(-1).log(), rtol=1e-5, atol=1e-6)
    # K = V: nothing outside, -inf, and a zero gradient (not NaN) through it
    everything = torch.arange(VOCAB).expand(2, 3, VOCAB)
    empty = student_tail_log_mass(logits, everything)
    assert torch.isneginf(empty).all()
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(empty), empty, 0.0).sum(), logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_k_equal_to_vocabulary_with_the_exact_student_tail_is_the_full_forward_kl():
    logits, teacher_logp, top_logp, top_ids = _setup(seed=2, k=VOCAB)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    ours = topk_forward_kl(logits.gather(-1, top_ids), torch.logsumexp(logits, -1), top_logp, mask,
                           teacher_topk_ids=top_ids, student_tail_logp=student_tail_log_mass(logits, top_ids))
    student_logp = torch.log_softmax(logits.double(), -1)
    full = (teacher_logp.double().exp() * (teacher_logp.double() - student_logp)).sum(-1) * mask
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    (grad_full,) = torch.autograd.grad(full.sum(), logits)
    torch.testing.assert_close(ours.double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours.double(), grad_full.double(), atol=1e-5, rtol=1e-5)
