"""Build (once) the word-problem teacher: SmolLM2-135M-Instruct fine-tuned on worked solutions ending in \\boxed{}.

The teacher of the real-model runs is the student's own backbone after a short SFT on the offline word problems'
worked solutions (scope_opd.tasks.word_problems, train split): prompt = the chat template over the question and
the paper's boxed instruction, target = the solution + <|im_end|>, loss on the target tokens only. It is then right
more often than the base model, which reasons at length and almost never writes \\boxed{}.

Cached at ${SCOPE_CACHE:-~/.cache/scope-opd}/<--out> (default smollm2-word-problems-teacher; built in a temporary
folder and renamed, under a lock; `.complete` holds the recipe, and a change of recipe rebuilds). Prints the folder
as its last stdout line.

The same script builds the real-model runs' sometimes-right student: a shorter SFT of the same recipe (same seed,
so its batches are the first ones the teacher's run sees), cached under another name:

  nice -n 10 python scripts/word_problems_teacher.py [--base DIR] [--steps 12] [--threads 1]
  nice -n 10 python scripts/word_problems_teacher.py --steps 4 --out smollm2-word-problems-student
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def recipe(args) -> dict:
    return {"base": "smollm2-135m-instruct", "task": "word_problems train seed 0", "rows": args.rows,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": 0, "format": 1}


def build(base: str, out: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_opd.tasks.word_problems import word_problems

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    rows = word_problems("train", args.rows, seed=0)
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        target = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((list(prompt), target))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = random.Random(0)
    losses, start = [], time.time()
    for step in range(args.steps):
        batch = order.sample(examples, args.batch)
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.eos_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, t) in enumerate(batch):  # right padding: training, not generation
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
            mask[i, : len(p) + len(t)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)", file=sys.stderr)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "train_seconds": round(time.time() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="SmolLM2 checkpoint (default: scripts/smollm2.sh's)")
    parser.add_argument("--rows", type=int, default=960, help="distinct train problems")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="smollm2-word-problems-teacher",
                        help="folder name under ${SCOPE_CACHE:-~/.cache/scope-opd}")
    args = parser.parse_args()
    cache = Path(os.environ.get("SCOPE_CACHE", Path.home() / ".cache" / "scope-opd"))
    if not args.out or "/" in args.out or args.out.startswith("."):
        parser.error(f"--out must be a plain folder name under {cache}, got {args.out!r}")
    import torch

    torch.set_num_threads(args.threads)
    base = args.base or subprocess.run(["bash", str(REPO / "scripts" / "smollm2.sh")], check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = cache / args.out
    stamp = json.dumps(recipe(args), sort_keys=True)

    def complete() -> bool:
        return (out / ".complete").is_file() and (out / ".complete").read_text() == stamp

    if not complete():
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{args.out}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not complete():
                for leftover in cache.glob(f".{args.out}-build.*"):  # a killed build's; we hold the lock
                    shutil.rmtree(leftover, ignore_errors=True)
                start = time.time()
                staging = Path(tempfile.mkdtemp(prefix=f".{args.out}-build.", dir=cache))
                try:
                    info = build(base, staging, args)
                    info["build_seconds"] = round(time.time() - start, 1)
                    (staging / "build_info.json").write_text(json.dumps({**recipe(args), **info}, indent=1))
                    (staging / ".complete").write_text(stamp)
                    shutil.rmtree(out, ignore_errors=True)
                    staging.rename(out)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                print(f"built {out}: {info}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
