"""verl reward function (``reward.custom_reward_function.path: pkg://scope_opd.integrations.verl.reward``).

The same maths verifier as the TRL trainer (:func:`scope_opd.verifiers.math.math_score`: the last
``\\boxed{}`` answer, math-verify equivalence with the gold), so a verl run and a TRL run mark the same
completion the same way. verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

math-verify bounds its own time only in a process's main thread; verl's reward workers are separate
processes, but if yours call this from a thread, a pathological answer is not time-bounded there.
"""

from __future__ import annotations

from ...verifiers.math import math_score

__all__ = ["compute_score"]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the completion's final answer equals ``ground_truth``, else 0.0."""
    return float(math_score(solution_str, ground_truth))
