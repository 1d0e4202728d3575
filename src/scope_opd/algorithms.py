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

import math
from typing import Literal

import torch

__all__ = [
    "AGGREGATIONS",
    "NORMALIZATIONS",
    "OPD_ADVANTAGES",
    "STUDENT_WEIGHTINGS",
    "TEACHER_WEIGHTINGS",
    "sequence_mean_logp",
    "dual_path_weights",
    "scope_loss",
    "loss_denominators",
    "opd_weights",
]

STUDENT_WEIGHTINGS = ("perplexity", "inverse", "uniform")
TEACHER_WEIGHTINGS = ("inverse_perplexity", "perplexity", "uniform")
NORMALIZATIONS = ("mean", "sum")
AGGREGATIONS = ("authors", "path-token-mean", "token-mean", "sum", "seq-mean-token-sum", "seq-mean-token-mean")
MLE_SURROGATES = ("ratio", "logp")
OPD_ADVANTAGES = ("current", "old")

Normalization = Literal["mean", "sum"]
Aggregation = Literal["authors", "path-token-mean", "token-mean", "sum", "seq-mean-token-sum", "seq-mean-token-mean"]


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


def loss_denominators(mask: torch.Tensor, correct: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """The ``(mle, opd)`` denominators of ``aggregation`` over one (micro-)batch, as ``[2]`` float32.

    :func:`scope_loss` divides each path's summed token losses by its denominator:

    ========================  ==========================================  ==========================================
    aggregation               MLE path (correct rows) divided by          OPD path (incorrect rows) divided by
    ========================  ==========================================  ==========================================
    ``"authors"``             masked tokens of correct rows               all masked tokens
    ``"path-token-mean"``     masked tokens of correct rows               masked tokens of incorrect rows
    ``"token-mean"``          all masked tokens                           all masked tokens
    ``"seq-mean-token-*"``    rows with at least one masked token         the same
    ``"sum"``                 nothing (ones; ``num_items`` is ignored)    nothing
    ========================  ==========================================  ==========================================

    Counts are additive: sum them over the micro-batches of an optimiser step and over processes
    to get the global denominators that make micro-batch losses add up to the batch loss, and pass
    them as ``scope_loss(..., num_items=...)``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = _as_bool("mask", mask)
    correct = _as_bool("correct", correct)
    if mask.dim() != 2 or tuple(correct.shape) != (mask.shape[0],):
        raise ValueError(f"mask must be [B, T] and correct [B], got {tuple(mask.shape)} and {tuple(correct.shape)}")
    if aggregation == "sum":
        return torch.ones(2, dtype=torch.float32, device=mask.device)
    if aggregation.startswith("seq-mean"):
        rows = mask.any(dim=1).sum().float()
        return torch.stack([rows, rows])
    tokens_per_row = mask.sum(dim=1).float()
    all_tokens = tokens_per_row.sum()
    correct_tokens = (tokens_per_row * correct).sum()
    if aggregation == "token-mean":
        return torch.stack([all_tokens, all_tokens])
    if aggregation == "authors":
        return torch.stack([correct_tokens, all_tokens])
    return torch.stack([correct_tokens, all_tokens - correct_tokens])  # path-token-mean


def _clipped_token_loss(
    rho: torch.Tensor,
    advantage: torch.Tensor,
    clip_epsilon: float | None,
    clip_epsilon_high: float | None,
    dual_clip: float | None,
) -> torch.Tensor:
    """PPO token loss ``-rho * A``, optionally clipped (PPO) and dual-clipped on ``A < 0`` (Ye et al. 2020).

    Unclipped it is exactly the paper's surrogate. Clipped: ``max(-rho A, -clip(rho, 1-eps, 1+eps_high) A)``;
    dual clip bounds the loss of negative-advantage tokens by ``-dual_clip * A`` (``dual_clip > 1``).
    """
    loss = -rho * advantage
    if clip_epsilon is not None:
        high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
        clipped = -torch.clamp(rho, 1.0 - clip_epsilon, 1.0 + high) * advantage
        loss = torch.maximum(loss, clipped)
    if dual_clip is not None:
        loss = torch.where(advantage < 0, torch.minimum(loss, -dual_clip * advantage), loss)
    return loss


def scope_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    mask: torch.Tensor,
    correct: torch.Tensor,
    student_weights: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    aggregation: Aggregation = "authors",
    num_items: float | torch.Tensor | tuple[float, float] | None = None,
    mle_surrogate: str = "ratio",
    clip_epsilon: float | None = None,
    clip_epsilon_high: float | None = None,
    dual_clip: float | None = None,
    token_weights: torch.Tensor | None = None,
    opd_advantage: str = "current",
    opd_token_loss: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCOPE surrogate objective (paper eqs. 6-7), to be minimised.

    Per response token, with ``rho = exp(logp - old_logp)``:

    * correct rows (MLE path, eq. 6):   ``-w_stu * rho``; at ``logp == old_logp`` its
      gradient is ``-w_stu * d logp`` (weighted maximum likelihood). With
      ``mle_surrogate="logp"`` it is ``-w_stu * logp`` instead (the authors' code: no ratio;
      the same gradient at ``theta_old``, ``-w_stu * d logp`` at any theta);
    * incorrect rows (OPD path, eq. 6): ``w_tea * rho * sg(logp - teacher_logp)``; the
      detached student-teacher log-ratio acts as a negative per-token advantage
      ``A = -w_tea * sg(logp - teacher_logp)``, so its gradient is ``w_tea * (logp - teacher_logp) * d logp``.
      That is ``opd_advantage="current"`` (default, the paper's surrogate): the advantage follows the
      current parameters. ``opd_advantage="old"`` is the authors' code instead: the advantage is fixed
      per token from the sampling policy, ``A = -w_tea * (old_logp - teacher_logp)``, and the ratio
      alone moves. Both agree at ``theta_old``; on a later pass over reused rollouts they differ, and
      on a token where ``logp`` and ``old_logp`` lie on opposite sides of ``teacher_logp`` the
      gradient has the opposite sign.

    Both are the PPO token loss ``-rho * A`` (``A = w_stu`` on the MLE path). Off-policy safety
    (rho far from 1 when a generation batch is reused): ``clip_epsilon`` applies PPO's clip
    ``max(-rho A, -clip(rho, 1 - eps, 1 + eps_high) A)`` to every token that has a ratio, and
    ``dual_clip`` (> 1) bounds negative-advantage tokens' loss by ``-dual_clip * A``; the
    authors' setting is ``clip_epsilon=0.2, dual_clip=3, mle_surrogate="logp", opd_advantage="old"``. Both off
    (default) is the paper's surrogate. ``token_weights`` (``[B, T]``, detached) multiplies
    every token's loss, e.g. TRL's vLLM importance-sampling correction.

    Aggregation: each path's token sum is divided by its own denominator (see
    :func:`loss_denominators` for the table): ``"authors"`` (default, the authors' verl code:
    MLE over the correct rows' tokens, OPD over all tokens), ``"path-token-mean"``,
    ``"token-mean"``, ``"sum"`` (the paper's token sums), ``"seq-mean-token-sum"``,
    ``"seq-mean-token-mean"``. A path with no tokens contributes exactly 0.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the sampled tokens (requires grad).
        old_logp: ``[B, T]`` log-probs under the sampling policy (detached internally).
        teacher_logp: ``[B, T]`` teacher log-probs; only read on incorrect rows' masked
            tokens (NaN/inf elsewhere are ignored). May be ``None`` if no row is incorrect.
        mask: ``[B, T]`` bool or 0/1 response-token mask.
        correct: ``[B]`` bool or 0/1 verifier outcome.
        student_weights, teacher_weights: ``[B]`` from :func:`dual_path_weights`.
        aggregation: one of :data:`AGGREGATIONS`.
        num_items: optional global denominators: a number for both paths, or ``(mle, opd)``
            (a ``[2]`` tensor or pair), e.g. :func:`loss_denominators` summed over the micro-batches
            of an optimiser step and over processes, so that micro-batch losses add up to the
            loss of the whole batch. Defaults to this batch's own :func:`loss_denominators`.
            Ignored for ``"sum"``.
        opd_advantage: ``"current"`` (default, paper) or ``"old"`` (authors' code), see above.
        opd_token_loss: optional ``[B, T]`` per-token OPD loss that replaces the sampled-token surrogate
            on incorrect rows (``opd_loss="topk_*"``: :func:`topk_opd_token_loss`); each token's loss is
            ``w_tea * opd_token_loss`` (times ``token_weights``), aggregated as above. A divergence has no
            importance ratio, so it refuses ``clip_epsilon`` / ``dual_clip``; ``teacher_logp`` is still
            read for the logged ``opd/log_ratio_mean``.

    Returns:
        ``(loss, metrics)``: a scalar float32 tensor, and a dict of floats for logging:
        ``loss/mle`` and ``loss/opd`` (each path's share of ``loss``, they add up to it),
        ``opd/log_ratio_mean`` (token mean of ``logp - teacher_logp`` on incorrect rows, the
        sampled-token reverse KL estimate; NaN if none), ``frac_correct``, ``ratio/mean``
        (mean ``rho`` over masked tokens), ``clip/frac`` (fraction of masked tokens whose loss
        the clipping changed), ``num_tokens``.

    Raises:
        ValueError: shape mismatch, empty batch, unknown option, or a NaN/inf
            in ``logp``/``old_logp``/``teacher_logp`` on a masked token that is used.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if mle_surrogate not in MLE_SURROGATES:
        raise ValueError(f"mle_surrogate must be one of {MLE_SURROGATES}, got {mle_surrogate!r}")
    if clip_epsilon is not None and not (0 < clip_epsilon < 1):
        raise ValueError(f"clip_epsilon must be in (0, 1), got {clip_epsilon!r}")
    if clip_epsilon_high is not None and (clip_epsilon is None or not clip_epsilon_high > 0):
        raise ValueError(f"clip_epsilon_high needs clip_epsilon and must be > 0, got {clip_epsilon_high!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    if opd_advantage not in OPD_ADVANTAGES:
        raise ValueError(f"opd_advantage must be one of {OPD_ADVANTAGES}, got {opd_advantage!r}")
    if opd_token_loss is not None and (clip_epsilon is not None or dual_clip is not None):
        raise ValueError("opd_token_loss (a top-k divergence per token) has no importance ratio to clip: "
                         "clip_epsilon / dual_clip apply only to the sampled-token surrogate")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    batch, _ = logp.shape
    if batch == 0 or logp.shape[1] == 0:
        raise ValueError(f"scope_loss got an empty batch, logp shape {tuple(logp.shape)}")
    shaped = {"old_logp": old_logp, "mask": mask, "teacher_logp": teacher_logp, "token_weights": token_weights,
              "opd_token_loss": opd_token_loss}
    for name, x in shaped.items():
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
    correct_tokens = mask & correct[:, None]
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
    if token_weights is not None:
        token_weights = token_weights.detach().float()
        bad = mask & ~torch.isfinite(token_weights)
        if bad.any():
            raise ValueError(f"token_weights is NaN/inf on masked tokens of rows {_row_list(bad.any(dim=1))}")

    # Masked positions may hold padding garbage (even -inf): neutralise before exp.
    log_ratio_old = torch.where(mask, logp32 - old32, 0.0)
    rho = torch.exp(log_ratio_old)
    w_stu = student_weights.detach().float()[:, None]
    w_tea = teacher_weights.detach().float()[:, None]
    # Logged at the current parameters whatever the advantage uses (the sampled-token reverse KL now).
    student_teacher_log_ratio = torch.where(incorrect_tokens, logp32.detach() - teacher32, 0.0)
    advantage_log_ratio = (
        student_teacher_log_ratio if opd_advantage == "current" else torch.where(incorrect_tokens, old32 - teacher32, 0.0)
    )
    # Per-token advantages: +w_stu on the MLE path, -w_tea * (log-ratio to the teacher) on the OPD path,
    # the student side taken at the current parameters ("current", detached) or the sampling policy ("old").
    advantage = torch.where(correct[:, None], w_stu.expand_as(rho), -w_tea * advantage_log_ratio)
    token_loss = _clipped_token_loss(rho, advantage, clip_epsilon, clip_epsilon_high, dual_clip)
    clipped = mask & (token_loss.detach() != (-rho * advantage).detach())
    if opd_token_loss is not None:
        # The top-k options: the per-token divergence, weighted by the row's teacher weight, replaces the
        # sampled-token surrogate on the OPD path (its tokens were never clipped: clipping is refused above).
        divergence = opd_token_loss.float()
        bad = incorrect_tokens & ~torch.isfinite(divergence.detach())
        if bad.any():
            raise ValueError(f"opd_token_loss is NaN/inf on masked tokens of incorrect rows {_row_list(bad.any(dim=1))}")
        token_loss = torch.where(incorrect_tokens, w_tea * torch.where(incorrect_tokens, divergence, 0.0), token_loss)
    if mle_surrogate == "logp":
        # The authors' MLE path has no ratio, so nothing to clip there.
        token_loss = torch.where(correct[:, None], -w_stu * torch.where(mask, logp32, 0.0), token_loss)
        clipped = clipped & ~correct[:, None]
    if token_weights is not None:
        token_loss = token_loss * torch.where(mask, token_weights, 0.0)
    mle_tokens = torch.where(correct_tokens, token_loss, 0.0)
    opd_tokens = torch.where(incorrect_tokens, token_loss, 0.0)

    if num_items is None:
        denominators = loss_denominators(mask, correct, aggregation)
    elif isinstance(num_items, (int, float)) or (torch.is_tensor(num_items) and num_items.numel() == 1):
        denominators = torch.as_tensor(num_items, dtype=torch.float32, device=logp.device).reshape(1).expand(2)
    else:
        denominators = torch.as_tensor(num_items, dtype=torch.float32, device=logp.device).reshape(-1)
        if denominators.numel() != 2:
            raise ValueError(f"num_items must be a number or an (mle, opd) pair, got {num_items!r}")
    denominators = denominators.to(logp.device, torch.float32)
    if not torch.isfinite(denominators).all() or (denominators < 0).any():
        raise ValueError(f"num_items must be finite and >= 0, got {denominators.tolist()}")

    tokens_per_row = mask.sum(dim=1)

    def aggregate(per_token: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        if aggregation == "sum":
            return per_token.sum()
        if aggregation == "seq-mean-token-mean":
            total = (per_token.sum(dim=1) / tokens_per_row.clamp(min=1)).sum()
        else:
            total = per_token.sum()
        # An empty path has a zero sum and may have a zero denominator: it contributes exactly 0.
        return torch.where(denominator > 0, total / denominator.clamp(min=torch.finfo(torch.float32).tiny), 0.0 * total)

    loss_mle = aggregate(mle_tokens, denominators[0])
    loss_opd = aggregate(opd_tokens, denominators[1])
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
            clipped.sum() / n_tokens.clamp(min=1),
            n_tokens.float(),
        ]
    ).tolist()
    names = ("loss/mle", "loss/opd", "opd/log_ratio_mean", "frac_correct", "ratio/mean", "clip/frac", "num_tokens")
    metrics = dict(zip(names, values))
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Top-k teacher distributions on the OPD (incorrect) path: issue 20.
#
# The paper's OPD path (eq. 6, :func:`scope_loss`) uses the sampled token's log-ratio only. These
# per-token divergences instead compare the student with the teacher's top-k distribution at each
# position. They return a per-token loss ``[B, T]``; weighting by SCOPE's teacher weight (eq. 5)
# and the aggregation are the caller's, exactly as on the sampled-token path.
# ---------------------------------------------------------------------------------------------

OPD_LOSSES = ("sampled", "topk_reverse", "topk_forward")

# log of the largest top-k mass a tail bucket accepts, TRL's clamp (``add_tail_bucket``): the tail
# holds at least ~1e-7, so its log stays finite when the top-k covers (nearly) the whole vocabulary.
_TAIL_LOG_MASS_MAX = -1e-7
# A teacher top-k whose log total probability exceeds this (mass > ~1.001) is not a set of log-probs.
_TOPK_LOG_MASS_TOLERANCE = 1e-3


def _check_topk_inputs(
    student_topk_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    teacher_topk_ids: torch.Tensor | None,
    mask: torch.Tensor,
    student_logsumexp: torch.Tensor | None,
) -> torch.Tensor:
    """Shared shape / finiteness / duplicate-id checks of the top-k losses; returns ``mask`` as bool."""
    if student_topk_logits.dim() != 3:
        raise ValueError(f"student_topk_logits must be [B, T, K], got shape {tuple(student_topk_logits.shape)}")
    batch, length, k = student_topk_logits.shape
    if k == 0:
        raise ValueError("the top-k losses need K >= 1 teacher tokens per position, got K = 0")
    if teacher_topk_logp.shape != student_topk_logits.shape:
        raise ValueError(
            f"teacher_topk_logp has shape {tuple(teacher_topk_logp.shape)}, expected {tuple(student_topk_logits.shape)} "
            "like student_topk_logits"
        )
    if teacher_topk_ids is not None and teacher_topk_ids.shape != student_topk_logits.shape:
        raise ValueError(f"teacher_topk_ids has shape {tuple(teacher_topk_ids.shape)}, expected {tuple(student_topk_logits.shape)}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [B, T] = ({batch}, {length})")
    if student_logsumexp is not None and tuple(student_logsumexp.shape) != (batch, length):
        raise ValueError(f"student_logsumexp has shape {tuple(student_logsumexp.shape)}, expected [B, T] = ({batch}, {length})")
    mask = _as_bool("mask", mask)
    checked = {"student_topk_logits": student_topk_logits.detach(), "teacher_topk_logp": teacher_topk_logp.detach()}
    if student_logsumexp is not None:
        checked["student_logsumexp"] = student_logsumexp.detach()[..., None]
    for name, x in checked.items():
        bad = mask & ~torch.isfinite(x).all(dim=-1)
        if bad.any():
            raise ValueError(f"{name} is NaN/inf on masked tokens of rows {_row_list(bad.any(dim=1))}")
    if teacher_topk_ids is not None and k > 1:
        # A repeated id counts one token's mass twice: a parsing bug upstream, never a tie.
        ordered = teacher_topk_ids.sort(dim=-1).values
        repeated = mask & (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        if repeated.any():
            raise ValueError(f"teacher_topk_ids repeats a token id at a position of rows {_row_list(repeated.any(dim=1))}")
    return mask


def topk_reverse_kl(
    student_topk_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_topk_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token reverse KL on the teacher's top-k, both renormalised there (``opd_loss="topk_reverse"``).

    The authors' release option (``DISTILL_SIGNAL_IN_LOSS=True`` with the top-k type,
    ``shared/SCOPE_METHOD.md`` section 9). At each position, with ``S`` the teacher's top-k ids,
    ``z`` the student's logits and ``t`` the teacher's log-probs there::

        p~ = softmax(z[S])          (student renormalised on S)
        q~ = softmax(t[S])          (teacher renormalised on S)
        loss = KL(p~ || q~) = sum_{k in S} p~_k (log p~_k - log q~_k)

    The student's full logsumexp cancels in the renormalisation, so it is not an input; logits or
    log-probs gathered at ``S`` give the same value. Both sides at the same temperature is the
    caller's choice (the release: student at the rollout temperature, teacher at 1).

    Gradient (the teacher is detached): ``d loss / d z_j = p~_j (log p~_j - log q~_j - loss)`` for
    ``j`` in ``S``, and 0 for every token outside ``S``: the student is never pushed on tokens the
    teacher's top-k does not list. When ``S`` is the whole vocabulary (``K = V``), ``p~`` and ``q~`` are
    the full distributions and value and gradient are those of the full-vocabulary reverse KL
    ``KL(pi_theta || pi_T)``.

    Args:
        student_topk_logits: ``[B, T, K]`` student logits (or log-probs) at the teacher's top-k ids,
            requires grad.
        teacher_topk_logp: ``[B, T, K]`` the teacher's log-probs (or logits) of its top-k tokens;
            detached internally.
        mask: ``[B, T]`` bool or 0/1: the positions that carry a loss (e.g. incorrect rows' response tokens).
        teacher_topk_ids: optional ``[B, T, K]`` ids, only checked for repeats (a repeated id would
            count one token twice; tied log-probs on distinct ids are fine).

    Returns:
        ``[B, T]`` float32 per-token loss (>= 0), exactly 0 at masked-out positions, whose values
        (even NaN/inf) are never read.

    Raises:
        ValueError: shapes, ``K = 0``, a NaN/inf on a masked position (named by row, as
            :func:`scope_loss` does for ``teacher_logp``), or a repeated top-k id.
    """
    mask = _check_topk_inputs(student_topk_logits, teacher_topk_logp, teacher_topk_ids, mask, None)
    keep = mask[..., None]
    # Padding positions may hold NaN/inf: neutralise before any arithmetic so no NaN reaches the gradient.
    student = torch.where(keep, student_topk_logits.float(), 0.0)
    teacher = torch.where(keep, teacher_topk_logp.detach().float(), 0.0)
    student_logp = torch.log_softmax(student, dim=-1)
    teacher_logp = torch.log_softmax(teacher, dim=-1)
    per_token = (student_logp.exp() * (student_logp - teacher_logp)).sum(dim=-1)
    return torch.where(mask, per_token, 0.0)


def student_tail_log_mass(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log of the student's probability outside ``topk_ids``, from its full logits ``[B, T, V]``.

    ``logsumexp(logits outside the top-k) - logsumexp(logits)``, in log space and unclamped, so a tail
    of 1e-12 keeps its value and its gradient (``1 - sum_k p_k`` would round it to 0 in float32). A
    position whose top-k lists every token (``K = V``) has an empty tail: ``-inf``, with a zero (never
    NaN) gradient. Costs one ``[B, T, V]`` copy of the logits (the top-k set to ``-inf``).
    """
    logits = logits.float()
    outside = logits.scatter(-1, topk_ids, -math.inf)
    empty = torch.isneginf(outside).all(dim=-1)
    # logsumexp's backward over an all -inf row is NaN: compute it on zeros there, then put -inf back.
    tail = torch.logsumexp(torch.where(empty[..., None], 0.0, outside), dim=-1)
    return torch.where(empty, -math.inf, tail) - torch.logsumexp(logits, dim=-1)


def _log_tail_mass(topk_logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k exp(topk_logp))`` over the last dim, the top-k mass clamped below 1 (TRL's form)."""
    log_mass = torch.logsumexp(topk_logp, dim=-1).clamp(max=_TAIL_LOG_MASS_MAX)
    return torch.log(-torch.expm1(log_mass))


def topk_forward_kl(
    student_topk_logits: torch.Tensor,
    student_logsumexp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_topk_ids: torch.Tensor | None = None,
    student_tail_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token forward KL over the teacher's top-k plus a tail bucket (``opd_loss="topk_forward"``).

    TRL's tail-bucket form (``add_tail_bucket`` in its server-distillation and SDPO trainers). At each
    position, with ``S`` the teacher's top-k ids, the student's log-probs there
    ``s_k = z_k - logsumexp(z)`` (the full-vocabulary logsumexp) and the teacher's ``t_k``, each
    distribution gets one more bucket holding the rest of its mass, ``s_tail = 1 - sum_S exp(s_k)``
    and ``t_tail = 1 - sum_S exp(t_k)``, and::

        loss = sum_{k in S} exp(t_k) (t_k - s_k) + t_tail (log t_tail - log s_tail)

    a true KL between two distributions over ``K + 1`` buckets: >= 0, and 0 only when the student
    matches the teacher on ``S`` and on the tail's total. The teacher's tail mass is clamped to at
    least ``~1e-7`` (TRL's clamp of the top-k log-mass at ``-1e-7``) so its log stays finite. The
    student's tail is ``student_tail_logp`` when given (:func:`student_tail_log_mass` of the full
    logits: exact in log space, unclamped, so a student tail of 1e-9 still gets its gradient);
    without it, it is derived from the top-k like the teacher's and clamped the same way, and a
    clamped student tail carries no gradient. Where the student's tail is empty (``-inf``: ``K = V``,
    or every other logit ``-inf``) the student can put no mass there and the tail term is 0.

    Gradient with respect to the student's logits (teacher detached, tails not clamped):
    ``p_j - exp(t_j)`` for ``j`` in ``S`` and ``p_j (1 - t_tail / s_tail)`` outside ``S``, i.e.
    ``softmax(z) - target`` where the target puts the teacher's tail mass on the tokens outside
    ``S`` in proportion to the student's own tail. It reaches the tokens outside ``S`` only through
    ``student_logsumexp``, which must therefore carry the gradient of the full logits (e.g.
    ``torch.logsumexp(logits, -1)``, or a chunked/fused logsumexp with its backward). When ``S`` is the
    whole vocabulary (``K = V``) the tail term is 0 with 0 gradient (an empty student tail; without
    ``student_tail_logp`` both tails clamp to the same ``1e-7``), and value and gradient are those of
    the full-vocabulary forward KL ``KL(pi_T || pi_theta)``, gradient ``softmax(z) - pi_T``.

    Args:
        student_topk_logits: ``[B, T, K]`` student logits at the teacher's top-k ids, requires grad.
        student_logsumexp: ``[B, T]`` logsumexp of the student's full logits at each position (same
            temperature as the logits), requires grad. Passing log-probs as ``student_topk_logits``
            with a zero ``student_logsumexp`` is the same loss when the log-probs carry the gradient.
        teacher_topk_logp: ``[B, T, K]`` the teacher's log-probs of its top-k tokens (normalised over
            the full vocabulary: their probabilities add up to at most 1); detached internally.
        mask: ``[B, T]`` bool or 0/1: the positions that carry a loss.
        teacher_topk_ids: optional ``[B, T, K]`` ids, only checked for repeats.
        student_tail_logp: optional ``[B, T]`` log of the student's probability outside ``S``
            (:func:`student_tail_log_mass`), with gradient; ``-inf`` for an empty tail. What the
            trainer passes; without it the student's tail comes from ``1 - sum_S p`` (clamped).

    Returns:
        ``[B, T]`` float32 per-token loss, exactly 0 at masked-out positions.

    Raises:
        ValueError: as :func:`topk_reverse_kl`, and when the teacher's top-k probabilities add up to
            more than 1 (+1e-3) at a masked position (logits passed for log-probs, or a temperature
            mismatch).
    """
    mask = _check_topk_inputs(student_topk_logits, teacher_topk_logp, teacher_topk_ids, mask, student_logsumexp)
    keep = mask[..., None]
    student_logp = torch.where(keep, student_topk_logits.float() - student_logsumexp.float()[..., None], 0.0)
    teacher_logp = torch.where(keep, teacher_topk_logp.detach().float(), 0.0)
    over = mask & (torch.logsumexp(teacher_logp, dim=-1) > _TOPK_LOG_MASS_TOLERANCE)
    if over.any():
        raise ValueError(
            f"teacher_topk_logp adds up to more than probability 1 at positions of rows {_row_list(over.any(dim=1))}: "
            "log-probs normalised over the full vocabulary are expected, not logits"
        )
    # At masked-out positions a single 0 log-prob bucket would make the tail log(0): give them a
    # harmless -1 (mass e^-1 < 1) before the tail, the result is zeroed below anyway.
    student_logp = torch.where(keep, student_logp, -1.0)
    teacher_logp = torch.where(keep, teacher_logp, -1.0)
    teacher_tail = _log_tail_mass(teacher_logp)
    on_topk = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
    if student_tail_logp is None:
        student_tail = _log_tail_mass(student_logp)
        tail_term = teacher_tail.exp() * (teacher_tail - student_tail)
    else:
        if tuple(student_tail_logp.shape) != tuple(mask.shape):
            raise ValueError(f"student_tail_logp has shape {tuple(student_tail_logp.shape)}, expected [B, T] "
                             f"{tuple(mask.shape)}")
        student_tail = student_tail_logp.float()
        bad = mask & (torch.isnan(student_tail) | (student_tail > _TOPK_LOG_MASS_TOLERANCE))
        if bad.any():
            raise ValueError(f"student_tail_logp is NaN or above 0 on masked tokens of rows {_row_list(bad.any(dim=1))}")
        # An empty student tail (-inf) takes no mass: its term is 0 (never 0 * inf, never a NaN gradient).
        has_tail = mask & torch.isfinite(student_tail)
        student_tail = torch.where(has_tail, student_tail, 0.0)
        tail_term = torch.where(has_tail, teacher_tail.exp() * (teacher_tail - student_tail), 0.0)
    per_token = on_topk + tail_term
    return torch.where(mask, per_token, 0.0)


def topk_opd_token_loss(
    opd_loss: str,
    student_topk_logits: torch.Tensor,
    student_logsumexp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_topk_ids: torch.Tensor | None = None,
    student_tail_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[B, T]`` per-token OPD loss of ``opd_loss`` (``"topk_reverse"`` or ``"topk_forward"``).

    What the trainer passes to :func:`scope_loss` as ``opd_token_loss``. ``student_logsumexp`` and
    ``student_tail_logp`` are only read by ``"topk_forward"`` (its tail bucket); the renormalised
    reverse KL does not need them.
    """
    if opd_loss == "topk_reverse":
        return topk_reverse_kl(student_topk_logits, teacher_topk_logp, mask, teacher_topk_ids=teacher_topk_ids)
    if opd_loss == "topk_forward":
        return topk_forward_kl(student_topk_logits, student_logsumexp, teacher_topk_logp, mask,
                               teacher_topk_ids=teacher_topk_ids, student_tail_logp=student_tail_logp)
    raise ValueError(f"opd_loss must be one of {OPD_LOSSES[1:]} for a top-k loss, got {opd_loss!r}")


__all__ += ["OPD_LOSSES", "topk_reverse_kl", "topk_forward_kl", "topk_opd_token_loss", "student_tail_log_mass"]
