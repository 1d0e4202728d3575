"""``scope demo``'s command line: options, their checks, and the entry point.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .run import run_demo
from .settings import DEFAULT_SEEDS, DEFAULT_TASK, DemoSettings, METHODS, TASKS, VERIFIERS, quick_settings, task_settings


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return names


def _taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive numbers, got {text!r}") from None
    if not taus or any(not (math.isfinite(t) and t > 0) for t in taus):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive numbers, got {text!r}")
    return taus


# Measured side by side on the 2-core machine (README, the demo): see --workers' help.
DEFAULT_WORKERS = 2


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--out", default="scope_demo", help="output folder (default: ./scope_demo)")
    parser.add_argument("--task", choices=TASKS, default=DEFAULT_TASK,
                        help="sums (default: four one-digit numbers, several valid solution orders, a skewed student) "
                             "or addition (2-digit, one solution format; the quick smoke test)")
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help="training seeds, paired across methods (default: 5 for sums, 3 for addition, 1 with "
                             "--quick)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run the paper's Fig. 5 ablations, each with a paired interval against SCOPE")
    parser.add_argument("--tau", type=_taus, default=[1.0],
                        help="comma-separated DPAW temperatures; values other than 1 add runs")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"training steps per method and seed (default {defaults.steps}; 2 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default {defaults.learning_rate}")
    parser.add_argument("--verifier", choices=VERIFIERS, default=defaults.verifier,
                        help="math (math-verify, default) or task (the toy task's own integer check of the last "
                             "\\boxed{}: the same verdicts here, cheaper)")
    parser.add_argument("--no-recovery", action="store_true", help="skip the error-recovery study of the teacher")
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny models, 2 steps; about a minute)")
    parser.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS,
                        help=f"processes running the (method, seed) jobs in parallel (default {DEFAULT_WORKERS}: on "
                             "2 CPU cores, 2 one-thread processes ran the default 2.1x faster than 1 when the machine "
                             "was otherwise idle, as fast when other jobs held the cores, and 1 process with 2 threads "
                             "was 3-6x slower); the results do not depend on it")
    parser.add_argument("--threads", type=_positive_int, default=defaults.threads,
                        help=f"torch CPU threads of each job (default {defaults.threads}); part of the result, "
                             "since reductions split differently")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    overrides = {"verifier": args.verifier, "threads": args.threads, "recovery": not args.no_recovery}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.learning_rate is not None:
        if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
            raise ValueError(f"--learning-rate must be a positive number, got {args.learning_rate}")
        overrides["learning_rate"] = args.learning_rate
    return (quick_settings if args.quick else task_settings)(args.task, **overrides)


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"scope demo: error: {err}", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else DEFAULT_SEEDS[args.task])
    run_demo(Path(args.out), seeds=seeds, ablations=args.ablations, taus=args.tau, settings=settings,
             only=args.methods, workers=args.workers)
    return 0
