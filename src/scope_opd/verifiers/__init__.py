"""Verifiers: score a completion against a gold answer, in [0, 1].

* ``"math"``  -> :func:`~scope_opd.verifiers.math.math_score` (math-verify equivalence)
* ``"exact"`` -> :func:`~scope_opd.verifiers.exact.exact_score` (normalised string match)
* ``"code"``  -> :func:`~scope_opd.verifiers.code.code_score` (sandboxed tests, TACO/APPS format)

:func:`get_verifier` resolves these names, an import path, or a callable.
:class:`RewardFunction` wraps any of them as a TRL reward function that turns
failures and hangs into 0.0 plus counters; :func:`verify_batch` is the same for a
one-off batch (evaluation).
"""

from .code import code_pass_fraction, code_score
from .exact import exact_score, normalize_answer
from .registry import BUILTIN_VERIFIERS, InvalidGoldError, Verifier, get_verifier
from .reward import STAT_KEYS, RewardFunction, completion_text, verify_batch
from .sandbox import SandboxLimits, SandboxUnavailable, describe_isolation

__all__ = [
    "BUILTIN_VERIFIERS",
    "STAT_KEYS",
    "InvalidGoldError",
    "RewardFunction",
    "SandboxLimits",
    "SandboxUnavailable",
    "Verifier",
    "code_pass_fraction",
    "code_score",
    "completion_text",
    "describe_isolation",
    "exact_score",
    "get_verifier",
    "normalize_answer",
    "verify_batch",
]
