"""From a rollout batch to SCOPE's inputs: the rules every engine shares (TRL trainer, verl plugin).

Between the engine's tensors and the maths of :mod:`scope_opd.algorithms` sit a few decisions that
must be the same whichever engine runs the step. They live here, once, as pure tensor code:

* :func:`verdicts` - which rollouts are correct (``score >= threshold``; unscorable rows are incorrect);
* :func:`teacher_rows` - which rows need teacher log-probs (SCOPE: the incorrect ones; OPD: all);
* :func:`row_statistics` - per-row sequence log-probs, and which rows are *valid*: a row with no
  response token, a row the engine marks as padding, or a teacher-path row whose teacher log-probs
  are not finite on a response token is dropped (weight 0 on both paths, left out of its group's
  normalisation, no loss);
* :func:`path_weights` - the per-row weights of SCOPE (eqs. 4-5) or OPD over whole prompt groups;
* :func:`weight_metrics` - what both engines log about a batch's groups and weights.

Engines gather what they need across processes themselves (only ``[B]`` vectors cross processes:
verdicts, validity, sequence log-probs) and then call :func:`path_weights` on the whole batch, so a
group split over micro-batches or ranks gets the weights of the whole group.
"""

from __future__ import annotations

import torch

from .algorithms import dual_path_weights, opd_weights, sequence_mean_logp

__all__ = ["SCOPE_ALGORITHMS", "verdicts", "teacher_rows", "needs_student_logp", "row_statistics", "path_weights", "weight_metrics"]

SCOPE_ALGORITHMS = ("scope", "opd")


