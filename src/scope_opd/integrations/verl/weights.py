"""Driver side: from a verl step batch (as TransferQueue returns it) to SCOPE's per-row fields.

verl stores each sample unpadded (jagged nested tensors): ``response_mask``, ``rm_scores`` and
``old_log_probs`` over the response (``[R_i]``), ``teacher_logprobs`` over the whole sequence and
shifted by one (``[P_i + R_i, 1]``, entry ``j`` is the teacher's log-prob of token ``j + 1``; the last
entry is a dummy). The rules that turn these into SCOPE's inputs (verdicts, validity, weights,
denominators) are :mod:`scope_opd.batch` and :mod:`scope_opd.algorithms`; this module only slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDict
from verl.workers.utils.padding import no_padding_2_padding

from ...algorithms import loss_denominators
from ...batch import path_weights, row_statistics, teacher_rows, verdicts, weight_metrics
from .config import SKIPPED_TEACHER_LOGPROB, ScopeOptions

__all__ = ["ScopeBatch", "DRIVER_FIELDS", "ROW_FIELDS", "scope_batch", "padded"]

# What the driver reads from TransferQueue for the weights.
DRIVER_FIELDS = ("uid", "prompts", "responses", "response_mask", "rm_scores", "old_log_probs", "teacher_logprobs")
# What it writes back, one value per sample, for the loss on the actor workers.
ROW_FIELDS = ("scope_correct", "scope_valid", "scope_student_weight", "scope_teacher_weight")


def padded(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A jagged nested ``[B, j]`` tensor right-padded to ``[B, max j]`` (plain tensors pass through)."""
    return x.to_padded_tensor(value) if x.is_nested else x


def response_teacher_logprobs(data: TensorDict) -> torch.Tensor:
    """``[B, R]`` teacher log-probs of the response tokens, sliced from verl's shifted ``[P + R, 1]`` layout.

    The same slicing verl applies to the student's log-probs (``no_padding_2_padding``), so position
    ``t`` is the teacher's log-prob of response token ``t``, aligned with ``old_log_probs``.
    """
    teacher = data["teacher_logprobs"]
    if teacher.is_nested and teacher.dim() == 3 and teacher.size(-1) != 1:
        raise ValueError(
            f"teacher_logprobs has {teacher.size(-1)} log-probs per position: the 'scope' loss needs the "
            "sampled token's only (a use_estimator loss; do not combine with top-k distillation)"
        )
    if not teacher.is_nested:
        # verl's batching stacks equal-length samples into plain tensors ([B, P + R, 1], no padding inside,
        # and no attention_mask field for no_padding_2_padding): the same shifted slice, on every row.
        prompt_len, response_len = data["prompts"].shape[1], data["responses"].shape[1]
        if teacher.shape[1] != prompt_len + response_len:
            raise ValueError(f"teacher_logprobs has {teacher.shape[1]} positions, expected P + R = {prompt_len + response_len}")
        out = teacher[:, prompt_len - 1 : prompt_len - 1 + response_len]
    else:
        out = no_padding_2_padding(teacher, data)
    return out.squeeze(-1) if out.dim() == 3 else out


