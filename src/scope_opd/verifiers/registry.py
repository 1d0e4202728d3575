"""What a verifier is, and how a name or an import path becomes one.

A verifier is any callable ``(completion_text, gold) -> float`` returning a score
in ``[0, 1]`` (1.0 = correct). It raises :class:`InvalidGoldError` when the gold
answer itself is unusable (so a dataset bug is counted apart from wrong answers),
and may raise anything else on internal failure: :class:`~scope_opd.verifiers.reward.RewardFunction`
turns every failure into a 0.0 and a counter, never into a crash.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["BUILTIN_VERIFIERS", "InvalidGoldError", "Verifier", "get_verifier"]

Verifier = Callable[[str, object], float]

# Import paths, not functions: "math" pulls in sympy (~0.6 s), which a user of
# "exact" or "code" should not pay for.
BUILTIN_VERIFIERS: dict[str, str] = {
    "math": "scope_opd.verifiers.math:math_score",
    # math-verify's fallback over the whole text too, for prompts that do not ask for \boxed{}.
    "math_any": "scope_opd.verifiers.math:math_any_score",
    "exact": "scope_opd.verifiers.exact:exact_score",
    "code": "scope_opd.verifiers.code:code_score",
}


class InvalidGoldError(ValueError):
    """The gold answer cannot be used (unparsable maths, malformed test cases, no tests)."""


def _import_object(path: str) -> object:
    if ":" in path:
        module_name, _, attribute_path = path.partition(":")
    else:
        module_name, _, attribute_path = path.rpartition(".")
    if not module_name or not attribute_path:
        raise ValueError(f"verifier import path {path!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for verifier {path!r}: {error}") from error
    for attribute in attribute_path.split("."):
        try:
            obj = getattr(obj, attribute)
        except AttributeError as error:
            raise ValueError(f"verifier {path!r}: {module_name!r} has no attribute {attribute_path!r}") from error
    return obj


def get_verifier(spec: str | Verifier) -> Verifier:
    """The verifier named by ``spec``.

    Args:
        spec: ``"math"``, ``"exact"``, ``"code"``, an import path
            (``"package.module:function"`` or ``"package.module.function"``), or a
            callable, returned unchanged.

    Raises:
        ValueError: unknown name, unimportable path, or an object that is not callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a verifier is a name, an import path or a callable, got {type(spec).__name__}")
    if spec in BUILTIN_VERIFIERS:
        return _import_object(BUILTIN_VERIFIERS[spec])
    if "." not in spec and ":" not in spec:
        valid = ", ".join(sorted(BUILTIN_VERIFIERS))
        raise ValueError(
            f"unknown verifier {spec!r}; valid names: {valid}, or an import path 'package.module:function'"
        )
    verifier = _import_object(spec)
    if not callable(verifier):
        raise ValueError(f"verifier {spec!r} resolved to a non-callable {type(verifier).__name__}")
    return verifier
