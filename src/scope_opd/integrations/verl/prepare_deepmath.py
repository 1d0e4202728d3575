"""Write DeepMath-103K as verl's RL parquet files (``prompt`` chat, ``data_source``, ``reward_model``).

    python -m scope_opd.integrations.verl.prepare_deepmath --out ~/data/deepmath103k

The prompt is the one of ``configs/paper/r1-distill-qwen-1.5b.yaml`` (the TRL run): the question
followed by the instruction to put the final answer in ``\\boxed{}``, as one user turn. A seeded
held-out slice of ``--val-size`` rows becomes ``val.parquet``. Downloads the dataset from the hub.
"""

from __future__ import annotations

import argparse
import os

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def to_verl_row(row: dict, index: int, split: str) -> dict:
    return {
        "data_source": "deepmath",
        "prompt": [{"role": "user", "content": f"{row['question']} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(row["final_answer"])},
        "extra_info": {"split": split, "index": index},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder for train.parquet and val.parquet")
    parser.add_argument("--dataset", default="zwhe99/DeepMath-103K")
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    import datasets

    data = datasets.load_dataset(args.dataset, split="train").shuffle(seed=args.seed)
    if not 0 < args.val_size < len(data):
        raise SystemExit(f"--val-size must be in (0, {len(data)}), got {args.val_size}")
    out = os.path.expanduser(args.out)
    os.makedirs(out, exist_ok=True)
    for split, part in (("val", data.select(range(args.val_size))), ("train", data.select(range(args.val_size, len(data))))):
        rows = part.map(lambda row, i: to_verl_row(row, i, split), with_indices=True, remove_columns=part.column_names)
        path = os.path.join(out, f"{split}.parquet")
        rows.to_parquet(path + ".tmp")
        os.replace(path + ".tmp", path)  # a killed run never leaves a half-written file under the final name
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
