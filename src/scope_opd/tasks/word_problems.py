"""Grade-school word problems, generated offline from a seed, for real-model runs (SmolLM2).

Each problem is one of a few story templates with small random numbers, one or two arithmetic
steps, and an integer gold answer. The prompt ends with the paper's instruction (configs/paper:
"Please reason step by step, and put your final answer within \\boxed{}."), so ``verifier: math``
scores completions as the paper's runs do. A worked solution (the steps, then ``\\boxed{answer}``)
comes with each problem: it is what the SFT teacher (scripts/word_problems_teacher.py) learns from.

Splits are disjoint by construction: a problem's split is a hash of its text (about one in five
texts is a test problem), so a text never appears in both, whatever the seeds and sizes.

  python -m scope_opd.tasks.word_problems --split train --n 200 --out train.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SPLITS = ("train", "test")
TEST_SHARE = 5  # one text hash in TEST_SHARE is a test problem

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe"]


def _buy_more(r):
    n, a, b = r.choice(NAMES), r.randint(2, 20), r.randint(2, 20)
    q = f"{n} has {a} apples and buys {b} more. How many apples does {n} have now?"
    return q, f"{n} starts with {a} apples and buys {b} more: {a} + {b} = {a + b}.", a + b


def _give_away(r):
    n, a = r.choice(NAMES), r.randint(10, 40)
    b = r.randint(1, a - 1)
    q = f"{n} had {a} stickers and gave {b} of them to a friend. How many stickers does {n} have left?"
    return q, f"{n} gives away {b} of {a} stickers: {a} - {b} = {a - b}.", a - b


def _boxes(r):
    boxes, per = r.randint(2, 9), r.randint(2, 12)
    q = f"A shop has {boxes} boxes with {per} pencils in each box. How many pencils does the shop have?"
    return q, f"{boxes} boxes of {per} pencils: {boxes} x {per} = {boxes * per}.", boxes * per


def _share(r):
    kids, each = r.randint(2, 8), r.randint(2, 9)
    total = kids * each
    q = f"{total} cookies are shared equally among {kids} children. How many cookies does each child get?"
    return q, f"{total} cookies among {kids} children: {total} / {kids} = {each}.", each


def _buy_then_eat(r):
    n, a, b = r.choice(NAMES), r.randint(3, 15), r.randint(3, 15)
    c = r.randint(1, a + b - 1)
    q = f"{n} has {a} candies, gets {b} more, and then eats {c}. How many candies are left?"
    s = f"After getting more: {a} + {b} = {a + b}. After eating {c}: {a + b} - {c} = {a + b - c}."
    return q, s, a + b - c


def _cost(r):
    n, items, price, paid_extra = r.choice(NAMES), r.randint(2, 6), r.randint(2, 9), r.randint(1, 20)
    paid = items * price + paid_extra
    q = f"{n} buys {items} notebooks that cost {price} dollars each and pays with {paid} dollars. How much change does {n} get?"
    s = f"The notebooks cost {items} x {price} = {items * price} dollars. Change: {paid} - {items * price} = {paid_extra}."
    return q, s, paid_extra


def _rows_plus(r):
    rows, per, extra = r.randint(2, 7), r.randint(3, 10), r.randint(1, 9)
    q = f"A garden has {rows} rows of {per} flowers and {extra} more flowers by the gate. How many flowers are there?"
    s = f"The rows hold {rows} x {per} = {rows * per} flowers. With the gate: {rows * per} + {extra} = {rows * per + extra}."
    return q, s, rows * per + extra


TEMPLATES = [_buy_more, _give_away, _boxes, _share, _buy_then_eat, _cost, _rows_plus]


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if digest[0] % TEST_SHARE == 0 else "train"


def word_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct problems of ``split``: rows with ``prompt`` (question + the boxed instruction),
    ``answer`` (the integer, as text), ``question`` and ``solution`` (worked steps ending in \\boxed{})."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"word-problems/{seed}")
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct {split} problems (got {len(rows)}); ask for fewer")
        question, steps, answer = rng.choice(TEMPLATES)(rng)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        rows.append({
            "prompt": f"{question}\n{BOXED_INSTRUCTION}",
            "answer": str(answer),
            "question": question,
            "solution": f"{steps} The answer is \\boxed{{{answer}}}.",
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scope_opd.tasks.word_problems", description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--n", type=int, required=True, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSONL file (default: stdout)")
    args = parser.parse_args(argv)
    rows = word_problems(args.split, args.n, args.seed)
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    finally:
        if args.out:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