def verdicts(scores: torch.Tensor, threshold: float, unscorable: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` bool: a rollout is correct when its verdict score is ``>= threshold`` (1e-6 slack for float sums).

    ``unscorable`` rows (no reward function could score them, ``NaN`` scores) count as incorrect: on the
    OPD path their training signal is the teacher's, which does not depend on the verdict.
    """
    correct = torch.nan_to_num(scores.float(), nan=float("-inf")) >= threshold - 1e-6
    if unscorable is not None:
        correct = correct & ~unscorable
    return correct


def teacher_rows(correct: torch.Tensor, algorithm: str) -> torch.Tensor:
    """``[B]`` bool: rows whose tokens the teacher must score (SCOPE: incorrect rows only; OPD: every row)."""
    if algorithm not in SCOPE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {SCOPE_ALGORITHMS}, got {algorithm!r}")
    return ~correct if algorithm == "scope" else torch.ones_like(correct)


def needs_student_logp(algorithm: str, student_weighting: str) -> bool:
    """Whether the weights read the student's log-probs: SCOPE's student-guided weights (eq. 5), unless uniform.

    OPD and the uniform-student ablation need none, so both engines skip the extra old-log-prob pass for them.
    """
    return algorithm == "scope" and student_weighting != "uniform"


def row_statistics(
    completion_mask: torch.Tensor,
    student_token_logp: torch.Tensor | None,
    teacher_token_logp: torch.Tensor,
    on_teacher_path: torch.Tensor,
    padding: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row inputs of the weights, and which rows are valid, from padded ``[B, T]`` tensors.

    Args:
        completion_mask: ``[B, T]`` response-token mask.
        student_token_logp: ``[B, T]`` sampling-policy log-probs, or ``None`` when no student-guided
            weight is needed (OPD, uniform student weighting): ``student_mean_logp`` is then NaN.
        teacher_token_logp: ``[B, T]`` teacher log-probs, NaN where not scored.
        on_teacher_path: ``[B]`` rows that needed teacher scores (:func:`teacher_rows`).
        padding: optional ``[B]`` rows the engine added to fill a batch (verl's ``is_padding``).

    Returns:
        ``student_mean_logp``, ``teacher_mean_logp`` (``[B]`` float32, eq. 3), ``valid`` and
        ``teacher_nonfinite`` (``[B]`` bool), and ``loss_mask`` (``[B, T]`` bool: the mask of valid rows).
    """
    mask = completion_mask.bool()
    batch = mask.shape[0]
    if student_token_logp is None:
        student_mean = torch.full((batch,), float("nan"), device=mask.device)
    else:
        student_mean = sequence_mean_logp(student_token_logp, mask)
    teacher_mean = sequence_mean_logp(teacher_token_logp, mask)
    nonempty = mask.any(dim=1)
    # A NaN/-inf teacher log-prob on a response token of a row that needs it: drop the row, never clamp.
    finite = torch.isfinite(torch.where(mask, teacher_token_logp.float(), 0.0)).all(dim=1)
    teacher_nonfinite = on_teacher_path & nonempty & ~finite
    valid = nonempty & ~teacher_nonfinite
    if padding is not None:
        valid = valid & ~padding.bool()
    return {
        "student_mean_logp": student_mean,
        "teacher_mean_logp": teacher_mean,
        "valid": valid,
        "teacher_nonfinite": teacher_nonfinite,
        "loss_mask": mask & valid[:, None],
    }


def path_weights(
    group_ids: torch.Tensor,
    correct: torch.Tensor,
    student_mean_logp: torch.Tensor,
    teacher_mean_logp: torch.Tensor,
    valid: torch.Tensor,
    *,
    algorithm: str,
    tau: float = 1.0,
    normalization: str = "mean",
    student_weighting: str = "perplexity",
    teacher_weighting: str = "inverse_perplexity",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(path_correct, student_weights, teacher_weights)``, each ``[B]``, for a whole batch of groups.

    SCOPE: the verdicts and :func:`~scope_opd.algorithms.dual_path_weights`. OPD: every valid row on the
    teacher path with weight 1 (:func:`~scope_opd.algorithms.opd_weights`), whatever the verifier says.
    Invalid rows get weight 0 on both paths.
    """
    if algorithm == "scope":
        student_weights, teacher_weights = dual_path_weights(
            group_ids, correct, student_mean_logp, teacher_mean_logp, tau=tau, normalization=normalization,
            student_weighting=student_weighting, teacher_weighting=teacher_weighting, valid=valid,
        )
        return correct.bool(), student_weights, teacher_weights
    if algorithm != "opd":
        raise ValueError(f"algorithm must be one of {SCOPE_ALGORITHMS}, got {algorithm!r}")
    path_correct, student_weights, teacher_weights = opd_weights(correct.shape[0], device=correct.device)
    return path_correct, student_weights, teacher_weights * valid


def weight_metrics(
    group_ids: torch.Tensor,
    correct: torch.Tensor,
    valid: torch.Tensor,
    student_mean_logp: torch.Tensor,
    teacher_mean_logp: torch.Tensor,
    student_weights: torch.Tensor,
    teacher_weights: torch.Tensor,
    teacher_nonfinite: torch.Tensor,
) -> dict[str, float]:
    """Batch-level statistics both engines log (names without the ``scope/`` prefix)."""
    correct_f = correct.float()
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    per_group = torch.zeros(num_groups, device=correct.device).index_add_(0, group, correct_f)
    size = torch.bincount(group, minlength=num_groups).float()

    def ppl_mean(values, rows):
        rows = rows & torch.isfinite(values)
        return torch.exp(-values[rows]).mean() if rows.any() else torch.tensor(float("nan"), device=values.device)

    # Share of groups whose largest weight on a path exceeds 1.5 (mean normalisation: 1 = uniform).
    def share_above(weights, rows):
        top = torch.full((num_groups,), float("-inf"), device=weights.device).scatter_reduce_(
            0, group, torch.where(rows, weights.float(), float("-inf")), "amax")
        has = torch.isfinite(top)
        return (top[has] > 1.5).float().mean() if has.any() else torch.tensor(float("nan"), device=weights.device)

    values = torch.stack([
        correct_f.mean(),
        (per_group == size).float().mean(),
        (per_group == 0).float().mean(),
        student_weights.max().float(),
        teacher_weights.max().float(),
        share_above(student_weights, correct & valid),
        share_above(teacher_weights, ~correct & valid),
        (~valid).float().mean(),
        teacher_nonfinite.float().sum(),
        ppl_mean(student_mean_logp, correct),
        ppl_mean(student_mean_logp, ~correct),
        ppl_mean(teacher_mean_logp, correct),
        ppl_mean(teacher_mean_logp, ~correct),
    ]).tolist()
    names = (
        "frac_correct", "frac_all_correct_groups", "frac_all_wrong_groups", "student_weight_max",
        "teacher_weight_max", "frac_groups_student_weight_above_1.5", "frac_groups_teacher_weight_above_1.5",
        "frac_invalid_rows", "teacher_nonfinite_rows", "student_ppl_correct", "student_ppl_incorrect",
        "teacher_ppl_correct", "teacher_ppl_incorrect",
    )
    return dict(zip(names, values))
