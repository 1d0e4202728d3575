"""Rollout side: ask the teacher only about rollouts the verifier marked wrong.

SCOPE reads teacher log-probs only on incorrect rollouts (the OPD path). verl 0.9's agent loop scores
each sample as soon as its rollout ends (``_compute_score``) and then asks the teacher
(``_compute_teacher_logprobs``); the agent loop manager class is a supported config hook
(``actor_rollout_ref.rollout.agent.agent_loop_manager_class``). This manager's workers skip the
teacher request when the reward already says "correct" and store placeholders in its place (log-prob
+inf, :data:`~scope_opd.integrations.verl.config.SKIPPED_TEACHER_LOGPROB`, a value no teacher returns):
SCOPE never reads them on correct rows, and if the driver's verdict (from ``rm_scores``) calls such a
row incorrect, :func:`~scope_opd.integrations.verl.weights.scope_batch` raises, naming the row and both
verdicts, instead of training without it or on a made-up value.

When the reward is not known yet at that point (a colocated reward model, scored later on the
driver), every rollout is sent to the teacher, as in plain verl.
"""

from __future__ import annotations

import ray
import torch
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ

from ...batch import verdicts
from .config import SKIPPED_TEACHER_LOGPROB, scope_options

__all__ = ["ScopeAgentLoopManager", "ScopeAgentLoopWorker", "skip_teacher"]


def skip_teacher(options, reward_score) -> bool:
    """Whether a finished rollout with this sequence reward needs no teacher log-probs."""
    if not options.skip_teacher_on_correct or options.algorithm != "scope" or reward_score is None:
        return False
    return bool(verdicts(torch.tensor([float(reward_score)]), options.correct_threshold)[0])


def placeholder_teacher_outputs(num_tokens: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(teacher_ids, teacher_logprobs)`` of verl's sampled-token layout ``[P + R, 1]``: pad ids, +inf log-probs."""
    return (
        torch.full((num_tokens, 1), int(pad_token_id), dtype=torch.int32),
        torch.full((num_tokens, 1), SKIPPED_TEACHER_LOGPROB, dtype=torch.float32),
    )


class _ScopeAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
    async def _compute_teacher_logprobs(self, output, prompt_ids, response_ids, validate, sample_kwargs=None):
        if not validate and self.distillation_enabled:
            if not hasattr(self, "_scope_options"):
                self._scope_options = scope_options(self.config)
            if skip_teacher(self._scope_options, output.reward_score):
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                ids, logprobs = placeholder_teacher_outputs(len(prompt_ids) + len(response_ids), pad)
                output.extra_fields["teacher_ids"] = ids
                output.extra_fields["teacher_logprobs"] = logprobs
                return
        await super()._compute_teacher_logprobs(output, prompt_ids, response_ids, validate, sample_kwargs)


ScopeAgentLoopWorker = ray.remote(_ScopeAgentLoopWorker)


class ScopeAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent loop manager whose workers skip the teacher on correct rollouts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ScopeAgentLoopWorker