def _refuse_skipped_teacher_on_incorrect_rows(teacher, response_mask, on_teacher_path, scores, uids, options) -> None:
    """Raise when a row the agent loop skipped (its reward said correct) is one the driver puts on the teacher path.

    The skipped row has no teacher log-probs; dropping it as a teacher failure would silently lose a rollout
    the driver says is wrong, and any value in its place would be made up.
    """
    skipped = ((teacher == SKIPPED_TEACHER_LOGPROB) & response_mask).any(dim=1)
    bad = skipped & on_teacher_path
    if not bad.any():
        return
    rows = bad.nonzero().flatten().tolist()
    shown = ", ".join(f"{i} (uid {uids[i]}, rm_scores sum {scores[i].item():g})" for i in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise ValueError(
        f"rows {shown}{more}: the agent loop called these rollouts correct (their reward >= scope.correct_threshold "
        f"{options.correct_threshold}) and skipped the teacher, but the driver's verdict from rm_scores calls them "
        f"incorrect ({options.algorithm} path needs their teacher log-probs). The reward changed between the agent "
        "loop and the driver - likely a reward model or reward post-processing (e.g. an overlong penalty) applied "
        "after the agent loop scored the rollout. Make both see the same reward, or set "
        "scope.skip_teacher_on_correct=false"
    )


@dataclass
class ScopeBatch:
    """The result of :func:`scope_batch` for one step batch."""

    rows: TensorDict  # ROW_FIELDS, batch_size [B]
    num_items: list[float]  # (mle, opd) global denominators of options.loss_aggregation
    metrics: dict[str, float]


def scope_batch(data: TensorDict, padding: torch.Tensor, options: ScopeOptions) -> ScopeBatch:
    """SCOPE's per-row weights and the step's loss denominators for a whole verl step batch.

    Args:
        data: the :data:`DRIVER_FIELDS` of every sample of the step (one ``_step_once`` batch), as
            ``tq.kv_batch_get`` returns them (jagged nested tensors; ``uid`` non-tensor).
        padding: ``[B]`` bool, verl's ``is_padding`` tags (samples added to fill the batch).
        options: the ``scope:`` block.
    """
    batch = data.batch_size[0]
    response_mask = padded(data["response_mask"]).bool()
    if tuple(padding.shape) != (batch,):
        raise ValueError(f"padding has shape {tuple(padding.shape)}, expected ({batch},)")
    # verl puts the sequence reward on the last response position of rm_scores, zeros elsewhere; summed
    # without the mask, as verl's estimators do (a multi-turn response may end on a masked tool token).
    scores = padded(data["rm_scores"]).float().sum(dim=1)
    correct = verdicts(scores, options.correct_threshold) & ~padding
    on_teacher_path = teacher_rows(correct, options.algorithm) & ~padding
    teacher = response_teacher_logprobs(data)
    student = padded(data["old_log_probs"]) if options.needs_student_logp else None
    if teacher.shape != response_mask.shape or (student is not None and student.shape != response_mask.shape):
        raise ValueError(
            f"teacher_logprobs {tuple(teacher.shape)} / old_log_probs "
            f"{None if student is None else tuple(student.shape)} do not match response_mask {tuple(response_mask.shape)}"
        )
    uids = np.asarray(list(data["uid"]), dtype=object)
    _refuse_skipped_teacher_on_incorrect_rows(teacher, response_mask, on_teacher_path, scores, uids, options)
    stats = row_statistics(response_mask, student, teacher, on_teacher_path, padding=padding)
    _, group_ids = np.unique(uids.astype(str), return_inverse=True)
    group_ids = torch.as_tensor(group_ids.reshape(-1), dtype=torch.long)
    path_correct, student_weights, teacher_weights = path_weights(
        group_ids, correct, stats["student_mean_logp"], stats["teacher_mean_logp"], stats["valid"],
        algorithm=options.algorithm, tau=options.tau, normalization=options.weight_normalization,
        student_weighting=options.student_weighting, teacher_weighting=options.teacher_weighting,
    )
    num_items = loss_denominators(stats["loss_mask"], path_correct, options.loss_aggregation).tolist()
    real = ~padding
    metrics = weight_metrics(
        group_ids[real], correct[real], stats["valid"][real], stats["student_mean_logp"][real],
        stats["teacher_mean_logp"][real], student_weights[real], teacher_weights[real],
        stats["teacher_nonfinite"][real],
    ) if real.any() else {}
    metrics = {f"scope/{k}": v for k, v in metrics.items()}
    metrics["scope/teacher_rows"] = float(on_teacher_path.sum())
    rows = TensorDict(
        {
            "scope_correct": path_correct.bool(),
            "scope_valid": stats["valid"].bool(),
            "scope_student_weight": student_weights.float(),
            "scope_teacher_weight": teacher_weights.float(),
        },
        batch_size=[batch],
    )
    return ScopeBatch(rows=rows, num_items=[float(x) for x in num_items], metrics=metrics)
