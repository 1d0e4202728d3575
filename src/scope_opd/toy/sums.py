"""The second toy task: a sum of several one-digit numbers, written step by step in one of several orders.

Why this task (issue: the addition toy cannot tell SCOPE from OPD), mechanism by mechanism:

(a) correct solutions differ. Addition is commutative and associative, so the same sum
    has several valid step-by-step solutions. Three strategies are defined
    (:data:`STRATEGIES`): ``left`` accumulates left to right, ``right`` right to left,
    ``pairs`` adds neighbouring pairs first and then the partial sums. The student is
    pre-trained on a skewed mix (mostly ``left``), the teacher on all three evenly
    (:mod:`.models`), so a correct student rollout that took a rare order has a high
    student perplexity: that is what the student-guided weight (eq. 5) reads.
(b) errors differ in how far the teacher can follow them. A wrong rollout has an
    arithmetic slip (``12+9=20``), a skipped or repeated number, or a broken format.
    The teacher (good, not perfect) continues a slipped partial sum consistently but
    pays a large log-prob on the slip itself, and a skipped number or a broken line
    puts it off its training distribution; so its perplexity differs between wrong
    rollouts, which is what the teacher-guided weight (eq. 4) reads.
(c) solutions are long enough to diverge: 5 numbers give 4 steps (about 45 characters),
    each step's partial sum depends on the order chosen.

    prompt:      "Sum 7+5+9+3+8.\\n"
    left:        "7+5=12\\n12+9=21\\n21+3=24\\n24+8=32\\n\\boxed{32}"
    right:       "8+3=11\\n11+9=20\\n20+5=25\\n25+7=32\\n\\boxed{32}"
    pairs:       "7+5=12\\n9+3=12\\n12+12=24\\n24+8=32\\n\\boxed{32}"

The reward is the outcome only: the last ``\\boxed{}`` against the gold sum (the ``math``
verifier, or :func:`verify_sum_answer` without dependencies). :func:`solution_strategy`
says which strategy a completion wrote, for diagnostics, never for the reward.

Datasets have the columns TRL consumes, ``"prompt"`` and ``"answer"`` (gold sum as a
decimal string). Train and test are disjoint up to reordering: a problem's split is a
stable hash of its sorted numbers, so no permutation of a test problem is trained on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .task import verify_toy_answer

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "STRATEGIES",
    "SumProblem",
    "parse_sum_prompt",
    "solution_strategy",
    "sum_dataset",
    "sum_max_completion_chars",
    "sum_problems",
    "sum_solution",
    "verify_sum_answer",
]

STRATEGIES = ("left", "right", "pairs")
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
DEFAULT_TERMS = 5
_PROMPT_RE = re.compile(r"^Sum ([1-9](?:\+[1-9])+)\.\n$")


@dataclass(frozen=True)
class SumProblem:
    """The sum of ``numbers`` (each 1..9, at least two)."""

    numbers: tuple[int, ...]

    def __post_init__(self):
        if len(self.numbers) < 2 or any(not isinstance(n, int) or not 1 <= n <= 9 for n in self.numbers):
            raise ValueError(f"a sum problem needs at least two numbers in 1..9, got {self.numbers!r}")

    @property
    def prompt(self) -> str:
        return "Sum " + "+".join(map(str, self.numbers)) + ".\n"

    @property
    def answer(self) -> str:
        return str(sum(self.numbers))

    @property
    def split(self) -> str:
        return _split_of(self.numbers)


def parse_sum_prompt(prompt: str) -> SumProblem:
    """Inverse of ``SumProblem.prompt``; raises ``ValueError`` on anything else."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"not a sum prompt: {prompt!r}")
    return SumProblem(tuple(int(n) for n in match.group(1).split("+")))


