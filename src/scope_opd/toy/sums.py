"""The second toy task: a sum of several one-digit numbers, rewritten line by line in one of several orders.

Why this task (issue: the addition toy cannot tell SCOPE from OPD), mechanism by mechanism:

(a) correct solutions differ. Each line rewrites the whole remaining sum with neighbouring
    terms replaced by their sum, until one number is left. Addition is commutative and
    associative, so a problem has several valid solutions; three strategies are defined
    (:data:`STRATEGIES`): ``left`` adds the first two terms, ``right`` the last two,
    ``pairs`` every neighbouring pair at once (fewer, shorter lines). The student is
    pre-trained on a skewed mix (mostly ``left``), the teacher on all three evenly
    (:mod:`.models`), so a correct student rollout that took a rare order has a high
    student perplexity: that is what the student-guided weight (eq. 4) reads.
(b) errors differ in how far the teacher can follow them. A wrong rollout has an
    arithmetic slip (``12+9+3+8`` then ``20+3+8``), a dropped or repeated term, or a
    broken line. After a slip the rest of the line is copied and the later steps are
    local, so the teacher (good, not perfect) follows the slipped chain consistently and
    pays only on the slip; a dropped term or a broken line puts it off its training
    distribution. Its perplexity differs between wrong rollouts: what the teacher-guided
    weight (eq. 5) reads.
(c) rollouts diverge: the first line fixes the order and every later line depends on it.
    With the default 4 numbers (:data:`DEFAULT_TERMS`) a solution has 2 or 3 lines, at most
    22 characters; 5 numbers were measured too (the teacher needs more steps and more of its
    correct samples are compensating slips; see :mod:`.models`).

    prompt:      "7+5+9+3\n"
    left:        "12+9+3\n21+3\n\\boxed{24}"
    right:       "7+5+12\n7+17\n\\boxed{24}"
    pairs:       "12+12\n\\boxed{24}"

Why rewriting lines rather than "7+5=12\n12+9=21\n...": in that earlier format every
step has to find the next unused number in the prompt by its position, which a 2-layer
teacher learnt only to 39% Avg@8 in 1200 SFT steps; here the operands of each step are
at a fixed place in the line above (its start, its end, or every pair), and the rest of
the line is a copy (73% Avg@8 in 1300 steps; measured in :mod:`.models`).

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
    "DEFAULT_TERMS",
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
# Numbers per problem in the demo and the default recipe (``sums-v4``).
DEFAULT_TERMS = 4
_PROMPT_RE = re.compile(r"([1-9](?:\+[1-9])+)\n")


@dataclass(frozen=True)
class SumProblem:
    """The sum of ``numbers`` (each 1..9, at least two)."""

    numbers: tuple[int, ...]

    def __post_init__(self):
        if len(self.numbers) < 2 or any(not isinstance(n, int) or not 1 <= n <= 9 for n in self.numbers):
            raise ValueError(f"a sum problem needs at least two numbers in 1..9, got {self.numbers!r}")

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.numbers)) + "\n"

    @property
    def answer(self) -> str:
        return str(sum(self.numbers))

    @property
    def split(self) -> str:
        return _split_of(self.numbers)


def parse_sum_prompt(prompt: str) -> SumProblem:
    """Inverse of ``SumProblem.prompt``; raises ``ValueError`` on anything else."""
    match = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"not a sum prompt: {prompt!r}")
    return SumProblem(tuple(int(n) for n in match.group(1).split("+")))


def _lines(numbers: tuple[int, ...], strategy: str) -> list[tuple[int, ...]]:
    """The terms of each written line, down to the single total."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    terms, lines = list(numbers), []
    while len(terms) > 1:
        if strategy == "left":
            terms = [terms[0] + terms[1], *terms[2:]]
        elif strategy == "right":
            terms = [*terms[:-2], terms[-2] + terms[-1]]
        else:  # pairs: every neighbouring pair at once, an odd last term carried over
            terms = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)] + terms[len(terms) - len(terms) % 2 :]
        lines.append(tuple(terms))
    return lines


def sum_solution(problem: SumProblem | str, strategy: str = "left") -> str:
    """The completion a perfect model writes with ``strategy`` (no EOS): one line per rewrite, the last ``\\boxed{sum}``."""
    if isinstance(problem, str):
        problem = parse_sum_prompt(problem)
    *steps, (total,) = _lines(problem.numbers, strategy)
    return "".join("+".join(map(str, terms)) + "\n" for terms in steps) + f"\\boxed{{{total}}}"


def solution_strategy(problem: SumProblem | str, completion: str) -> str | None:
    """The strategy whose exact solution ``completion`` is (trailing whitespace ignored), else ``None``.

    With two or three numbers ``pairs`` writes ``left``'s text; the first match in
    :data:`STRATEGIES` order is returned. From four numbers on the three texts always differ.
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
