"""The SCOPE maths: the one place where the paper's equations live.

Every trainer and integration (TRL, verl, the demo, the benchmarks) calls these
functions; nothing else in the project re-implements them. They are pure torch
over padded ``[B, T]`` tensors and a mask, with no trainer state and no I/O,
in the spirit of verl's ``core_algos.py``.

Equations refer to ``shared/SCOPE_METHOD.md`` section 2 (paper arXiv 2604.10688):

* eq. 3  sequence perplexity        -> :func:`sequence_mean_logp`  (PPL = exp(-mean_logp))
* eq. 4  student-guided weights     -> :func:`dual_path_weights`   (correct path)
* eq. 5  teacher-guided weights     -> :func:`dual_path_weights`   (incorrect path)
* eq. 6-7 MLE / OPD surrogates      -> :func:`scope_loss`

Edge-case decisions the paper leaves open (also listed in the README):

* A row with no response tokens has no perplexity: :func:`sequence_mean_logp`
  returns NaN for it, and :func:`dual_path_weights` raises if such a row is
  used, unless the caller marks it invalid (``valid=False``: weight 0 on both
  paths, excluded from its group's normalisation).
* A group whose rollouts are all correct (all incorrect) has only the
  student-guided (teacher-guided) path; the other path's weights are 0.
* A path with a single member gets weight 1 under both normalisations.
* Values that a path does not use are ignored, even NaN/inf (the teacher is
  usually not queried on correct rows). A NaN/inf on a row that *is* used raises
  ``ValueError`` naming the rows, rather than producing a silent wrong weight.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "AGGREGATIONS",
    "NORMALIZATIONS",
    "STUDENT_WEIGHTINGS",
    "TEACHER_WEIGHTINGS",
    "sequence_mean_logp",
    "dual_path_weights",
    "scope_loss",
    "opd_weights",
]

STUDENT_WEIGHTINGS = ("perplexity", "inverse", "uniform")
TEACHER_WEIGHTINGS = ("inverse_perplexity", "perplexity", "uniform")
NORMALIZATIONS = ("mean", "sum")
AGGREGATIONS = ("token-mean", "sum", "seq-mean-token-sum", "seq-mean-token-mean")

Normalization = Literal["mean", "sum"]
Aggregation = Literal["token-mean", "sum", "seq-mean-token-sum", "seq-mean-token-mean"]


def _row_list(rows: torch.Tensor, limit: int = 10) -> str:
    idx = rows.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f", ... ({len(idx)} rows)" if len(idx) > limit else "")


def _as_bool(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} must be boolean or 0/1, got non-finite values at rows {_row_list(~torch.isfinite(x))}")
    bad = (x != 0) & (x != 1)
    if bad.any():
        raise ValueError(f"{name} must be boolean or 0/1, got other values at rows {_row_list(bad)}")
    return x != 0


def sequence_mean_logp(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-prob over response tokens (paper eq. 3).

    ``PPL(y_i) = exp(-sequence_mean_logp(...)[i])``.

    Args:
        token_logp: ``[B, T]`` log-probabilities of the sampled tokens.
        mask: ``[B, T]`` bool or 0/1, true on response tokens (prompt and padding false).

    Returns:
        ``[B]`` float32 mean log-prob per row. A row with no response tokens is
        ``NaN`` (its perplexity is undefined; :func:`dual_path_weights` refuses
        to use it unless marked invalid). Masked positions may hold any value,
        NaN and -inf included: they are never read.
    """
    if token_logp.dim() != 2:
        raise ValueError(f"token_logp must be [B, T], got shape {tuple(token_logp.shape)}")
    if mask.shape != token_logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match token_logp shape {tuple(token_logp.shape)}")
    mask = _as_bool("mask", mask)
    logp = torch.where(mask, token_logp.float(), 0.0)
    n_tokens = mask.sum(dim=1)
    total = logp.sum(dim=1)
    return torch.where(n_tokens > 0, total / n_tokens.clamp(min=1), float("nan"))