def _steps(numbers: tuple[int, ...], strategy: str) -> list[tuple[int, int]]:
    """The (left operand, right operand) of each written step."""
    if strategy == "left":
        order = list(numbers)
    elif strategy == "right":
        order = list(reversed(numbers))
    elif strategy == "pairs":
        # Neighbouring pairs first, then the partial sums left to right, then an odd last number.
        steps, partials = [], []
        for i in range(0, len(numbers) - 1, 2):
            steps.append((numbers[i], numbers[i + 1]))
            partials.append(numbers[i] + numbers[i + 1])
        if len(numbers) % 2:
            partials.append(numbers[-1])
        total = partials[0]
        for value in partials[1:]:
            steps.append((total, value))
            total += value
        return steps
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    steps, total = [], order[0]
    for value in order[1:]:
        steps.append((total, value))
        total += value
    return steps


def sum_solution(problem: SumProblem | str, strategy: str = "left") -> str:
    """The completion a perfect model writes with ``strategy`` (no EOS), ending with ``\\boxed{sum}``."""
    if isinstance(problem, str):
        problem = parse_sum_prompt(problem)
    lines = [f"{x}+{y}={x + y}\n" for x, y in _steps(problem.numbers, strategy)]
    return "".join(lines) + f"\\boxed{{{problem.answer}}}"


def solution_strategy(problem: SumProblem | str, completion: str) -> str | None:
    """The strategy whose exact solution ``completion`` is (trailing whitespace ignored), else ``None``.

    For two numbers ``left`` and ``pairs`` write the same text; the first match in
    :data:`STRATEGIES` order is returned.
    """
    if isinstance(problem, str):
        problem = parse_sum_prompt(problem)
    text = completion.rstrip()
    for strategy in STRATEGIES:
        if text == sum_solution(problem, strategy):
            return strategy
    return None


def sum_max_completion_chars(terms: int = DEFAULT_TERMS) -> int:
    """The longest :func:`sum_solution` of ``terms`` nines over all strategies (tokens with the char tokenizer)."""
    nines = SumProblem((9,) * terms)
    return max(len(sum_solution(nines, s)) for s in STRATEGIES)


def _split_of(numbers: tuple[int, ...]) -> str:
    # The sorted numbers: every reordering of a problem lands in the same split.
    return _split_of_sorted(tuple(sorted(numbers)))


@functools.lru_cache(maxsize=None)
def _split_of_sorted(numbers: tuple[int, ...]) -> str:
    key = "+".join(map(str, numbers)).encode()
    unit = int.from_bytes(hashlib.sha256(b"sums/" + key).digest()[:8], "big") / 2**64
    return "test" if unit < TEST_FRACTION else "train"


_POOLS: dict[tuple[str, int], list[tuple[int, ...]]] = {}


def _pool(split: str, terms: int) -> list[tuple[int, ...]]:
    if (split, terms) not in _POOLS:
        if not 2 <= terms <= 6:
            raise ValueError(f"terms must be in 2..6 (9**terms problems are enumerated), got {terms}")
        problems = [numbers for numbers in itertools.product(range(1, 10), repeat=terms) if _split_of(numbers) == split]
        _POOLS[(split, terms)] = problems
    return _POOLS[(split, terms)]


def sum_problems(split: str = "train", n: int | None = None, seed: int = 0, terms: int = DEFAULT_TERMS) -> list[SumProblem]:
    """``n`` distinct problems of ``split`` in a seeded random order (``n=None``: the whole split).

    Raises ``ValueError`` for an unknown split or more problems than the split holds.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = _pool(split, terms)
    if n is None:
        n = len(pool)
    if n > len(pool):
        raise ValueError(f"the {terms}-number {split} split has {len(pool)} problems, asked for {n}")
    return [SumProblem(numbers) for numbers in random.Random(f"scope-opd-sums/{split}/{terms}/{seed}").sample(pool, n)]


def sum_dataset(split: str = "train", n: int | None = None, seed: int = 0, terms: int = DEFAULT_TERMS) -> Dataset:
    """A ``datasets.Dataset`` with columns ``"prompt"`` and ``"answer"`` (see :func:`sum_problems`)."""
    from datasets import Dataset

    problems = sum_problems(split, n, seed, terms)
    return Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})


def verify_sum_answer(completion: str, gold: str) -> float:
    """1.0 if the last ``\\boxed{...}`` equals the gold sum (the chain is not graded), else 0.0."""
    return verify_toy_answer(completion, gold)
