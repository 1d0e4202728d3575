"""dual_path_weights (vectorised) vs a per-sample Python loop, measured side by side.

The loop mirrors the authors' release: walk the rows, bucket them by prompt and
path in Python dicts, then one softmax per group-path. Both run on the same
inputs, interleaved, in this process; the script prints medians and the ratio.

    python benchmarks/bench_weights.py [--prompts 256] [--rollouts 8] [--repeats 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

import torch

from scope_opd import dual_path_weights


def loop_weights(group_ids, correct, student_mean_logp, teacher_mean_logp, tau=1.0):
    batch = len(group_ids)
    student_weights = torch.zeros(batch)
    teacher_weights = torch.zeros(batch)
    buckets = defaultdict(lambda: ([], []))
    for i in range(batch):
        buckets[int(group_ids[i])][0 if bool(correct[i]) else 1].append(i)
    for correct_rows, incorrect_rows in buckets.values():
        if correct_rows:
            idx = torch.tensor(correct_rows)
            student_weights[idx] = torch.softmax(-student_mean_logp[idx] / tau, 0) * len(correct_rows)
        if incorrect_rows:
            idx = torch.tensor(incorrect_rows)
            teacher_weights[idx] = torch.softmax(teacher_mean_logp[idx] / tau, 0) * len(incorrect_rows)
    return student_weights, teacher_weights


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    batch = args.prompts * args.rollouts
    group_ids = torch.arange(args.prompts).repeat_interleave(args.rollouts)
    group_ids = group_ids[torch.randperm(batch, generator=gen)]  # rows arrive shuffled
    correct = torch.rand(batch, generator=gen) < 0.4
    student = -torch.rand(batch, generator=gen) * 2
    teacher = -torch.rand(batch, generator=gen) * 2
    dev = torch.device(args.device)
    inputs_dev = [t.to(dev) for t in (group_ids, correct, student, teacher)]

    def vectorised():
        out = dual_path_weights(*inputs_dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    def loop():
        return loop_weights(group_ids, correct, student, teacher)

    ref = loop()
    got = vectorised()
    torch.testing.assert_close(got[0].cpu(), ref[0])
    torch.testing.assert_close(got[1].cpu(), ref[1])

    for fn in (vectorised, loop):  # warm-up
        fn()
    vec_times, loop_times = [], []
    for _ in range(5):  # interleave so machine noise hits both alike
        vec_times.append(median_seconds(vectorised, args.repeats))
        loop_times.append(median_seconds(loop, max(3, args.repeats // 10)))
    vec, lp = statistics.median(vec_times), statistics.median(loop_times)
    print(f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__} threads {torch.get_num_threads()} device {dev}")
    print(f"batch: {args.prompts} prompts x {args.rollouts} rollouts = {batch} rows")
    print(f"dual_path_weights (vectorised): {vec * 1e3:.3f} ms")
    print(f"per-sample python loop        : {lp * 1e3:.3f} ms")
    print(f"speed-up: {lp / vec:.1f}x")


if __name__ == "__main__":
    main()
