"""The toy verifiable task: multi-digit addition written out column by column.

A problem is two ``digits``-digit numbers (default 2). The prompt and the
completion a perfect model writes, one line per column from the units up,
then the final answer in ``\\boxed{}``::

    prompt:      "Add 47+38.\\n"
    completion:  "7+8=15 write 5 carry 1\\n"
                 "4+3+1=8 write 8 carry 0\\n"
                 "\\boxed{85}"

The first column has no incoming carry; every later column adds it explicitly,
even when it is 0, so every step has the same shape. A final carry of 1 becomes
the leading digit of the boxed answer (``"\\boxed{135}"`` for 97+38). The
models are trained to end the completion with the tokenizer's EOS right after
the closing brace.

Because the answer is in ``\\boxed{...}``, the project's ``math`` verifier
(math-verify) and ``exact`` verifier both score it; :func:`verify_toy_answer` is
a dependency-free checker of the final boxed answer only (the chain is not
graded, as with any outcome reward).

Datasets (:func:`toy_dataset`) have the columns TRL's ``GRPOTrainer`` consumes:
``"prompt"`` (a plain string, no chat template) and ``"answer"`` (the gold
answer as a decimal string; extra columns reach reward functions as keyword
arguments). Train and test are disjoint by construction: each unordered pair
{a, b} is assigned to one split by a stable hash, so neither ``47+38`` nor
``38+47`` of a test problem is ever trained on.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "SPLITS",
    "TEST_FRACTION",
    "ToyProblem",
    "parse_toy_prompt",
    "toy_max_completion_chars",
    "toy_problems",
    "toy_dataset",
    "toy_solution",
    "verify_toy_answer",
]

SPLITS = ("train", "test")
# Share of the unordered pairs {a, b} held out for the test split.
TEST_FRACTION = 0.2
# Spaces up to this many ordered pairs are enumerated (exact sampling without
# replacement, n=None means "the whole split"); larger ones are sampled by rejection.
_ENUMERATE_LIMIT = 100_000

_PROMPT_RE = re.compile(r"^Add (\d+)\+(\d+)\.\n$")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class ToyProblem:
    """``a + b``; both operands have the same number of digits."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"Add {self.a}+{self.b}.\n"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def split(self) -> str:
        return _split_of(self.a, self.b)


def parse_toy_prompt(prompt: str) -> ToyProblem:
    """Inverse of ``ToyProblem.prompt``; raises ``ValueError`` on anything else."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return ToyProblem(int(match.group(1)), int(match.group(2)))


def toy_solution(problem: ToyProblem | str) -> str:
    """The full completion a perfect model writes (no EOS), ending with ``\\boxed{a+b}``.

    ``problem`` is a :class:`ToyProblem` or its prompt string (a dataset row's ``"prompt"``).
    """
    if isinstance(problem, str):
        problem = parse_toy_prompt(problem)
    width = max(len(str(problem.a)), len(str(problem.b)))
    a_digits = str(problem.a).zfill(width)[::-1]
    b_digits = str(problem.b).zfill(width)[::-1]
    lines = []
    carry = 0
    for column, (x, y) in enumerate(zip(a_digits, b_digits)):
        total = int(x) + int(y) + carry
        summands = f"{x}+{y}" if column == 0 else f"{x}+{y}+{carry}"
        carry = total // 10
        lines.append(f"{summands}={total} write {total % 10} carry {carry}\n")
    return "".join(lines) + f"\\boxed{{{problem.answer}}}"


def toy_max_completion_chars(digits: int = 2) -> int:
    """Length of the longest :func:`toy_solution` for ``digits``-digit operands.

    With the char tokenizer this is also its length in tokens; add 1 for the EOS
    token (2 digits: 59 characters, so 60 tokens with EOS).
    """
    largest = 10**digits - 1  # all nines: every column has a two-digit sum and a carry
    return len(toy_solution(ToyProblem(largest, largest)))


def _operand_range(digits: int) -> range:
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _split_of(a: int, b: int) -> str:
    # Hash the unordered pair, so that a+b and b+a always land in the same split.
    key = f"{min(a, b)}+{max(a, b)}".encode()
    unit = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if unit < TEST_FRACTION else "train"


def toy_problems(split: str = "train", n: int | None = None, seed: int = 0, digits: int = 2) -> list[ToyProblem]:
    """``n`` distinct problems of ``split`` in a seeded random order.

    ``n=None`` returns the whole split (only for spaces small enough to enumerate,
    i.e. ``digits <= 2``). Raises ``ValueError`` if the split has fewer than ``n`` problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    operands = _operand_range(digits)
    rng = random.Random(f"scope-opd-toy/{split}/{digits}/{seed}")
    if len(operands) ** 2 <= _ENUMERATE_LIMIT:
        pool = [ToyProblem(a, b) for a in operands for b in operands if _split_of(a, b) == split]
        if n is None:
            n = len(pool)
        if n > len(pool):
            raise ValueError(f"the {digits}-digit {split} split has {len(pool)} problems, asked for {n}")
        return rng.sample(pool, n)
    if n is None:
        raise ValueError(f"{digits}-digit splits are too large to enumerate; pass n")
    seen: dict[ToyProblem, None] = {}  # insertion-ordered set
    while len(seen) < n:
        problem = ToyProblem(rng.choice(operands), rng.choice(operands))
        if problem.split == split:
            seen.setdefault(problem)
    return list(seen)


def toy_dataset(split: str = "train", n: int | None = None, seed: int = 0, digits: int = 2) -> Dataset:
    """A ``datasets.Dataset`` with columns ``"prompt"`` and ``"answer"`` (see :func:`toy_problems`)."""
    from datasets import Dataset

    problems = toy_problems(split, n, seed, digits)
    return Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})


def verify_toy_answer(completion: str, gold: str) -> float:
    """1.0 if the last ``\\boxed{...}`` in ``completion`` equals ``gold``, else 0.0.

    Only the final answer is checked, never the chain. Integers compare by value
    (``\\boxed{085}`` matches ``"85"``); anything else by its stripped text.
    """
    boxed = _BOXED_RE.findall(completion)
    if not boxed:
        return 0.0
    predicted, gold = boxed[-1].strip(), str(gold).strip()
    if predicted.isdigit() and gold.isdigit():
        return float(int(predicted) == int(gold))
    return float(predicted == gold)
