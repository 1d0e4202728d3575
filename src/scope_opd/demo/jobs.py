"""One job of the demo: train one method on one seed and evaluate it, or evaluate the base student / the
teacher, or run the error-recovery study. Each job is fully determined by its own arguments.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .settings import DemoSettings, SIGNAL_KEYS, log


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
                      verifier=verifier_spec(settings))


def verifier_spec(settings: DemoSettings) -> str:
    # The toy answers are integers; toy.task.verify_toy_answer compares the last \boxed{} by value.
    return "math" if settings.verifier == "math" else "scope_opd.toy.task:verify_toy_answer"


def _task_problems(task: str, split: str, n: int, seed: int):
    if task == "sums":
        from ..toy.sums import sum_problems

        return sum_problems(split, n, seed=seed)
    from ..toy.task import toy_problems

    return toy_problems(split, n, seed=seed)


def _task_dataset(task: str, n: int, seed: int):
    if task == "sums":
        from ..toy.sums import sum_dataset

        return sum_dataset("train", n, seed=seed)
    from ..toy.task import toy_dataset

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


def quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading and dataset-map bars; progress is reported by log
    datasets.disable_progress_bars()
    # transformers 5.x renames gradient_checkpointing -> activation_checkpointing and warns each time
    # TRL 1.16 (pinned) uses the old names: 30 two-line warnings per demo, none of them actionable here.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def warm_verifier(settings: DemoSettings) -> None:
    """One verification in this process before any verifier pool forks from it.

    math-verify builds its LaTeX parser on the first call (~0.3 s of CPU); RewardFunction forks
    its workers from this process, so they inherit the built parser instead of each paying for
    it (the trainer, every evaluation and every held-out curve point build a pool of their own).
    """
    from ..verifiers import get_verifier

    get_verifier(verifier_spec(settings))("\\boxed{12}", "12")


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
        verifier=verifier_spec(settings),
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
        log(f"error-recovery study skipped: {err}")
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
