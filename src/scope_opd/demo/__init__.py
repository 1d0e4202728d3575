"""`scope demo`: the paper's comparison (Table 1, Figs. 3-5) on a toy task, on CPU.

Tasks: ``sums`` (default; a sum of four one-digit numbers with several valid solution
orders and a skewed student, see :mod:`scope_opd.toy.sums`) and ``addition`` (``--task addition``; one
solution format, the quick smoke test).

Flow, the same code path a real run takes:

1. build (or reuse) the toy teacher and student (:func:`scope_opd.toy.models.ensure_toy_models`);
2. train the student with each method - SCOPE, OPD, GRPO through :class:`SCOPETrainer`,
   KD through :func:`scope_opd.kd.build_kd_trainer` - under the same budget (steps, prompts
   per step, rollouts per prompt, learning rate) and the same seeds. Seed ``s`` means the
   same initial student and the same training prompts for every method (paired design);
3. evaluate every result, the untrained student and the teacher on held-out problems with
   Avg@k / Pass@k (:func:`scope_opd.evaluation.evaluate_model`), and run the error-recovery
   study on the teacher (:func:`scope_opd.analysis.recovery.run_recovery_analysis`);
4. write ``results.json``, ``report.md`` (table, paired 95% intervals for SCOPE - OPD, OPD -
   GRPO, OPD - KD and each ablation - SCOPE, the verdict on the paper's ordering, the weight
   signals), ``pass_at_k.png`` (Fig. 4) and ``training_curves.png`` (Fig. 3).

Steps 2-3 are independent jobs, one per (method, seed) plus the base / teacher evaluations
and the recovery study, run by ``workers`` processes (:class:`~.workers.WorkerPool`). Every job is fully
determined by its own arguments (the trainer seeds itself from the seed; sampling for
evaluation uses fixed seeds inside a forked RNG) and runs with ``threads`` torch threads
whatever the number of workers, so the numbers do not depend on the scheduling.

Whatever ordering comes out is what the report says.

Where things are, one file per concern (each imports only the ones listed before it):

- :mod:`.settings`: methods, ablations, tasks, :class:`DemoSettings` (the budget and why);
- :mod:`.jobs`: one job: train one method on one seed and evaluate it, or an evaluation, or the recovery study;
- :mod:`.workers`: the spawned worker processes and the progress lines;
- :mod:`.summary`: ``results.json``: scores, paired comparisons, the verdict on the paper's ordering, signals;
- :mod:`.report`: ``report.md``; :mod:`.plots`: the two figures;
- :mod:`.run`: :func:`run_demo`, the whole demo; :mod:`.cli`: ``scope demo``'s options and entry point.

The toy task and models it trains on are :mod:`scope_opd.toy`, a lower floor: the demo uses them,
they never import the demo.
"""

from .cli import configure_parser, main, settings_from_args
from .run import demo_methods, plan_jobs, run_demo
from .settings import ABLATIONS, METHODS, DemoSettings, quick_settings, task_settings
from .summary import comparisons, paper_ordering, summarize

__all__ = [
    "ABLATIONS",
    "METHODS",
    "DemoSettings",
    "comparisons",
    "configure_parser",
    "demo_methods",
    "main",
    "paper_ordering",
    "plan_jobs",
    "quick_settings",
    "run_demo",
    "settings_from_args",
    "summarize",
    "task_settings",
]
