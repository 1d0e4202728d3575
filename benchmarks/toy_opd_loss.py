"""SCOPE with each ``opd_loss`` on the toy task: Avg@k / Pass@k paired over seeds, and each option's step time and memory.

Quality: the demo's own pipeline (``scope_opd.demo``: toy models, budget, evaluation, paired 95% intervals over
seeds), with three methods that differ only in ``opd_loss``: ``scope`` (``sampled``, the paper),
``scope-topk_reverse`` and ``scope-topk_forward`` (``teacher_top_k`` 20). Each top-k option is compared with
``scope`` on the same seeds (``<option>-scope``: mean paired difference and its 95% interval, in points).

Cost: for each option, a fresh child process trains the toy student for ``--cost-steps`` steps at the demo's
batch (8 prompts x 8 rollouts) and reports the mean ``step_time`` TRL logs (steps after the first) and the peak
resident memory of ``trainer.train()`` above what was in use before it (``benchmarks/_memory.py``).

    python benchmarks/toy_opd_loss.py                 # 3 seeds, the demo's default budget (sums task)
    python benchmarks/toy_opd_loss.py --quick         # seconds: quick toy models, 2 steps (a smoke run)

Not part of ``scope demo`` (whose methods stay the paper's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import MIB, peak_memory_of

OPD_LOSSES = ("sampled", "topk_reverse", "topk_forward")


def method_name(opd_loss: str) -> str:
    return "scope" if opd_loss == "sampled" else f"scope-{opd_loss}"


def quality(out: Path, seeds: int, settings, workers: int) -> dict:
    """The demo's jobs for the three methods; returns its summary (``results.json``'s dictionary)."""
    from scope_opd.demo.jobs import JobContext, quiet_libraries
    from scope_opd.demo.run import plan_jobs
    from scope_opd.demo.summary import summarize
    from scope_opd.demo.workers import Progress, WorkerPool
    from scope_opd.toy.models import ensure_toy_models

    methods = {method_name(loss): {"algorithm": "scope", "opd_loss": loss} for loss in OPD_LOSSES}
    methods["scope"] = {"algorithm": "scope"}  # exactly the demo's scope run
    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(methods, seeds, settings)
    with WorkerPool(min(workers, len(jobs)), settings) as pool:
        paths = ensure_toy_models(quick=settings.quick, task=settings.task)
        ctx = JobContext(settings=settings, teacher=str(paths.teacher), student=str(paths.student), out=str(out),
                         runs=sum(j.kind == "train" for j in jobs))
        results = pool.run(jobs, ctx, Progress(jobs, settings.steps, min(workers, len(jobs))))
    summary = summarize(results, jobs, methods, seeds, settings, paths)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def cost_child(opd_loss: str, settings, steps: int, out_file: str) -> None:
    """Child process: train ``steps`` steps with ``opd_loss``; write the mean step time and the peak memory."""
    from dataclasses import replace

    from scope_opd.demo.jobs import JobContext, _task_dataset, quiet_libraries, train_one
    from scope_opd.toy.models import ensure_toy_models

    torch.set_num_threads(1)
    quiet_libraries()
    settings = replace(settings, steps=steps, train_problems=max(settings.train_problems, steps * settings.prompts_per_step))
    paths = ensure_toy_models(quick=settings.quick, task=settings.task)
    ctx = JobContext(settings=settings, teacher=str(paths.teacher), student=str(paths.student), out=tempfile.mkdtemp(),
                     runs=1)
    dataset = _task_dataset(settings.task, settings.train_problems, seed=0)
    overrides = {"algorithm": "scope", "opd_loss": opd_loss}
    (_, _, history, _), peak, seconds = peak_memory_of(
        torch.device("cpu"), lambda: train_one(method_name(opd_loss), overrides, 0, ctx, dataset, settings,
                                               Path(ctx.out)))
    step_times = [h["step_time"] for h in history if "step_time" in h][1:] or [math.nan]
    with open(out_file, "w") as f:
        json.dump({"peak_bytes": peak, "seconds": seconds, "step_time": sum(step_times) / len(step_times),
                   "steps": len(step_times)}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="quick toy models and a 2-step budget (smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cost-steps", type=int, default=6, help="training steps per option for the cost figures")
    parser.add_argument("--skip-quality", action="store_true", help="only the step time and memory")
    parser.add_argument("--out", default=None, help="where results.json goes (default: a temporary folder)")
    parser.add_argument("--child", choices=OPD_LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from scope_opd.demo.settings import quick_settings, task_settings

    settings = quick_settings() if args.quick else task_settings()
    if args.child:
        cost_child(args.child, settings, args.cost_steps, args.child_out)
        return

    started = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    costs = {}
    with tempfile.TemporaryDirectory(prefix="toy_opd_loss_") as tmp:
        for loss in OPD_LOSSES:
            out = os.path.join(tmp, loss + ".json")
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", loss, "--child-out", out]
            subprocess.run(child, check=True)
            with open(out) as f:
                costs[loss] = json.load(f)
    print(f"cost: {args.cost_steps} steps of {settings.prompts_per_step} prompts x {settings.rollouts} rollouts, "
          f"1 thread, each option in a fresh process (load average {os.getloadavg()[0]:.1f} after)")
    for loss in OPD_LOSSES:
        c = costs[loss]
        print(f"  {loss:>13}: step time {c['step_time']:.2f} s (mean of {c['steps']} steps after the first), "
              f"peak {c['peak_bytes'] / MIB:,.0f} MiB above the loaded process")
    if args.skip_quality:
        return

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="toy_opd_loss_runs_"))
    summary = quality(out, args.seeds, settings, args.workers)
    k = settings.k
    print(f"quality: {settings.task} task, {settings.steps} steps, {args.seeds} seeds, Avg@{k} / Pass@{k} on "
          f"{settings.test_problems} held-out problems (mean +- std over seeds; results in {out})")
    for loss in OPD_LOSSES:
        m = summary["methods"][method_name(loss)]
        print(f"  {loss:>13}: Avg@{k} {m['avg']:.1f} +- {m['avg_std']:.1f}, Pass@{k} {m['pass']:.1f} +- {m['pass_std']:.1f}")
    for loss in OPD_LOSSES[1:]:
        c = summary["comparisons"][f"{method_name(loss)}-scope"]
        print(f"  {loss} - sampled (paired, n={c['n']}): Avg@{k} {c['avg_diff']:+.1f} [{c['ci95'][0]:+.1f}, "
              f"{c['ci95'][1]:+.1f}], Pass@{k} {c['pass_diff']:+.1f} [{c['pass_ci95'][0]:+.1f}, {c['pass_ci95'][1]:+.1f}]")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
