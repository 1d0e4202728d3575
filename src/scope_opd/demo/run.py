"""The whole demo (:func:`run_demo`): plan the jobs, build the toy models, run the jobs, write the outputs.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..version import provenance
from .jobs import Job, JobContext, quiet_libraries
from .plots import plot_curves, plot_pass_at_k
from .report import render_report
from .settings import ABLATIONS, DEFAULT_SEEDS, DemoSettings, METHODS, log, task_settings
from .summary import summarize
from .workers import Progress, WorkerPool


def plan_jobs(methods: dict[str, dict], seeds: int, settings: DemoSettings) -> list[Job]:
    """The demo's jobs, longest first: training runs (seeds with a held-out curve first), then the
    base / teacher evaluations and the recovery study, which fill the last gaps."""
    ordered_seeds = sorted(range(seeds), key=lambda s: (s >= settings.curve_seeds, s))
    runs = [(seed, name) for seed in ordered_seeds for name in methods]
    jobs = [Job("train", name, seed, tuple(sorted(methods[name].items())), index)
            for index, (seed, name) in enumerate(runs, start=1)]
    jobs += [Job("eval", "base"), Job("eval", "teacher")]
    if settings.recovery:
        jobs.append(Job("recovery", "recovery"))
    return jobs


def demo_methods(only: tuple[str, ...] = METHODS, ablations: bool = False, taus=()) -> dict[str, dict]:
    """Method name -> trainer overrides; raises ``ValueError`` naming an unknown method."""
    unknown = [m for m in only if m not in METHODS]
    if unknown or not only:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(only)}")
    methods: dict[str, dict] = {m: {"algorithm": m} for m in METHODS if m in only}
    if ablations:
        methods.update({name: {"algorithm": "scope", **o} for name, o in ABLATIONS.items()})
    for tau in taus:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        if tau != 1.0:
            methods[f"scope-tau{tau:g}"] = {"algorithm": "scope", "tau": tau}
    return methods


def run_demo(out: Path, *, seeds: int | None = None, ablations: bool = False, taus=(),
             settings: DemoSettings | None = None, only: tuple[str, ...] = METHODS, workers: int = 2) -> dict:
    """The whole demo; returns the ``results.json`` dictionary (also written to ``out``)."""
    from ..toy.models import ensure_toy_models

    settings = settings or task_settings()
    seeds = DEFAULT_SEEDS[settings.task] if seeds is None else seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    methods = demo_methods(only, ablations, taus)
    quiet_libraries()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = plan_jobs(methods, seeds, settings)
    workers = min(workers, len(jobs))
    with WorkerPool(workers, settings) as pool:
        log(f"toy models ({settings.task} task, {'quick' if settings.quick else 'default'} recipe): building if "
             f"missing{f' (meanwhile {workers} worker processes start)' if workers > 1 else ''}")
        paths = ensure_toy_models(quick=settings.quick, task=settings.task)
        build_seconds = time.perf_counter() - started
        log(f"teacher {paths.teacher}, student {paths.student} ({build_seconds:.0f}s)")
        ctx = JobContext(settings=settings, teacher=str(paths.teacher), student=str(paths.student), out=str(out),
                         runs=sum(j.kind == "train" for j in jobs))
        log(f"{ctx.runs} training runs ({len(methods)} methods x {seeds} seeds; {settings.steps} steps x "
             f"{settings.prompts_per_step} prompts x {settings.rollouts} rollouts each), each evaluated with "
             f"{settings.k} samples on {settings.test_problems} held-out problems; {workers} worker "
             f"process{'es' if workers > 1 else ''}, {settings.threads} torch "
             f"thread{'s' if settings.threads > 1 else ''} each")
        results = pool.run(jobs, ctx, Progress(jobs, settings.steps, workers))
    summary = summarize(results, jobs, methods, seeds, settings, paths)
    summary["run"] = {"workers": workers, "build_seconds": build_seconds,
                      "load_average_at_end": list(os.getloadavg())}
    summary["wall_seconds"] = time.perf_counter() - started
    # Versions, machine, commit: other torch / transformers versions give other numbers for the same seeds.
    summary["provenance"] = provenance()

    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_pass_at_k(summary, out / "pass_at_k.png")
    plot_curves(summary, out / "training_curves.png")
    report = render_report(summary)
    (out / "report.md").write_text(report)
    print(report)
    log(f"done in {summary['wall_seconds'] / 60:.1f} min; outputs in {out}")
    return summary
