"""`scope demo`: the paper's comparison (Table 1, Figs. 3-5) on a toy task, on CPU.

Tasks: ``sums`` (default; a sum of four one-digit numbers with several valid solution
orders and a skewed student, see :mod:`.sums`) and ``addition`` (``--task addition``; one
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
and the recovery study, run by ``workers`` processes (:class:`WorkerPool`). Every job is fully
determined by its own arguments (the trainer seeds itself from the seed; sampling for
evaluation uses fixed seeds inside a forked RNG) and runs with ``threads`` torch threads
whatever the number of workers, so the numbers do not depend on the scheduling.

Whatever ordering comes out is what the report says.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..version import provenance, provenance_lines

METHODS = ("scope", "opd", "grpo", "kd")
# Paper Fig. 5 ablations, as SCOPEConfig overrides.
ABLATIONS = {
    "scope-no-teacher-weight": dict(teacher_weighting="uniform"),
    "scope-no-student-weight": dict(student_weighting="uniform"),
    "scope-no-dpaw": dict(teacher_weighting="uniform", student_weighting="uniform"),
    "scope-reversed-teacher": dict(teacher_weighting="perplexity"),
    "scope-reversed-student": dict(student_weighting="inverse"),
}
# Paper section 6 headline (1.5B student, average of 6 maths benchmarks, Avg@32 / Pass@32), for the report.
PAPER_TABLE1 = {"base": (47.9, 73.1), "grpo": (49.6, 71.1), "kd": (45.4, 72.0), "opd": (52.3, 73.1), "scope": (55.2, 75.0)}
TASKS = ("sums", "addition")
DEFAULT_TASK = "sums"
DEFAULT_SEEDS = {"addition": 3, "sums": 5}
VERIFIERS = ("math", "task")
# Trainer metrics logged every step that item 2 of the demo's issue asks for (the dual-path weights' signal).
SIGNAL_KEYS = ("scope/student_weight_max", "scope/teacher_weight_max",
               "scope/frac_groups_student_weight_above_1.5", "scope/frac_groups_teacher_weight_above_1.5")


@dataclass
class DemoSettings:
    """The budget and protocol of one demo; every method and seed gets the same.

    The defaults are chosen from time and from the base / teacher accuracies only, never from
    a SCOPE - OPD difference: the default ``scope demo`` (sums task, 5 seeds, SCOPE / OPD / GRPO
    / KD) must finish within 15 minutes on a 2-core CPU machine from a fresh cache, the toy
    model build included (measurements in the README's demo section).
    """

    # Training budget per method and seed: steps x prompts_per_step prompts x rollouts samples.
    # 8 rollouts per prompt as in the paper (G = 8); 8 prompts per step gives 64 rollouts per
    # step, one generate() call. Steps, from time and accuracies only (never from a method gap):
    # 40 steps (sums-v3 models, 2 workers, load ~3) took 4.5 min from a fresh cache, half of it
    # the build, and left the rollouts far from saturating (~45% correct, ~85% of groups mixed;
    # base 43%, teacher 75% Avg@8). 80 steps on sums-v4 (base 36%, teacher 75%; rollouts ~36%
    # correct, ~89% of groups mixed): 4.1 min from a fresh cache (build 77 s, 20 runs 170 s) at
    # load 1-3, i.e. under a third of the 15-minute limit, the margin for a shared machine
    # (load 5-8 was measured to slow these runs 2-3x).
    steps: int = 80
    prompts_per_step: int = 8
    rollouts: int = 8
    # Constant, as in the paper's recipe; 1e-4 moves the 0.08M-parameter student visibly in
    # 40 steps without diverging (measured on the base accuracy's drift, not on any method gap).
    learning_rate: float = 1e-4
    # Rollout and evaluation temperature: the paper's 0.6 (with top-p 0.95, top-k 20).
    temperature: float = 0.6
    # Completion cap; None: the task's longest correct solution plus EOS and 4 tokens of slack,
    # rounded up to a multiple of 8 (the toy recipe's own, see :func:`_completion_cap`). A longer
    # rollout is truncated, hence wrong; a tight cap keeps rollouts and evaluation cheap.
    max_completion_length: int | None = None
    # Training prompts drawn (seeded) per seed; the run sees steps x prompts_per_step of them.
    train_problems: int = 2000
    # Held-out evaluation: test_problems x k samples, Avg@k and Pass@k for k = 1..k. 200 x 8
    # puts the standard error of one Avg@8 near 1.5 points for a 50% model; pairing removes
    # the problem-level variance shared by two methods of a seed.
    test_problems: int = 200
    k: int = 8
    # Sequences per generate() call when evaluating: bigger batches amortise the per-token
    # Python overhead of generate() on these tiny models (1600 samples measured 2x cheaper in
    # CPU at 256-512 than at 64). Changing it changes which samples are drawn.
    eval_batch_size: int = 400
    # Held-out accuracy during training (Fig. 3): every curve_every steps, curve_problems x
    # curve_samples samples, on the first curve_seeds seeds only (the plot shows seed 0; the
    # other seeds' curves cost a fifth of a run each and were never read).
    curve_every: int = 10
    curve_problems: int = 48
    curve_samples: int = 2
    curve_seeds: int = 1
    quick: bool = False
    # "sums" (several valid solution orders; see toy/sums.py) or "addition" (the smoke test).
    task: str = DEFAULT_TASK
    # "math" (math-verify, the verifier of real runs) or "task": the task's own integer check
    # of the last \boxed{} (toy.task.verify_toy_answer), which gives the same verdict on these
    # integer answers and costs microseconds instead of 1-2 ms per sample.
    verifier: str = "math"
    # torch intra-op threads of each job: part of the result (reductions split differently),
    # so fixed here and not derived from the number of workers.
    threads: int = 1
    # Run the error-recovery study (paper Sec. 2.2) on the task's teacher and untrained student.
    recovery: bool = True
    recovery_problems: int = 100
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.max_completion_length is None:
            self.max_completion_length = _completion_cap(self.task, self.quick)
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        for name in ("steps", "prompts_per_step", "rollouts", "test_problems", "k", "eval_batch_size", "curve_every",
                     "curve_problems", "curve_samples", "max_completion_length", "threads", "recovery_problems"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.curve_seeds < 0:
            raise ValueError(f"curve_seeds must be >= 0, got {self.curve_seeds!r}")
        if self.train_problems < self.steps * self.prompts_per_step:
            raise ValueError(f"train_problems ({self.train_problems}) must cover steps x prompts_per_step "
                             f"({self.steps} x {self.prompts_per_step})")


def _completion_cap(task: str, quick: bool = False) -> int:
    from .models import max_completion_tokens, recipe_for

    return -(-(max_completion_tokens(recipe_for(task, quick)) + 4) // 8) * 8


def task_settings(task: str = DEFAULT_TASK, **overrides) -> DemoSettings:
    """Default settings of ``task`` (the completion cap follows the task's longest solution)."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    return DemoSettings(**{"task": task, **overrides})


def quick_settings(task: str = DEFAULT_TASK, **overrides) -> DemoSettings:
    """The smoke run: quick (barely trained) toy models and a budget of seconds.

    The quick toy models are barely trained, so KD keeps unverified teacher samples too.
    """
    base = dict(steps=2, prompts_per_step=2, rollouts=4, train_problems=64, test_problems=8, k=8, eval_batch_size=64,
                curve_every=2, curve_problems=4, curve_samples=1, quick=True, recovery_problems=8,
                extra={"kd_keep_only_correct": False})
    return DemoSettings(**{**base, "task": task, **overrides})


def _log(message: str) -> None:
    print(f"[scope demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One unit of work: ``kind`` "train" (one method, one seed, then its evaluation), "eval"
    (``name`` "base" or "teacher"), or "recovery". ``index`` numbers the training runs 1..N."""

    kind: str
    name: str
    seed: int = 0
    overrides: tuple = ()
    index: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}" if self.kind == "train" else self.name


@dataclass(frozen=True)
class JobContext:
    """What every job needs besides itself; small and picklable (sent to each worker once)."""

    settings: DemoSettings
    teacher: str
    student: str
    out: str
    runs: int


def _problem_set(name: str, problems, settings: DemoSettings):
    from ..evaluation import Problem, ProblemSet

    return ProblemSet(name, [Problem(id=str(i), prompt=p.prompt, answer=p.answer) for i, p in enumerate(problems)],
                      verifier=_verifier_spec(settings))


def _verifier_spec(settings: DemoSettings) -> str:
    # The toy answers are integers; toy.task.verify_toy_answer compares the last \boxed{} by value.
    return "math" if settings.verifier == "math" else "scope_opd.toy.task:verify_toy_answer"


def _task_problems(task: str, split: str, n: int, seed: int):
    if task == "sums":
        from .sums import sum_problems

        return sum_problems(split, n, seed=seed)
    from .task import toy_problems

    return toy_problems(split, n, seed=seed)


def _task_dataset(task: str, n: int, seed: int):
    if task == "sums":
        from .sums import sum_dataset

        return sum_dataset("train", n, seed=seed)
    from .task import toy_dataset

    return toy_dataset("train", n, seed=seed)


def _test_set(settings: DemoSettings):
    return _problem_set("toy", _task_problems(settings.task, "test", settings.test_problems, seed=1234), settings)


def _curve_set(settings: DemoSettings):
    return _problem_set("toy", _task_problems(settings.task, "test", settings.curve_problems, seed=4321), settings)


@contextmanager
def _torch_threads(threads: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading and dataset-map bars; progress is reported by _log
    datasets.disable_progress_bars()
    # transformers 5.x renames gradient_checkpointing -> activation_checkpointing and warns each time
    # TRL 1.16 (pinned) uses the old names: 30 two-line warnings per demo, none of them actionable here.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def _warm_verifier(settings: DemoSettings) -> None:
    """One verification in this process before any verifier pool forks from it.

    math-verify builds its LaTeX parser on the first call (~0.3 s of CPU); RewardFunction forks
    its workers from this process, so they inherit the built parser instead of each paying for
    it (the trainer, every evaluation and every held-out curve point build a pool of their own).
    """
    from ..verifiers import get_verifier

    get_verifier(_verifier_spec(settings))("\\boxed{12}", "12")


def run_job(job: Job, ctx: JobContext, report) -> dict:
    """Run one job in this process and return its picklable result; ``report(event, job, **data)``
    is called at its start, every few training steps, and never after it returns."""
    settings = ctx.settings
    with _torch_threads(settings.threads):
        if job.kind == "train":
            return _train_and_evaluate(job, ctx, report)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        report("start", job)
        started, cpu = time.perf_counter(), time.process_time()
        tokenizer = AutoTokenizer.from_pretrained(ctx.student)
        if job.kind == "eval":
            model = AutoModelForCausalLM.from_pretrained(ctx.teacher if job.name == "teacher" else ctx.student)
            out = {"result": evaluate(model, tokenizer, _test_set(settings), settings, job.name)}
        elif job.kind == "recovery":
            student = AutoModelForCausalLM.from_pretrained(ctx.student)
            teacher = AutoModelForCausalLM.from_pretrained(ctx.teacher)
            out = {"recovery": _recovery_signal(student, teacher, tokenizer, settings)}
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
        return {**out, "seconds": {"eval": time.perf_counter() - started}, "cpu_seconds": time.process_time() - cpu}


def _train_and_evaluate(job: Job, ctx: JobContext, report) -> dict:
    settings = ctx.settings
    report("start", job)
    started, cpu = time.perf_counter(), time.process_time()
    train_dataset = _task_dataset(settings.task, settings.train_problems, seed=job.seed)
    curve_set = _curve_set(settings) if job.seed < settings.curve_seeds else None
    every = max(1, settings.steps // 4)

    from transformers import TrainerCallback

    class StepReport(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report("step", job, step=state.global_step, steps=state.max_steps,
                   show=state.global_step % every == 0 or state.global_step == state.max_steps)

    model, tokenizer, history, curve = train_one(job.name, dict(job.overrides), job.seed, ctx, train_dataset, settings,
                                                 Path(ctx.out), curve_set=curve_set, callbacks=(StepReport(),))
    trained = time.perf_counter()
    result = evaluate(model, tokenizer, _test_set(settings), settings, job.name)
    signals = {}
    if job.name == "scope":
        # A step without correct (or wrong) rollouts has no weight of that path to report.
        signals = {key: [h[key] for h in history if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
                   for key in SIGNAL_KEYS}
    return {
        "result": result,
        "curve": {"accuracy": curve,
                  "entropy": [{"step": h["step"], "entropy": h["entropy"]} for h in history
                              if "entropy" in h and "step" in h]},
        "diagnostics": _training_diagnostics(history),
        "signals": signals,
        "seconds": {"train": trained - started, "eval": time.perf_counter() - trained},
        # This process's CPU, not its verifier processes': with the wall time, how contended the machine was.
        "cpu_seconds": time.process_time() - cpu,
    }


def _curve_callback(problem_set, tokenizer, settings: DemoSettings, curve: list):
    """A TrainerCallback sampling a small held-out set every ``curve_every`` steps (Fig. 3)."""
    from transformers import TrainerCallback

    from ..evaluation import SamplingSettings, evaluate_model

    sampling = SamplingSettings(n=settings.curve_samples, temperature=settings.temperature, top_p=0.95, top_k=20,
                                max_new_tokens=settings.max_completion_length, batch_size=settings.eval_batch_size,
                                seed=1)

    class HeldOutAccuracy(TrainerCallback):
        def _measure(self, state, model):
            was_training = model.training
            model.eval()
            result = evaluate_model(model, problem_set, tokenizer=tokenizer, settings=sampling, ks=[1],
                                    progress=False, verifier_workers=1)
            model.train(was_training)
            curve.append({"step": state.global_step, "accuracy": result.benchmarks[problem_set.name]["avg"]})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings.curve_every == 0 or state.global_step == state.max_steps:
                self._measure(state, model)

    return HeldOutAccuracy()


def train_one(method: str, overrides: dict, seed: int, paths, train_dataset, settings: DemoSettings, out: Path,
              curve_set=None, callbacks: tuple = ()):
    """Train a fresh copy of the toy student with one method; returns (model, tokenizer, history, curve).

    ``paths`` has ``teacher`` and ``student`` checkpoint folders; ``curve_set``, when given, is
    sampled every ``settings.curve_every`` steps (the returned curve, else empty).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from ..trainer import SCOPEConfig, SCOPETrainer
    from ..verifiers import RewardFunction

    tokenizer = AutoTokenizer.from_pretrained(paths.student)
    model = AutoModelForCausalLM.from_pretrained(paths.student)
    algorithm = overrides.get("algorithm", method.split("-")[0])
    config = SCOPEConfig(
        output_dir=str(out / "runs" / f"{method}-seed{seed}"),
        algorithm=algorithm,
        teacher_model=None if algorithm == "grpo" else str(paths.teacher),
        verifier=_verifier_spec(settings),
        per_device_train_batch_size=settings.prompts_per_step * settings.rollouts,
        num_generations=settings.rollouts,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
        max_steps=settings.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        kd_samples_per_prompt=settings.rollouts,
        **{k: v for k, v in {**settings.extra, **overrides}.items() if k != "algorithm"},
    )
    curve: list = []
    callback = [*callbacks]
    if curve_set is not None:
        callback.insert(0, _curve_callback(curve_set, tokenizer, settings, curve))
    if algorithm == "kd":
        from ..kd import build_kd_trainer

        # Same budget in sequences: the teacher writes `rollouts` solutions for each of the
        # steps x prompts_per_step prompts the on-policy methods see; SFT runs the same steps.
        kd_prompts = train_dataset.select(range(settings.steps * settings.prompts_per_step))
        teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
        trainer = build_kd_trainer(model, tokenizer, kd_prompts, config, teacher_model=teacher, callbacks=callback,
                                   progress=False)
    else:
        # One verifier process: a verification costs microseconds to 2 ms, and the demo's own
        # workers already take the cores (the trainer's default pool has 4).
        reward = RewardFunction(config.verifier, answer_field=config.answer_field, timeout_s=config.verifier_timeout,
                                max_workers=1)
        trainer = SCOPETrainer(model, reward_funcs=[reward], args=config, train_dataset=train_dataset,
                               processing_class=tokenizer, callbacks=callback)
    # Our one-line progress replaces the trainer's per-step dict printing.
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        if algorithm != "kd":
            reward.close()
    return model, tokenizer, list(trainer.state.log_history), curve


def evaluate(model, tokenizer, test_set, settings: DemoSettings, label: str):
    from ..evaluation import SamplingSettings, evaluate_model

    sampling = SamplingSettings(n=settings.k, temperature=settings.temperature, top_p=0.95, top_k=20,
                                max_new_tokens=settings.max_completion_length, batch_size=settings.eval_batch_size,
                                seed=0)
    result = evaluate_model(model, test_set, tokenizer=tokenizer, settings=sampling, model_name=label, progress=False,
                            ks=list(range(1, settings.k + 1)), verifier_workers=1)
    return result.results


# ------------------------------------------------------------------------------- scheduling


class Progress:
    """One line per event: run i/N, method, seed, step, and the minutes left at the pace so far.

    The pace counts work units: a training step is one, an evaluation (or the recovery study)
    as many as its measured seconds are worth in steps (a guess of a quarter of the training
    until the first one is measured). Units done over the wall time since the start, across all
    workers, gives the rate.
    """

    def __init__(self, jobs: list[Job], steps: int, workers: int, log=_log):
        self.steps = steps
        self.workers = workers
        self.jobs = jobs
        self.log = log
        self.eval_units = max(1.0, steps / 4)
        self.started: float | None = None  # the first job's start: worker start-up is not work done
        self.step_done: dict[Job, int] = {}
        self.finished: set[Job] = set()
        self.runs = sum(j.kind == "train" for j in jobs)
        self._lock = threading.Lock()

    def _units(self, job: Job) -> float:
        return (self.steps if job.kind == "train" else 0) + self.eval_units

    def _done_units(self) -> float:
        return sum(self._units(j) if j in self.finished else self.step_done.get(j, 0) for j in self.jobs)

    def minutes_left(self) -> float:
        done = self._done_units()
        if not done or self.started is None:
            return float("nan")
        total = sum(self._units(j) for j in self.jobs)
        return (time.perf_counter() - self.started) / done * (total - done) / 60

    def _eta(self) -> str:
        left = self.minutes_left()
        return "time left unknown yet" if math.isnan(left) else f"about {left:.1f} min left"

    def _name(self, job: Job) -> str:
        return f"run {job.index}/{self.runs} {job.name} seed {job.seed}" if job.kind == "train" else job.name

    def event(self, kind: str, job: Job, **data) -> None:
        with self._lock:
            if self.started is None:
                self.started = time.perf_counter()
            if kind == "start":
                what = "training" if job.kind == "train" else "evaluating" if job.kind == "eval" else "running"
                self.log(f"{self._name(job)}: {what} ({self._eta()})")
            elif kind == "step":
                self.step_done[job] = data["step"]
                if data.get("show", True):
                    self.log(f"{self._name(job)}: step {data['step']}/{data['steps']} ({self._eta()})")
            elif kind == "done":
                self.finished.add(job)
                seconds = data.get("seconds", {})
                if job.kind == "train" and seconds.get("train"):
                    self.eval_units = max(1.0, seconds.get("eval", 0.0) / (seconds["train"] / self.steps))
                self.log(f"{self._name(job)}: {data.get('summary', 'done')} "
                         f"({sum(seconds.values()):.0f}s; {self._eta()})")


def _worker_main(settings: DemoSettings, jobs, events) -> None:
    """A worker process: import and warm up, then run ``(context, job)`` items from ``jobs`` until None,
    sending events, results and errors to ``events``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    _quiet_libraries()
    # What every job imports (torch, transformers, TRL: seconds of CPU), done while the parent
    # builds or checks the toy models.
    from ..analysis import recovery  # noqa: F401
    from ..evaluation import evaluate  # noqa: F401
    from .. import kd, trainer  # noqa: F401

    _warm_verifier(settings)

    def report(kind, job, **data):
        events.put((kind, job, data))

    while (item := jobs.get()) is not None:
        ctx, job = item
        try:
            events.put(("result", job, run_job(job, ctx, report)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent, which stops the run
            events.put(("error", job, traceback.format_exc()))
            return


def _job_summary(job: Job, result: dict, k: int) -> str:
    if "result" in result:
        top = result["result"]["benchmarks"]["toy"]
        return f"Avg@{k} {top['avg']:.1%} Pass@{k} {top['pass'][str(k)]:.1%}"
    recovery = result.get("recovery") or {}
    return "skipped" if "skipped" in recovery else "done"


class WorkerPool:
    """Runs jobs in this process (``workers`` 1) or in ``workers`` spawned processes.

    The processes start at construction, so that their imports overlap the toy model build;
    :meth:`run` hands jobs out in list order to whichever worker is free (put the long ones
    first). A job that raises, or a worker that dies, stops the run with an error naming the
    job. Use as a context manager: leaving it stops the processes.
    """

    def __init__(self, workers: int, settings: DemoSettings):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.settings = settings
        self.processes = []
        if workers == 1:
            return
        import multiprocessing

        # spawn, not fork: the parent has run torch (its thread pools do not survive a fork), and
        # a fresh interpreter per worker is the same state however many workers there are.
        context = multiprocessing.get_context("spawn")
        self.jobs, self.events = context.Queue(), context.Queue()
        self.processes = [context.Process(target=_worker_main, args=(settings, self.jobs, self.events),
                                          name=f"scope-demo-worker-{i}") for i in range(workers)]
        for process in self.processes:
            process.start()

    def run(self, jobs: list[Job], ctx: JobContext, progress: Progress) -> dict[Job, dict]:
        results: dict[Job, dict] = {}
        k = ctx.settings.k
        if not self.processes:
            _warm_verifier(ctx.settings)
            for job in jobs:
                result = run_job(job, ctx, progress.event)
                results[job] = result
                progress.event("done", job, seconds=result["seconds"], summary=_job_summary(job, result, k))
            return results
        for job in jobs:
            self.jobs.put((ctx, job))
        while len(results) < len(jobs):
            try:
                kind, job, data = self.events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"scope demo: worker {dead[0].name} exited (code {dead[0].exitcode}) "
                                       "before the jobs were done; its job's result is lost (out of memory?)") from None
                continue
            if kind == "error":
                raise RuntimeError(f"scope demo: job {job.label!r} failed in a worker process:\n{data}")
            if kind == "result":
                results[job] = data
                progress.event("done", job, seconds=data["seconds"], summary=_job_summary(job, data, k))
            else:
                progress.event(kind, job, **data)
        return results

    def close(self) -> None:
        """Stops the workers: the end-of-jobs signal to idle ones, SIGTERM to any still busy."""
        for _ in self.processes:
            self.jobs.put(None)
        for process in self.processes:
            process.join(timeout=10)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        self.processes = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # an error or Ctrl-C: do not wait for busy workers to finish their jobs
            for process in self.processes:
                process.terminate()
        self.close()


# ------------------------------------------------------------------------------------ the run


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
    from .models import ensure_toy_models

    settings = settings or task_settings()
    seeds = DEFAULT_SEEDS[settings.task] if seeds is None else seeds
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    methods = demo_methods(only, ablations, taus)
    _quiet_libraries()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = plan_jobs(methods, seeds, settings)
    workers = min(workers, len(jobs))
    with WorkerPool(workers, settings) as pool:
        _log(f"toy models ({settings.task} task, {'quick' if settings.quick else 'default'} recipe): building if "
             f"missing{f' (meanwhile {workers} worker processes start)' if workers > 1 else ''}")
        paths = ensure_toy_models(quick=settings.quick, task=settings.task)
        build_seconds = time.perf_counter() - started
        _log(f"teacher {paths.teacher}, student {paths.student} ({build_seconds:.0f}s)")
        ctx = JobContext(settings=settings, teacher=str(paths.teacher), student=str(paths.student), out=str(out),
                         runs=sum(j.kind == "train" for j in jobs))
        _log(f"{ctx.runs} training runs ({len(methods)} methods x {seeds} seeds; {settings.steps} steps x "
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
    _plot_pass_at_k(summary, out / "pass_at_k.png")
    _plot_curves(summary, out / "training_curves.png")
    report = render_report(summary)
    (out / "report.md").write_text(report)
    print(report)
    _log(f"done in {summary['wall_seconds'] / 60:.1f} min; outputs in {out}")
    return summary


def summarize(results: dict[Job, dict], jobs: list[Job], methods: dict, seeds: int, settings: DemoSettings,
              paths) -> dict:
    """The ``results.json`` dictionary from the jobs' results (in seed order, whatever order they ran in)."""
    by_key = {(j.kind, j.name, j.seed): results[j] for j in jobs}
    base = by_key[("eval", "base", 0)]["result"]
    teacher = by_key[("eval", "teacher", 0)]["result"]
    per_seed: dict[str, list] = {"base": [base] * seeds}  # the base model does not depend on the training seed
    curves: dict[str, list] = {}
    diagnostics: dict[str, list] = {}
    signal_steps: dict[str, list] = {key: [] for key in SIGNAL_KEYS}  # SCOPE's per-step values, all seeds
    for name in methods:
        runs = [by_key[("train", name, seed)] for seed in range(seeds)]
        per_seed[name] = [r["result"] for r in runs]
        curves[name] = [r["curve"] for r in runs]
        diagnostics[name] = [r["diagnostics"] for r in runs]
        if name == "scope":
            for r in runs:
                for key in SIGNAL_KEYS:
                    signal_steps[key] += r["signals"].get(key, [])
    recovery = by_key[("recovery", "recovery", 0)]["recovery"] if settings.recovery else None

    summary = {"task": settings.task, "k": settings.k, "seeds": list(range(seeds)), "methods": {},
               "teacher": _scores(teacher, settings.k)}
    for name, results_of in per_seed.items():
        scores = [_scores(r, settings.k) for r in results_of]
        avg, avg_std = _mean_std([s["avg"] for s in scores])
        pss, pss_std = _mean_std([s["pass"] for s in scores])
        pass_at = {str(k): _mean_std([s["pass_at_k"][str(k)] for s in scores])[0] for k in range(1, settings.k + 1)}
        summary["methods"][name] = {"avg": avg, "pass": pss, "avg_std": avg_std, "pass_std": pss_std,
                                    "pass_at_k": pass_at, "seeds": scores}
        if name in diagnostics:
            summary["methods"][name]["training"] = diagnostics[name]
    opd = summary["methods"].get("opd", {})
    for entry in summary["methods"].values():
        entry["avg_rel_vs_opd"] = _relative(entry["avg"], opd.get("avg"))
        entry["pass_rel_vs_opd"] = _relative(entry["pass"], opd.get("pass"))
    summary["comparisons"] = comparisons(summary["methods"])
    summary["ordering"] = paper_ordering(summary["comparisons"])
    summary["signals"] = {"scope_training": _signal_summary(signal_steps), "recovery": recovery}
    summary["settings"] = {**asdict(settings), "seeds": seeds, "teacher": str(paths.teacher),
                           "student": str(paths.student), "verifier": _verifier_spec(settings),
                           "sampling": {"temperature": settings.temperature, "top_p": 0.95, "top_k": 20}}
    summary["curves"] = curves
    summary["timing_seconds"] = {j.label: {**results[j]["seconds"], "cpu": results[j]["cpu_seconds"]} for j in jobs}
    return summary


def comparisons(methods: dict) -> dict:
    """Paired differences over seeds (Avg@k and Pass@k, 95% CIs): ``scope-opd``, ``opd-grpo`` and
    ``opd-kd`` (the paper's ordering), and ``<ablation>-scope`` for every SCOPE variant run."""
    from .stats import paired_comparison

    pairs = [("scope", "opd"), ("opd", "grpo"), ("opd", "kd")]
    pairs += [(name, "scope") for name in methods if name.startswith("scope-")]
    out = {}
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        avg = paired_comparison([s["avg"] for s in methods[a]["seeds"]], [s["avg"] for s in methods[b]["seeds"]])
        pss = paired_comparison([s["pass"] for s in methods[a]["seeds"]], [s["pass"] for s in methods[b]["seeds"]])
        out[f"{a}-{b}"] = {"avg_diff": avg["mean"], "pass_diff": pss["mean"], "ci95": avg["ci95"],
                           "pass_ci95": pss["ci95"], "excludes_zero": avg["excludes_zero"],
                           "pass_excludes_zero": pss["excludes_zero"], "n": avg["n"],
                           "avg_diffs": avg["diffs"], "pass_diffs": pss["diffs"]}
    return out


# The paper's ordering (Table 1) as claims on paired differences: (comparison, metric, relation).
PAPER_CLAIMS = (("scope-opd", "avg", ">"), ("scope-opd", "pass", ">="), ("opd-grpo", "avg", ">"),
                ("opd-kd", "avg", ">"))


def paper_ordering(comps: dict) -> dict:
    """Each claim of the paper's ordering judged on its paired 95% interval, and the overall verdict.

    A strict claim ``a > b`` holds when the interval of ``a - b`` lies above 0, is reversed when
    it lies below 0, and is not confirmed when it contains 0 (or with one seed, no interval). A
    claim ``a >= b`` holds unless the interval lies below 0. The ordering holds when every claim
    that could be measured holds; it is "not confirmed" when none is reversed but some is not
    confirmed, and "contradicted" when any is reversed.
    """
    claims = []
    for name, metric, relation in PAPER_CLAIMS:
        c = comps.get(name)
        if c is None:
            continue
        ci = c["ci95"] if metric == "avg" else c["pass_ci95"]
        diff = c["avg_diff"] if metric == "avg" else c["pass_diff"]
        if ci is None:
            verdict = "not confirmed"
        elif ci[1] < 0:
            verdict = "reversed"
        elif relation == ">=" or ci[0] > 0:
            verdict = "holds"
        else:
            verdict = "not confirmed"
        a, b = name.split("-")
        claims.append({"claim": f"{a} {relation} {b}", "comparison": name, "metric": metric, "diff": diff,
                       "ci95": ci, "verdict": verdict})
    verdicts = {c["verdict"] for c in claims}
    overall = ("not measured" if not claims else "contradicted" if "reversed" in verdicts
               else "not confirmed" if "not confirmed" in verdicts else "holds")
    return {"claims": claims, "verdict": overall}


def _signal_summary(steps: dict[str, list]) -> dict:
    """Distribution over SCOPE's training steps (all seeds) of each weight signal: mean, quartiles, max."""
    out = {}
    for key, values in steps.items():
        if not values:
            continue
        ordered = sorted(values)
        quartile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        out[key.removeprefix("scope/")] = {"mean": statistics.fmean(values), "p25": quartile(0.25),
                                           "median": quartile(0.5), "p75": quartile(0.75), "max": ordered[-1],
                                           "steps": len(values)}
    return out


def _recovery_signal(student, teacher, tokenizer, settings: DemoSettings) -> dict | None:
    """The recovery study (scope_opd.analysis) on the task's teacher: rates per perplexity quartile and ratio."""
    from ..analysis.recovery import RecoverySettings, TooFewIncorrectError, run_recovery_analysis

    problems = _task_problems(settings.task, "test", settings.recovery_problems, seed=99)
    recovery_settings = RecoverySettings(max_new_tokens=2 * settings.max_completion_length, batch_size=256,
                                         teacher_batch_size=256, apply_chat_template=False, verifier_workers=1)
    try:
        result = run_recovery_analysis(student, teacher, tokenizer, _problem_set("recovery", problems, settings),
                                       recovery_settings, progress=False)
    except TooFewIncorrectError as err:
        _log(f"error-recovery study skipped: {err}")
        return {"skipped": str(err)}
    return {key: result[key] for key in ("counts", "buckets", "recovery", "gaps") if key in result}


def _training_diagnostics(history: list[dict]) -> dict:
    keys = ("scope/frac_correct", "scope/frac_all_correct_groups", "scope/frac_all_wrong_groups",
            *SIGNAL_KEYS, "entropy")
    out = {}
    for key in keys:
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            out[key] = statistics.fmean(values)
    return out


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _scores(results: dict, k: int) -> dict:
    toy = results["benchmarks"]["toy"]
    return {"avg": toy["avg"], "pass": toy["pass"][str(k)], "pass_at_k": {str(j): toy["pass"][str(j)] for j in range(1, k + 1)}}


def _relative(value, reference):
    if value is None or not reference:
        return None
    return (value - reference) / reference


def _fmt(mean, std, seeds):
    if mean is None:
        return "—"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def _default_loss_aggregation() -> str:
    from ..trainer import SCOPEConfig

    return SCOPEConfig.__dataclass_fields__["loss_aggregation"].default


def render_report(summary: dict) -> str:
    k, seeds = summary["k"], summary["settings"]["seeds"]
    s = summary["settings"]
    lines = [
        f"# scope demo: {' vs '.join(m.upper() for m in METHODS if m in summary['methods'])} on the toy "
        f"{summary.get('task', 'addition')} task",
        "",
        f"Held-out problems: {s['test_problems']}, {k} samples each (temperature {s['temperature']}, top-p 0.95, "
        f"top-k 20), verifier `{s['verifier']}`. Seeds: {seeds} (mean ± std over seeds; paired intervals "
        "below).",
        "",
        f"| method | Avg@{k} | Pass@{k} | Avg@{k} vs OPD | Pass@{k} vs OPD |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        rel_a = "—" if m["avg_rel_vs_opd"] is None or name == "opd" else f"{100 * m['avg_rel_vs_opd']:+.1f}%"
        rel_p = "—" if m["pass_rel_vs_opd"] is None or name == "opd" else f"{100 * m['pass_rel_vs_opd']:+.1f}%"
        lines.append(f"| {name} | {_fmt(m['avg'], m['avg_std'], seeds)} | {_fmt(m['pass'], m['pass_std'], seeds)} "
                     f"| {rel_a} | {rel_p} |")
    t = summary["teacher"]
    lines += [f"| (teacher) | {100 * t['avg']:.1f} | {100 * t['pass']:.1f} | | |", ""]
    lines += ["## The paper's ordering", "", *ordering_lines(summary), ""]
    lines += ["## Paired comparisons (same seed: same initial student, same prompts)", "",
              *comparison_lines(summary), ""]
    lines += ["## Signals (measured before any comparison)", "", *signal_lines(summary), ""]
    lines += ["## Reading", "", *reading(summary), ""]
    lines += [
        "## Settings",
        "",
        f"- budget per method: {s['steps']} steps x {s['prompts_per_step']} prompts x {s['rollouts']} rollouts "
        f"(KD: the teacher writes {s['rollouts']} solutions for each of the same {s['steps'] * s['prompts_per_step']} "
        "prompts, verified-correct ones kept, SFT for the same steps); "
        f"learning rate {s['learning_rate']} constant; rollout temperature {s['temperature']}; "
        f"max {s['max_completion_length']} new tokens",
        "- SCOPE: tau 1.0, weight normalisation mean, paper weight directions (eqs. 4-5), "
        f"loss aggregation '{_default_loss_aggregation()}' (the trainer's default)",
        f"- GRPO: TRL's GRPO loss, clip 0.2, KL coefficient 1e-4 (paper)",
        f"- models: teacher `{s['teacher']}`, student `{s['student']}`",
        f"- verifier: `{s['verifier']}`; held-out curve every {s['curve_every']} steps on {s['curve_problems']} "
        f"problems x {s['curve_samples']} samples, first {s['curve_seeds']} seed(s)",
        f"- wall time: {summary['wall_seconds'] / 60:.1f} min ({_run_line(summary)})",
        "",
        "## Produced by",
        "",
        *(provenance_lines(summary["provenance"]) if "provenance" in summary else []),
        "",
        "Plots: `pass_at_k.png` (Pass@k for k = 1..K, like paper Fig. 4) and `training_curves.png` (held-out "
        "accuracy every few steps on a small held-out set, and the policy entropy the trainer logs, like Fig. 3). "
        "KD's entropy is SFTTrainer's, measured on the teacher's solutions at temperature 1; the on-policy methods' "
        "is measured on their own rollouts with the rollout temperature, so only the on-policy curves compare.",
        "",
        f"Paper Table 1 for reference (1.5B student, 6 maths benchmarks, Avg@32 / Pass@32): "
        + ", ".join(f"{m} {a}/{p}" for m, (a, p) in PAPER_TABLE1.items()),
    ]
    return "\n".join(lines) + "\n"


def _run_line(summary: dict) -> str:
    run = summary.get("run") or {}
    s = summary["settings"]
    return (f"{run.get('workers', 1)} worker process(es) x {s.get('threads', 1)} torch thread(s), model build "
            f"{run.get('build_seconds', 0):.0f} s, load average at the end "
            f"{', '.join(f'{x:.1f}' for x in run.get('load_average_at_end', []))}")


def ordering_lines(summary: dict) -> list[str]:
    """The verdict on the paper's ordering, claim by claim, from the paired intervals alone."""
    k = summary["k"]
    ordering = summary.get("ordering") or paper_ordering(summary.get("comparisons") or {})
    if not ordering["claims"]:
        return ["Not measured: the ordering needs SCOPE and OPD (and GRPO, KD) in one run."]
    seeds = summary["settings"]["seeds"]
    lines = [f"Paper (Table 1): SCOPE > OPD > GRPO, KD on Avg@k, and SCOPE >= OPD on Pass@k. Judged here on the "
             f"paired 95% interval over {seeds} seeds of each difference (a strict claim holds when its interval "
             "lies above 0, is reversed when it lies below 0, and is not confirmed when it contains 0).", "",
             "| claim | metric | difference (points) | 95% CI | verdict |", "|---|---|---|---|---|"]
    for c in ordering["claims"]:
        metric = f"Avg@{k}" if c["metric"] == "avg" else f"Pass@{k}"
        lines.append(f"| {c['claim'].upper().replace('>=', '≥')} | {metric} | "
                     f"{100 * c['diff']:+.1f} | {_ci(c['ci95'])} | {c['verdict']} |")
    lines.append("")
    verdict = ordering["verdict"]
    sentence = {"holds": "holds here: every claim's interval is on the paper's side of 0",
                "not confirmed": "is not confirmed here: no claim is reversed, but at least one interval contains 0",
                "contradicted": "is contradicted here: at least one interval lies on the wrong side of 0"}[verdict]
    lines.append(f"**The paper's ordering {sentence}.**")
    return lines


def _ci(ci) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def comparison_lines(summary: dict) -> list[str]:
    """The paired-difference table, and for each ablation - SCOPE whether it is distinguishable."""
    k = summary["k"]
    comps = summary.get("comparisons") or {}
    lines = [f"| difference | Avg@{k} (points) | 95% CI | Pass@{k} (points) | 95% CI | seeds |", "|---|---|---|---|---|---|"]
    for name, c in comps.items():
        lines.append(f"| {name} | {100 * c['avg_diff']:+.1f} | {_ci(c['ci95'])} | {100 * c['pass_diff']:+.1f} "
                     f"| {_ci(c['pass_ci95'])} | {c['n']} |")
    lines.append("")
    if any(c["ci95"] is None for c in comps.values()):
        lines.append("- One seed: no intervals, nothing is tested (use --seeds 5).")
    for name, c in comps.items():
        if not name.endswith("-scope") or c["ci95"] is None:
            continue
        verdict = ("worse than SCOPE (paper: ablations hurt)" if c["excludes_zero"] and c["avg_diff"] < 0 else
                   "better than SCOPE (paper: ablations hurt)" if c["excludes_zero"] else
                   "not distinguishable from SCOPE")
        lines.append(f"- {name.removesuffix('-scope')}: {verdict} on Avg@{k}, {_ci(c['ci95'])}; "
                     f"Pass@{k} {_ci(c['pass_ci95'])}.")
    return lines


def signal_lines(summary: dict) -> list[str]:
    signals = summary.get("signals") or {}
    training = signals.get("scope_training") or {}
    lines = []
    if training:
        lines += ["Dual-path weights over SCOPE's training steps, all seeds (tau 1, mean normalisation; 1 = uniform):",
                  "", "| signal | mean | p25 | median | p75 | max |", "|---|---|---|---|---|---|"]
        for key, v in training.items():
            lines.append(f"| {key} | {v['mean']:.2f} | {v['p25']:.2f} | {v['median']:.2f} | {v['p75']:.2f} "
                         f"| {v['max']:.2f} |")
        lines.append("")
    recovery = signals.get("recovery")
    if recovery and "recovery" in recovery:
        table = recovery["recovery"]
        ratios = [r for r in next(iter(table.values())) if r not in ("solutions",)] if table else []
        lines += ["Error recovery (the teacher continues the untrained student's wrong solutions from r x their "
                  "length; rate of correct continuations, by quartile of the teacher's perplexity on the solution):",
                  "", "| bucket | teacher PPL | " + " | ".join(f"r={r}" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        ppl = {b["bucket"]: b["mean_ppl"] for b in recovery.get("buckets", [])}
        for bucket, by_ratio in table.items():
            cells = []
            for r in ratios:
                entry = by_ratio.get(r)
                rate = entry.get("rate") if isinstance(entry, dict) else entry
                cells.append("—" if rate is None else f"{100 * rate:.0f}%")
            mean_ppl = f"{ppl[bucket]:.2f}" if bucket in ppl else ""
            lines.append(f"| {bucket} | {mean_ppl} | " + " | ".join(cells) + " |")
    elif recovery and "skipped" in recovery:
        lines.append(f"Error recovery: skipped ({recovery['skipped']}).")
    return lines or ["(no SCOPE run)"]


def _scope_vs_opd_lines(scope: dict, opd: dict, k: int, seeds: int) -> list[str]:
    out = []
    spread = max(scope["avg_std"] or 0, opd["avg_std"] or 0)
    diff = scope["avg"] - opd["avg"]
    if math.isclose(diff, 0.0, abs_tol=1e-9):
        out.append(f"- SCOPE and OPD tie on Avg@{k} ({100 * scope['avg']:.1f}%).")
    elif seeds > 1 and abs(diff) <= spread:
        out.append(f"- SCOPE vs OPD Avg@{k}: {100 * diff:+.1f} points, within the seed spread ({100 * spread:.1f}): "
                   "no reliable difference on this budget.")
    else:
        verdict = "above" if diff > 0 else "below"
        out.append(f"- SCOPE is {verdict} OPD by {100 * abs(diff):.1f} Avg@{k} points and "
                   f"{100 * (scope['pass'] - opd['pass']):+.1f} Pass@{k} points"
                   + (" (single seed: run --seeds 3 for a spread)." if seeds == 1 else "."))
    return out


def reading(summary: dict) -> list[str]:
    """Plain statements of what the numbers show, including where they disagree with the paper."""
    methods = summary["methods"]
    k = summary["k"]
    ranked = sorted((n for n in ("scope", "opd", "grpo", "kd", "base") if methods.get(n, {}).get("avg") is not None),
                    key=lambda n: -methods[n]["avg"])
    ordering = ranked[0]
    for prev, name in zip(ranked, ranked[1:]):
        ordering += (" = " if math.isclose(methods[prev]["avg"], methods[name]["avg"], abs_tol=1e-9) else " > ") + name
    out = [f"- Ordering by Avg@{k}: {ordering} (paper, Avg@32: scope > opd > grpo > base > kd)."]
    paired = (summary.get("comparisons") or {}).get("scope-opd")
    if paired and paired["ci95"] is not None:
        out.append(f"- SCOPE - OPD, paired over {paired['n']} seeds: Avg@{k} {100 * paired['avg_diff']:+.1f} points "
                   f"{_ci(paired['ci95'])}, Pass@{k} {100 * paired['pass_diff']:+.1f} {_ci(paired['pass_ci95'])} "
                   "(the verdict is in the ordering table above).")
    elif "scope" in methods and "opd" in methods:
        out += _scope_vs_opd_lines(methods["scope"], methods["opd"], k, summary["settings"]["seeds"])
    diag = methods.get("scope", {}).get("training") or []
    if diag:
        mixed = [1 - d.get("scope/frac_all_correct_groups", 0) - d.get("scope/frac_all_wrong_groups", 0) for d in diag]
        out.append(f"- Training groups with both right and wrong rollouts (where SCOPE's two paths both act): "
                   f"{100 * statistics.fmean(mixed):.0f}% on average; rollouts correct: "
                   f"{100 * statistics.fmean(d.get('scope/frac_correct', 0) for d in diag):.0f}%; "
                   f"largest student / teacher weight in a batch (mean normalisation, 1 = uniform): "
                   f"{statistics.fmean(d.get('scope/student_weight_max', 0) for d in diag):.2f} / "
                   f"{statistics.fmean(d.get('scope/teacher_weight_max', 0) for d in diag):.2f}.")
        student_max = statistics.fmean(d.get("scope/student_weight_max", 0) for d in diag)
        teacher_max = statistics.fmean(d.get("scope/teacher_weight_max", 0) for d in diag)
        if max(student_max, teacher_max) < 1.25:
            out.append(f"- The dual-path weights stay close to uniform (largest weight {max(student_max, teacher_max):.2f} "
                       f"at tau {summary['settings'].get('tau', 1.0)}): the rollouts of one prompt differ little in "
                       "mean log-prob on this short task, so DPAW barely reweights, and SCOPE differs from OPD mainly "
                       "by its path split (maximum likelihood on correct rollouts, teacher distillation only on wrong "
                       "ones). A smaller tau (--tau) sharpens the weights.")
    base = methods["base"]
    teacher_avg = summary["teacher"]["avg"]
    kd_avg = methods.get("kd", {}).get("avg")
    if kd_avg is not None and teacher_avg >= 0.85 and kd_avg > max(
            m["avg"] for name, m in methods.items() if name != "kd" and m.get("avg") is not None):
        out.append(f"- KD is best here, unlike in the paper: the toy teacher is near-perfect ({100 * teacher_avg:.0f}% "
                   "Avg@k) and its solutions are "
                   "exactly the format the student was pre-trained on, so supervised fine-tuning on verified teacher "
                   "samples is the most direct signal; the paper's long reasoning traces, where off-policy imitation "
                   "suffers from exposure bias, are absent.")
    for name in ("grpo", "kd"):
        if methods.get(name, {}).get("avg") is not None:
            out.append(f"- {name.upper()}: Avg@{k} {100 * (methods[name]['avg'] - base['avg']):+.1f} points vs the "
                       f"untrained student, Pass@{k} {100 * (methods[name]['pass'] - base['pass']):+.1f}.")
    return out


def _plot_pass_at_k(summary: dict, path: Path) -> None:
    from ..evaluation.report import plot_pass_at_k

    k = summary["k"]
    results = [{"model": name, "benchmarks": {"toy": {"n": k, "pass": m["pass_at_k"], "avg": m["avg"]}}}
               for name, m in summary["methods"].items()]
    plot_pass_at_k(results, path, labels=[r["model"] for r in results])


def _plot_curves(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    acc_ax, ent_ax = fig.subplots(1, 2)
    for name, runs in summary["curves"].items():
        run = runs[0]  # first seed
        if run["accuracy"]:
            acc_ax.plot([p["step"] for p in run["accuracy"]], [100 * p["accuracy"] for p in run["accuracy"]],
                        marker="o", label=name)
        if run["entropy"]:
            ent_ax.plot([p["step"] for p in run["entropy"]], [p["entropy"] for p in run["entropy"]], label=name)
    acc_ax.set(title="held-out accuracy (seed 0)", xlabel="training step", ylabel="accuracy (%)")
    ent_ax.set(title="policy entropy (seed 0)", xlabel="training step", ylabel="mean token entropy (nats)")
    for ax in (acc_ax, ent_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