def _segment_softmax(
    scores: torch.Tensor, member: torch.Tensor, segment: torch.Tensor, num_segments: int, normalization: str
) -> torch.Tensor:
    """Softmax of ``scores`` over the members of each segment; exactly 0 for non-members.

    Vectorised with scatter ops: one pass for the per-segment max (stability), one
    for the per-segment sum. ``normalization="mean"`` rescales so the weights of a
    segment's members sum to their count (mean weight 1, as the authors' code).
    """
    scores = scores.masked_fill(~member, float("-inf"))
    segment_max = scores.new_full((num_segments,), float("-inf")).scatter_reduce_(0, segment, scores, "amax")
    # A segment with no member has max -inf; clamping keeps its (unused) entries at exp(-inf) = 0, not NaN.
    exp = torch.exp(scores - segment_max.clamp(min=torch.finfo(scores.dtype).min)[segment])
    denom = scores.new_zeros(num_segments).index_add_(0, segment, exp).clamp(min=torch.finfo(scores.dtype).tiny)
    if normalization == "mean":
        count = scores.new_zeros(num_segments).index_add_(0, segment, member.to(scores.dtype))
        return exp * (count / denom)[segment]
    return exp * denom.reciprocal()[segment]


def dual_path_weights(
    group_ids: torch.Tensor,
    correct: torch.Tensor,
    student_mean_logp: torch.Tensor | None,
    teacher_mean_logp: torch.Tensor | None,
    *,
    tau: float = 1.0,
    normalization: Normalization = "mean",
    student_weighting: str = "perplexity",
    teacher_weighting: str = "inverse_perplexity",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-path adaptive weights (DPAW), paper eqs. 4-5, computed inside each prompt's group.

    Correct path (student-guided, eq. 4), softmax over a group's correct rows of
      * ``"perplexity"`` (paper):   ``-student_mean_logp / tau``  i.e. ``PPL_S^(1/tau)`` - hard-but-right paths weigh more;
      * ``"inverse"`` (authors' released script): ``+student_mean_logp / tau``;
      * ``"uniform"``: equal weights (ablation "w/o student-guided weight").

    Incorrect path (teacher-guided, eq. 5), softmax over a group's incorrect rows of
      * ``"inverse_perplexity"`` (paper): ``+teacher_mean_logp / tau`` i.e. ``PPL_T^(-1/tau)`` -
        errors the teacher can still follow weigh more;
      * ``"perplexity"``: ``-teacher_mean_logp / tau`` (the reversed ablation);
      * ``"uniform"``: equal weights (ablation "w/o teacher-guided weight").

    Args:
        group_ids: ``[B]`` integer prompt labels; rows in any order, groups of any size.
        correct: ``[B]`` bool or 0/1 verifier outcome.
        student_mean_logp: ``[B]`` from :func:`sequence_mean_logp` with the old (sampling)
            policy. Only read on correct rows, and only when ``student_weighting`` is not
            uniform (may be ``None`` then).
        teacher_mean_logp: ``[B]`` teacher mean log-prob. Only read on incorrect rows, and
            only when ``teacher_weighting`` is not uniform (may be ``None`` then).
        tau: weight temperature (paper default 1.0; C.2 sweeps 0.5/1/2).
        normalization: ``"mean"`` (default, authors' code): a path's weights in a group sum
            to its number of rows, so a lone row gets 1 and uniform weights are all 1 -
            the loss scale matches plain MLE/OPD. ``"sum"``: they sum to 1 (paper's equations).
        valid: optional ``[B]`` bool; invalid rows (e.g. empty completions, failed teacher
            scoring) get weight 0 on both paths and are left out of their group's
            normalisation.

    Returns:
        ``(student_weights, teacher_weights)``, float32 ``[B]``, detached. Student weights are
        exactly 0 on incorrect rows, teacher weights exactly 0 on correct rows.

    Raises:
        ValueError: shapes differ, batch empty, unknown option, non-positive ``tau``, or a NaN/inf
            in a value that is actually used (the message names the rows).
    """
    if student_weighting not in STUDENT_WEIGHTINGS:
        raise ValueError(f"student_weighting must be one of {STUDENT_WEIGHTINGS}, got {student_weighting!r}")
    if teacher_weighting not in TEACHER_WEIGHTINGS:
        raise ValueError(f"teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {teacher_weighting!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not (isinstance(tau, (int, float)) and tau > 0 and tau != float("inf")):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be [B], got shape {tuple(group_ids.shape)}")
    batch = group_ids.shape[0]
    if batch == 0:
        raise ValueError("dual_path_weights got an empty batch (B = 0)")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be integer labels, got dtype {group_ids.dtype}")
    named = {"correct": correct, "student_mean_logp": student_mean_logp, "teacher_mean_logp": teacher_mean_logp, "valid": valid}
    for name, x in named.items():
        if x is not None and tuple(x.shape) != (batch,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [B] = ({batch},) like group_ids")
    correct = _as_bool("correct", correct)
    valid = torch.ones_like(correct) if valid is None else _as_bool("valid", valid)

    def path_scores(values, member, weighting, sign, name):
        if weighting == "uniform":
            return torch.zeros(batch, dtype=torch.float32, device=group_ids.device)
        if values is None:
            raise ValueError(f"{name} is required when its weighting is {weighting!r}")
        values = values.detach().float()
        bad = member & ~torch.isfinite(values)
        if bad.any():
            raise ValueError(
                f"{name} is NaN/inf on rows {_row_list(bad)} that are used for weights; "
                "fix the scores or pass valid=False for those rows"
            )
        return values * (sign / tau)

    # eq. 4: softmax of -mean_logp_S / tau == PPL_S^(1/tau) normalised.
    student_sign = {"perplexity": -1.0, "inverse": 1.0, "uniform": 0.0}[student_weighting]
    # eq. 5: softmax of +mean_logp_T / tau == PPL_T^(-1/tau) normalised.
    teacher_sign = {"inverse_perplexity": 1.0, "perplexity": -1.0, "uniform": 0.0}[teacher_weighting]
    student_scores = path_scores(student_mean_logp, correct & valid, student_weighting, student_sign, "student_mean_logp")
    teacher_scores = path_scores(teacher_mean_logp, ~correct & valid, teacher_weighting, teacher_sign, "teacher_mean_logp")

    # One softmax over (prompt, path) segments: segment 2g is group g's correct path, 2g+1 its incorrect path.
    group_labels, group = torch.unique(group_ids, return_inverse=True)
    segment = group * 2 + (~correct).long()
    scores = torch.where(correct, student_scores, teacher_scores)
    weights = _segment_softmax(scores, valid, segment, 2 * group_labels.numel(), normalization)
    student_weights = torch.where(correct, weights, 0.0)
    teacher_weights = torch.where(correct, 0.0, weights)
    return student_weights, teacher_weights


def opd_weights(batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain on-policy distillation (OPD) expressed through :func:`scope_loss`'s inputs.

    OPD (paper section 4 baseline) puts every rollout on the teacher-guided path with
    weight 1 and nothing on the MLE path, whatever the verifier says. Returns
    ``(correct, student_weights, teacher_weights)``: all false, all 0, all 1.
    Not a second formula: the OPD loss is ``scope_loss`` with these inputs.
    """
    return (
        torch.zeros(batch_size, dtype=torch.bool, device=device),
        torch.zeros(batch_size, dtype=torch.float32, device=device),
        torch.ones(batch_size, dtype=torch.float32, device=device),
    )


def scope_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    mask: torch.Tensor,
    correct: torch.Tensor,
    student_weights: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    aggregation: Aggregation = "token-mean",
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCOPE surrogate objective (paper eqs. 6-7), to be minimised.

    Per response token, with ``rho = exp(logp - old_logp)``:

    * correct rows (MLE path, eq. 6):   ``-w_stu * rho``; at ``logp == old_logp`` its
      gradient is ``-w_stu * d logp`` (weighted maximum likelihood);
    * incorrect rows (OPD path, eq. 6): ``w_tea * rho * sg(logp - teacher_logp)``; the
      detached student-teacher log-ratio acts as a negative per-token advantage,
      so its gradient is ``w_tea * (logp - teacher_logp) * d logp``.

    Aggregation over the masked tokens:

    * ``"token-mean"`` (default, as the authors' code): sum / number of masked tokens;
    * ``"sum"``: the paper's token sums;
    * ``"seq-mean-token-sum"``: mean over rows of per-row sums;
    * ``"seq-mean-token-mean"``: mean over rows of per-row token means.

    The ``seq-mean`` modes average over rows that have at least one masked token.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (requires grad).
        old_logp: ``[B, T]`` log-probs under the sampling policy (detached internally).
        teacher_logp: ``[B, T]`` teacher log-probs; only read on incorrect rows' masked
            tokens (NaN/inf elsewhere are ignored). May be ``None`` if no row is incorrect.
        mask: ``[B, T]`` bool or 0/1 response-token mask.
        correct: ``[B]`` bool or 0/1 verifier outcome.
        student_weights, teacher_weights: ``[B]`` from :func:`dual_path_weights`.
        aggregation: one of :data:`AGGREGATIONS`.
        num_items: optional global denominator (masked tokens for ``token-mean``, non-empty
            rows for the ``seq-mean`` modes) so that the losses of micro-batches add up to
            the loss of the whole batch under gradient accumulation. Ignored for ``"sum"``.

    Returns:
        ``(loss, metrics)``: a scalar float32 tensor, and a dict of floats for logging:
        ``loss/mle`` and ``loss/opd`` (each path's share of ``loss``, they add up to it),
        ``opd/log_ratio_mean`` (token mean of ``logp - teacher_logp`` on incorrect rows, the
        sampled-token reverse KL estimate; NaN if none), ``frac_correct``, ``ratio/mean``
        (mean ``rho`` over masked tokens), ``num_tokens``.

    Raises:
        ValueError: shape mismatch, empty batch, unknown aggregation, or a NaN/inf
            in ``logp``/``old_logp``/``teacher_logp`` on a masked token that is used.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    batch, _ = logp.shape
    if batch == 0 or logp.shape[1] == 0:
        raise ValueError(f"scope_loss got an empty batch, logp shape {tuple(logp.shape)}")
    for name, x in {"old_logp": old_logp, "mask": mask, "teacher_logp": teacher_logp}.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(logp.shape)} like logp")
    for name, x in {"correct": correct, "student_weights": student_weights, "teacher_weights": teacher_weights}.items():
        if tuple(x.shape) != (batch,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [B] = ({batch},)")
    mask = _as_bool("mask", mask)
    correct = _as_bool("correct", correct)

    # bf16 inputs: compute in fp32 so exp/ratios do not lose precision; autograd casts back.
    logp32 = logp.float()
    old32 = old_logp.detach().float()
    incorrect_tokens = mask & ~correct[:, None]
    for name, x, where in (("logp", logp32.detach(), mask), ("old_logp", old32, mask)):
        bad = where & ~torch.isfinite(x)
        if bad.any():
            raise ValueError(f"{name} is NaN/inf on masked tokens of rows {_row_list(bad.any(dim=1))}")
    if incorrect_tokens.any():
        if teacher_logp is None:
            raise ValueError("teacher_logp is required: some rows are on the incorrect (OPD) path")
        teacher32 = teacher_logp.detach().float()
        bad = incorrect_tokens & ~torch.isfinite(teacher32)
        if bad.any():
            raise ValueError(f"teacher_logp is NaN/inf on masked tokens of incorrect rows {_row_list(bad.any(dim=1))}")
        teacher32 = torch.where(incorrect_tokens, teacher32, 0.0)
    else:
        teacher32 = torch.zeros_like(old32)

    # Masked positions may hold padding garbage (even -inf): neutralise before exp.
    log_ratio_old = torch.where(mask, logp32 - old32, 0.0)
    rho = torch.exp(log_ratio_old)
    w_stu = student_weights.detach().float()[:, None]
    w_tea = teacher_weights.detach().float()[:, None]
    student_teacher_log_ratio = torch.where(incorrect_tokens, logp32.detach() - teacher32, 0.0)
    mle_tokens = torch.where(mask & correct[:, None], -w_stu * rho, 0.0)
    opd_tokens = torch.where(incorrect_tokens, w_tea * rho * student_teacher_log_ratio, 0.0)

    tokens_per_row = mask.sum(dim=1)
    nonempty_rows = tokens_per_row > 0

    def aggregate(per_token: torch.Tensor) -> torch.Tensor:
        if aggregation == "sum":
            return per_token.sum()
        if aggregation == "token-mean":
            denom = num_items if num_items is not None else tokens_per_row.sum().clamp(min=1)
            return per_token.sum() / denom
        row = per_token.sum(dim=1)
        if aggregation == "seq-mean-token-mean":
            row = row / tokens_per_row.clamp(min=1)
        denom = num_items if num_items is not None else nonempty_rows.sum().clamp(min=1)
        return row.sum() / denom

    loss_mle = aggregate(mle_tokens)
    loss_opd = aggregate(opd_tokens)
    loss = loss_mle + loss_opd

    n_incorrect_tokens = incorrect_tokens.sum()
    n_tokens = tokens_per_row.sum()
    # One device->host sync for all logged values.
    values = torch.stack(
        [
            loss_mle.detach(),
            loss_opd.detach(),
            student_teacher_log_ratio.sum() / n_incorrect_tokens,  # NaN when no incorrect token
            correct.float().mean(),
            torch.where(mask, rho.detach(), 0.0).sum() / n_tokens.clamp(min=1),
            n_tokens.float(),
        ]
    ).tolist()
    names = ("loss/mle", "loss/opd", "opd/log_ratio_mean", "frac_correct", "ratio/mean", "num_tokens")
    metrics = dict(zip(names, values))
    return loss, metrics
