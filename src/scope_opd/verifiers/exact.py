"""Exact-match verifier: the final answer and the gold, normalised, must be equal strings."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .extract import final_answer_text
from .registry import InvalidGoldError

__all__ = ["exact_score", "normalize_answer"]

_THOUSANDS_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def _canonical_number(text: str) -> str:
    """``"1.0"`` -> ``"1"``, ``"+2.50"`` -> ``"2.5"``, ``"-0"`` -> ``"0"``; anything else unchanged."""
    if not _PLAIN_NUMBER.fullmatch(text):
        return text
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return text
    if value == 0:
        return "0"
    # normalize() drops trailing zeros but writes 100 as 1E+2; format "f" writes it back out.
    return format(value.normalize(), "f")


def normalize_answer(text: str) -> str:
    """Canonical form for exact matching.

    Strips surrounding whitespace, every ``$`` (and ``\\$``), one trailing period;
    case-folds; removes thousands separators from properly grouped numbers
    (``1,234,567``); collapses runs of whitespace; writes plain decimals canonically
    (``1.0`` == ``1``).
    """
    text = text.replace("\\$", "").replace("$", "").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    text = text.casefold()
    text = _THOUSANDS_GROUPED.sub(lambda match: match.group(0).replace(",", ""), text)
    text = " ".join(text.split())
    return _canonical_number(text)


def exact_score(completion: str, gold: object) -> float:
    """1.0 when the completion's final answer equals the gold after :func:`normalize_answer`.

    The final answer is :func:`~scope_opd.verifiers.extract.final_answer_text` of the
    completion. The gold goes through the same extraction, so a GSM8K-style gold
    (a worked solution ending in ``#### 72``) or ``\\boxed{72}`` works as well as ``72``.

    Raises:
        InvalidGoldError: the gold is None or has no answer text.
    """
    if gold is None:
        raise InvalidGoldError("gold answer is None")
    gold_answer = normalize_answer(final_answer_text(str(gold)))
    if not gold_answer:
        raise InvalidGoldError(f"gold answer {gold!r} is empty after normalisation")
    return 1.0 if normalize_answer(final_answer_text(completion)) == gold_answer else 0.0
