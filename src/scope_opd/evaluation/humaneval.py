"""HumanEval scoring on top of the sandboxed code verifier (paper Table 2).

HumanEval's tests are a ``check(candidate)`` function of asserts, not the
TACO/APPS input/output pairs that :func:`scope_opd.verifiers.code_score` takes.
So the program sent to the sandbox is: the problem's prompt (its imports and
helper functions), the model's code, the test source, and a zero-argument
entry function that runs ``check(<entry_point>)`` and returns True. The gold
handed to ``code_score`` is then one function-call test case expecting True:
any failed assert, exception or timeout scores 0.

The model's code is the last fenced ```python block of the completion, else
the whole completion. A reply that defines ``<entry_point>`` itself replaces
the prompt's stub (the stub gets a ``pass`` body so the program parses); a
reply that does not is taken as the body continuing the prompt, as base models
write it.
"""

from __future__ import annotations

__all__ = ["HUMANEVAL_VERIFIER", "check_code_sandbox", "humaneval_program", "humaneval_score"]

HUMANEVAL_VERIFIER = "scope_opd.evaluation.humaneval:humaneval_score"
_RUNNER = "__scope_opd_humaneval_check__"


def humaneval_program(completion: str, gold: dict) -> str:
    """The program that passes exactly when the completion passes the problem's ``check``.

    ``gold`` holds the HumanEval row's ``prompt``, ``test`` and ``entry_point``.
    """
    from ..verifiers.extract import last_python_block

    code = last_python_block(completion)
    prompt, entry_point = gold["prompt"], gold["entry_point"]
    if f"def {entry_point}(" in code:
        program = f"{prompt.rstrip()}\n    pass\n\n\n{code}"
    else:
        program = prompt + code
    return f"{program}\n\n\n{gold['test']}\n\n\ndef {_RUNNER}():\n    check({entry_point})\n    return True\n"


def humaneval_score(completion: str, gold: dict) -> float:
    """1.0 when the completion passes the problem's HumanEval tests in the sandbox, else 0.0."""
    from ..verifiers import InvalidGoldError, code_score

    missing = [key for key in ("prompt", "test", "entry_point") if not isinstance(gold, dict) or key not in gold]
    if missing:
        raise InvalidGoldError(f"a HumanEval gold needs {missing}")
    return code_score(humaneval_program(completion, gold), {"fn_name": _RUNNER, "inputs": [[]], "outputs": [True]})


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
