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


class StopTokenMappedTeacher:
    """A teacher that scores a completion's final stop token as the teacher's own stop token.

    For a student and a teacher whose stop tokens differ (a base student ending with ``<|endoftext|>``,
    a chat teacher with ``<|im_end|>``; ``teacher_allow_special_token_mismatch``): a completion whose
    last id is a key of ``stop_token_map`` is sent to the wrapped teacher with that id replaced by its
    value, so the returned last log-prob is the teacher's log-prob of stopping there. Generation stops
    at the first stop token, so only the last position can hold one; every other id is sent as it is.
    Every other attribute (``synced_ranks``, ``stats_delta``, ...) is the wrapped teacher's.
    """

    def __init__(self, teacher, stop_token_map: dict[int, int]):
        self.teacher = teacher
        self.stop_token_map = dict(stop_token_map)

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        mapped = []
        for ids in completion_ids:
            ids = list(ids)
            if ids and ids[-1] in self.stop_token_map:
                ids[-1] = self.stop_token_map[ids[-1]]
            mapped.append(ids)
        return self.teacher.score(prompt_ids, mapped)

    def __getattr__(self, name):
        if name == "teacher":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.teacher, name)
