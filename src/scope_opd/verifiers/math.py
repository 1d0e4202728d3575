"""Maths verifier: symbolic equivalence of the final answer and the gold, by math-verify.

math-verify bounds its own parsing and comparison time with ``signal.alarm``,
which Python allows only in the main thread; from any other thread it raises
``ValueError``. We pass its timeouts only when running in the main thread (as in
:class:`~scope_opd.verifiers.reward.RewardFunction`'s worker processes) and
``None`` elsewhere, where the caller must bound the time itself
(``RewardFunction`` does, by killing the worker process).

Even in the main thread, the alarm cannot stop everything: an answer such as
``\boxed{10^{10^{8}}}`` makes sympy build a 100-million-digit integer inside one
C call, which holds the GIL (in a thread, it freezes the whole process) and
delays signal handlers until it returns. Untrusted completions therefore go
through :class:`~scope_opd.verifiers.reward.RewardFunction` or
:func:`~scope_opd.verifiers.reward.verify_batch`, not straight to
:func:`math_score`.
"""

from __future__ import annotations

import re
import threading

# Imported at module level on purpose: RewardFunction forks its workers from the
# process that built the verifier, so they inherit sympy instead of each paying
# ~0.6 s to import it.
from math_verify import parse, verify

from .extract import last_boxed_content
from .registry import InvalidGoldError

__all__ = ["math_any_score", "math_score", "parse_gold"]

# math-verify's own default: bounds one pathological sympy call without killing the worker.
MATH_VERIFY_TIMEOUT_S = 5


def _math_verify_timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def parse_gold(gold: object) -> list:
    """math-verify's parse of a gold answer such as ``"19"``, ``"\\frac{1}{2}"`` or ``"$x^2$"``.

    A gold without ``$`` or ``\\boxed`` is wrapped in ``$...$``: math-verify only
    reads LaTeX inside a maths environment, so a bare ``\\frac{1}{2}`` or ``x^2``
    would not parse otherwise.

    Raises:
        InvalidGoldError: None, empty, or nothing math-verify can parse.
    """
    if gold is None:
        raise InvalidGoldError("gold answer is None")
    text = str(gold).strip()
    if not text:
        raise InvalidGoldError("gold answer is empty")
    # An escaped dollar ("\\$18.90") is a currency sign, not a maths environment.
    if not _UNESCAPED_DOLLAR.search(text) and "\\boxed" not in text:
        text = f"${text}$"
    parsed = parse(text, parsing_timeout=_math_verify_timeout())
    if not parsed:
        raise InvalidGoldError(f"math-verify cannot parse the gold answer {gold!r}")
    return parsed


def math_score(completion: str, gold: object, *, require_boxed: bool = True) -> float:
    """1.0 when the completion's boxed answer is mathematically equivalent to the gold, else 0.0.

    The answer is the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``;
    math-verify alone would merge several boxes into a set). With ``require_boxed``
    (the default, the ``math`` verifier) a completion without a complete box scores
    0.0: every prompt this project builds for maths asks for ``\\boxed{}`` (the paper
    presets' and the evaluation benchmarks' instruction), and math-verify's fallback,
    which takes any number in the text, matched gold answers such as "2" in the random
    text of untrained models. ``require_boxed=False`` (the ``math_any`` verifier, for
    data whose prompts do not ask for a box) falls back to math-verify's default LaTeX +
    plain-expression extraction over the whole text. No extractable answer scores 0.0.

    Raises:
        InvalidGoldError: see :func:`parse_gold`.
    """
    gold_parsed = parse_gold(gold)
    boxed = last_boxed_content(completion)
    if boxed is None and require_boxed:
        return 0.0
    timeout = _math_verify_timeout()
    answer = parse(completion if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not answer:
        return 0.0
    return 1.0 if verify(gold_parsed, answer, timeout_seconds=timeout) else 0.0


def math_any_score(completion: str, gold: object) -> float:
    """:func:`math_score` without ``require_boxed``: an unboxed answer anywhere in the text may match."""
    return math_score(completion, gold, require_boxed=False)
