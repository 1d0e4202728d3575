"""The one interface the trainer uses to get teacher log-probs of the student's tokens."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TeacherScorer(Protocol):
    """Scores the student's sampled tokens with the teacher (paper sec. 2, step 3).

    The teacher never generates during SCOPE training: it is teacher-forced on
    the student's own ``prompt + completion`` and returns ``log pi_T(a_t)`` of
    each completion token. Prompt tokens are context only, never scored.
    """

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per row, float32 CPU tensor of length ``len(completion_ids[i])``:
        ``log p_T(completion token t | prompt, completion[:t])``.

        A row with an empty completion gets an empty tensor. Non-finite values
        (-inf, NaN) are returned as they are: the trainer decides what to do
        with them and counts them.
        """
        ...
