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
    cpu_start = time.process_time()
    (_, _, history, _), peak, seconds = peak_memory_of(
        torch.device("cpu"), lambda: train_one(method_name(opd_loss), overrides, 0, ctx, dataset, settings,
                                               Path(ctx.out)))
    cpu_per_step = (time.process_time() - cpu_start) / steps
    step_times = [h["step_time"] for h in history if "step_time" in h][1:] or [math.nan]
    with open(out_file, "w") as f:
        json.dump({"peak_bytes": peak, "seconds": seconds, "step_time": sum(step_times) / len(step_times),
                   "steps": len(step_times), "cpu_per_step": cpu_per_step}, f)


def print_quality(summary: dict, out) -> None:
    """The quality lines of a run (scores in %; paired differences in points with their 95% intervals)."""
    k, seeds = summary["k"], len(summary["seeds"])
    settings = summary["settings"]
    print(f"quality: {summary['task']} task, {settings['steps']} steps, {seeds} seeds, Avg@{k} / Pass@{k} on "
          f"{settings['test_problems']} held-out problems, % (mean +- std over seeds; results in {out})")
    timing = summary["timing_seconds"]
    for loss in OPD_LOSSES:
        name = method_name(loss)
        m = summary["methods"][name]
        cpu = [v["cpu"] for label, v in timing.items() if label.startswith(name + " seed")]
        print(f"  {loss:>13}: Avg@{k} {100 * m['avg']:.1f} +- {100 * m['avg_std']:.1f}, Pass@{k} {100 * m['pass']:.1f} "
              f"+- {100 * m['pass_std']:.1f}; per seed Avg@{k} {[round(100 * s['avg'], 1) for s in m['seeds']]}; "
              f"CPU seconds per run (train + eval) {sum(cpu) / max(len(cpu), 1):.0f}")
    for loss in OPD_LOSSES[1:]:
        c = summary["comparisons"][f"{method_name(loss)}-scope"]
        ci = lambda v: "n/a" if v is None else f"[{100 * v[0]:+.1f}, {100 * v[1]:+.1f}]"  # noqa: E731
        print(f"  {loss} - sampled (paired, n={c['n']}): Avg@{k} {100 * c['avg_diff']:+.1f} {ci(c['ci95'])}, "
              f"Pass@{k} {100 * c['pass_diff']:+.1f} {ci(c['pass_ci95'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="quick toy models and a 2-step budget (smoke run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cost-steps", type=int, default=6, help="training steps per option for the cost figures")
    parser.add_argument("--skip-quality", action="store_true", help="only the step time and memory")
    parser.add_argument("--from-results", help="print the quality lines of a finished run's results.json and stop")
    parser.add_argument("--out", default=None, help="where results.json goes (default: a temporary folder)")
    parser.add_argument("--child", choices=OPD_LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from scope_opd.demo.settings import quick_settings, task_settings

    settings = quick_settings() if args.quick else task_settings()
    if args.from_results:
        print_quality(json.loads(Path(args.from_results).read_text()), Path(args.from_results).parent)
        return
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
              f"{c['cpu_per_step']:.2f} CPU s per step (all steps, this process), "
              f"peak {c['peak_bytes'] / MIB:,.0f} MiB above the loaded process")
    if args.skip_quality:
        return

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="toy_opd_loss_runs_"))
    print_quality(quality(out, args.seeds, settings, args.workers), out)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
