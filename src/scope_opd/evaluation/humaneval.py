"""HumanEval scoring on top of the sandbox, with the verdict decided outside it (paper Table 2).

HumanEval's tests are a ``check(candidate)`` function of asserts, not the
TACO/APPS input/output pairs that :func:`scope_opd.verifiers.code_score` takes.
The check must not run beside the model's code: there, an answer whose ``==``
is always true, a patched builtin, ``os._exit(0)`` before the asserts, or a
look at the check's own frame would pass it. So the sandbox gets only the
program (the problem's prompt, for its imports and helpers, then the model's
code), and :func:`scope_opd.verifiers.trusted_check.run_trusted_check` runs
``check`` in a fresh trusted interpreter against the plain values the sandbox
returned for each call: see that module.

The model's code is the last fenced ```python block of the completion, else
the whole completion. A reply that defines ``<entry_point>`` itself replaces
the prompt's stub (the stub gets a ``pass`` body so the program parses); a
reply that does not is taken as the body continuing the prompt, as base models
write it.
"""

from __future__ import annotations

from ..verifiers.sandbox import SandboxLimits

__all__ = ["HUMANEVAL_VERIFIER", "check_code_sandbox", "humaneval_program", "humaneval_score"]

HUMANEVAL_VERIFIER = "scope_opd.evaluation.humaneval:humaneval_score"


def humaneval_program(completion: str, gold: dict) -> str:
    """The program the sandbox runs: the problem's prompt with the completion's code (no test).

    ``gold`` holds the HumanEval row's ``prompt`` and ``entry_point``.
    """
    from ..verifiers.extract import last_python_block

    code = last_python_block(completion)
    prompt, entry_point = gold["prompt"], gold["entry_point"]
    if f"def {entry_point}(" in code:
        return f"{prompt.rstrip()}\n    pass\n\n\n{code}\n"
    return prompt + code + "\n"


def humaneval_score(completion: str, gold: dict, *, limits: SandboxLimits = SandboxLimits()) -> float:
    """1.0 when the completion passes the problem's HumanEval ``check``, else 0.0 (see the module docstring)."""
    from ..verifiers import InvalidGoldError
    from ..verifiers.trusted_check import run_trusted_check

    missing = [key for key in ("prompt", "test", "entry_point") if not isinstance(gold, dict) or key not in gold]
    if missing:
        raise InvalidGoldError(f"a HumanEval gold needs {missing}")
    # The prompt's stub is a function with only a docstring: valid source, and the check may use its helpers.
    verdict = run_trusted_check(
        humaneval_program(completion, gold), gold["entry_point"], [gold["prompt"], gold["test"]], limits=limits
    )
    return 1.0 if verdict.passed else 0.0


def check_code_sandbox() -> str:
    """Run a known-good program in the sandbox; returns its isolation summary.

    Raises ``RuntimeError`` (``SandboxUnavailable`` or a failed run) when code
    cannot be verified here, so a code benchmark fails before sampling rather
    than scoring every sample 0.
    """
    from ..verifiers import code_score, describe_isolation

    if code_score("def f():\n    return 1\n", {"fn_name": "f", "inputs": [[]], "outputs": [1]}) != 1.0:
        raise RuntimeError("the sandbox ran but a known-good program failed in it")
    return describe_isolation()
