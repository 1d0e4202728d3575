"""`scope demo`: the paper's comparison (Table 1, Figs. 3-5) on a toy task, on CPU.

Tasks: ``addition`` (default; one solution format, the quick smoke test) and ``sums``
(``--task sums``; several valid orders, a skewed student; see :mod:`.sums`), which also
reports paired seed comparisons with 95% intervals and the weight / recovery signals.

Flow, the same code path a real run takes:

1. build (or reuse) the toy teacher and student (:func:`scope_opd.toy.models.ensure_toy_models`);
2. train the student with each method - SCOPE, OPD, GRPO through :class:`SCOPETrainer`,
   KD through :func:`scope_opd.kd.train_kd` - under the same budget (steps, prompts per step,
   rollouts per prompt, learning rate) and the same seeds;
3. evaluate every result and the untrained student on held-out problems with the ``math``
   verifier (math-verify) and Avg@k / Pass@k (:func:`scope_opd.evaluation.evaluate_model`);
4. write ``results.json``, ``report.md`` (table with the relative change vs OPD, settings,
   and a reading of the outcome), ``pass_at_k.png`` (Fig. 4) and ``training_curves.png``
   (held-out accuracy and policy entropy over steps, Fig. 3).

Whatever ordering comes out is what the report says.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class DemoSettings:
    steps: int = 40
    prompts_per_step: int = 8
    rollouts: int = 8
    learning_rate: float = 1e-4
    temperature: float = 0.6
    max_completion_length: int = 64
    train_problems: int = 2000
    test_problems: int = 200
    k: int = 8
    curve_every: int = 10
    curve_problems: int = 48
    curve_samples: int = 2
    quick: bool = False
    # "addition" (the quick smoke test) or "sums" (several valid solution orders; see toy/sums.py).
    task: str = "addition"
    # Run the error-recovery study (paper Sec. 2.2) on the task's teacher and untrained student.
    recovery: bool = True
    recovery_problems: int = 100
    extra: dict = field(default_factory=dict)


def quick_settings() -> DemoSettings:
    # The quick toy models are barely trained, so KD keeps unverified teacher samples too.
    return DemoSettings(steps=2, prompts_per_step=2, rollouts=4, train_problems=64, test_problems=8, k=8,
                        curve_every=2, curve_problems=4, curve_samples=1, quick=True, recovery_problems=8,
                        extra={"kd_keep_only_correct": False})


TASKS = ("addition", "sums")
DEFAULT_SEEDS = {"addition": 3, "sums": 5}
# Trainer metrics logged every step that item 2 of the demo's issue asks for (the dual-path weights' signal).
SIGNAL_KEYS = ("scope/student_weight_max", "scope/teacher_weight_max",
               "scope/frac_groups_student_weight_above_1.5", "scope/frac_groups_teacher_weight_above_1.5")


def task_settings(task: str, **overrides) -> DemoSettings:
    """Default settings of ``task``; the sums task's solutions are shorter (41 characters + EOS)."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    base = {"sums": dict(max_completion_length=48)}.get(task, {})
    return DemoSettings(task=task, **{**base, **overrides})


class Progress:
    """One line per few training steps: run i/N, method, seed, step, and the time left at the pace so far."""

    def __init__(self, runs: int, steps: int):
        self.total = runs * steps
        self.done = 0
        self.started = time.perf_counter()  # the pace includes evaluation between runs

    def callback(self, method: str, seed: int, run: int, runs: int, every: int = 5):
        from transformers import TrainerCallback

        progress = self

        class StepProgress(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                progress.done += 1
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    _log(f"  run {run}/{runs} {method} seed {seed}: step {state.global_step}/{state.max_steps}, "
                         f"about {progress.minutes_left():.1f} min left")

        return StepProgress()

    def minutes_left(self) -> float:
        if not self.done:
            return float("nan")
        return (time.perf_counter() - self.started) / self.done * (self.total - self.done) / 60


def _log(message: str) -> None:
    print(f"[scope demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _curve_callback(problem_set, tokenizer, settings: DemoSettings, curve: list):
    """A TrainerCallback sampling a small held-out set every ``curve_every`` steps (Fig. 3)."""
    from transformers import TrainerCallback

    from ..evaluation import SamplingSettings, evaluate_model

    sampling = SamplingSettings(n=settings.curve_samples, temperature=settings.temperature, top_p=0.95, top_k=20,
                                max_new_tokens=settings.max_completion_length, batch_size=64, seed=1)

    class HeldOutAccuracy(TrainerCallback):
        def _measure(self, state, model):
            was_training = model.training
            model.eval()
            result = evaluate_model(model, problem_set, tokenizer=tokenizer, settings=sampling, ks=[1],
                                    progress=False, verifier_workers=2)
            model.train(was_training)
            curve.append({"step": state.global_step, "accuracy": result.benchmarks[problem_set.name]["avg"]})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings.curve_every == 0 or state.global_step == state.max_steps:
                self._measure(state, model)
                _log(f"  step {state.global_step}/{state.max_steps}: held-out accuracy {curve[-1]['accuracy']:.1%}")

    return HeldOutAccuracy()


def train_one(method: str, overrides: dict, seed: int, paths, datasets, settings: DemoSettings, out: Path,
              callbacks: tuple = ()):
    """Train a fresh copy of the toy student with one method; returns (model, tokenizer, history, curve)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from ..trainer import SCOPEConfig, SCOPETrainer

    train_dataset, curve_set = datasets
    tokenizer = AutoTokenizer.from_pretrained(paths.student)
    model = AutoModelForCausalLM.from_pretrained(paths.student)
    algorithm = overrides.get("algorithm", method.split("-")[0])
    config = SCOPEConfig(
        output_dir=str(out / "runs" / f"{method}-seed{seed}"),
        algorithm=algorithm,
        teacher_model=None if algorithm == "grpo" else str(paths.teacher),
        verifier="math",
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
    callback = [_curve_callback(curve_set, tokenizer, settings, curve), *callbacks]
    if algorithm == "kd":
        from ..kd import build_kd_trainer

        # Same budget in sequences: the teacher writes `rollouts` solutions for each of the
        # steps x prompts_per_step prompts the on-policy methods see; SFT runs the same steps.
        kd_prompts = train_dataset.select(range(settings.steps * settings.prompts_per_step))
        teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
        trainer = build_kd_trainer(model, tokenizer, kd_prompts, config, teacher_model=teacher, callbacks=callback,
                                   progress=False)
    else:
        trainer = SCOPETrainer(model, args=config, train_dataset=train_dataset, processing_class=tokenizer,
                               callbacks=callback)
    # Our one-line progress replaces the trainer's per-step dict printing.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model, tokenizer, list(trainer.state.log_history), curve


def evaluate(model, tokenizer, test_set, settings: DemoSettings, label: str):
    from ..evaluation import SamplingSettings, evaluate_model

    sampling = SamplingSettings(n=settings.k, temperature=settings.temperature, top_p=0.95, top_k=20,
                                max_new_tokens=settings.max_completion_length, batch_size=64, seed=0)
    result = evaluate_model(model, test_set, tokenizer=tokenizer, settings=sampling, model_name=label, progress=False,
                            ks=list(range(1, settings.k + 1)))
    return result.results


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _training_diagnostics(history: list[dict]) -> dict:
    keys = ("scope/frac_correct", "scope/frac_all_correct_groups", "scope/frac_all_wrong_groups",
            *SIGNAL_KEYS, "entropy")
    out = {}
    for key in keys:
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            out[key] = statistics.fmean(values)
    return out


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


def run_demo(out: Path, *, seeds: int = 3, ablations: bool = False, taus=(), settings: DemoSettings | None = None,
             only: tuple[str, ...] = METHODS) -> dict:
    from ..evaluation import Problem, ProblemSet
    from .models import ensure_toy_models

    from transformers.utils import logging as hf_logging

    import datasets

    hf_logging.disable_progress_bar()  # weight-loading and dataset-map bars; progress is reported by _log
    datasets.disable_progress_bars()
    settings = settings or DemoSettings()
    if settings.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {settings.task!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _log(f"toy models ({settings.task} task, {'quick' if settings.quick else 'default'} recipe): building if missing")
    paths = ensure_toy_models(quick=settings.quick, task=settings.task)
    _log(f"teacher {paths.teacher}, student {paths.student} ({time.perf_counter() - started:.0f}s)")

    def problem_set(name, problems):
        return ProblemSet(name, [Problem(id=str(i), prompt=p.prompt, answer=p.answer) for i, p in enumerate(problems)],
                          verifier="math")

    test_set = problem_set("toy", _task_problems(settings.task, "test", settings.test_problems, seed=1234))
    curve_set = problem_set("toy", _task_problems(settings.task, "test", settings.curve_problems, seed=4321))

    unknown = [m for m in only if m not in METHODS]
    if unknown or not only:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(only)}")
    methods: dict[str, dict] = {m: {"algorithm": m} for m in METHODS if m in only}
    if ablations:
        methods.update({name: {"algorithm": "scope", **o} for name, o in ABLATIONS.items()})
    for tau in taus:
        if tau != 1.0:
            methods[f"scope-tau{tau:g}"] = {"algorithm": "scope", "tau": tau}

    per_seed: dict[str, list] = {name: [] for name in ["base", *methods]}
    curves: dict[str, list] = {name: [] for name in methods}
    diagnostics: dict[str, list] = {name: [] for name in methods}
    signal_steps: dict[str, list] = {key: [] for key in SIGNAL_KEYS}  # SCOPE's per-step values, all seeds
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = AutoModelForCausalLM.from_pretrained(paths.student)
    base_tokenizer = AutoTokenizer.from_pretrained(paths.student)
    teacher_model = AutoModelForCausalLM.from_pretrained(paths.teacher)
    _log("evaluating the untrained student and the teacher")
    base = evaluate(base_model, base_tokenizer, test_set, settings, "base")
    teacher_result = evaluate(teacher_model, base_tokenizer, test_set, settings, "teacher")
    recovery = None
    if settings.recovery:
        _log(f"error-recovery study: the teacher continues the untrained student's wrong solutions "
             f"({settings.recovery_problems} problems)")
        recovery = _recovery_signal(base_model, teacher_model, base_tokenizer, settings, problem_set)
    runs = seeds * len(methods)
    progress = Progress(runs, settings.steps)
    run = 0
    for seed in range(seeds):
        per_seed["base"].append(base)  # the base model does not depend on the training seed
        # Paired design: every method of one seed starts from the same student and sees the same prompts.
        train_dataset = _task_dataset(settings.task, settings.train_problems, seed=seed)
        for name, overrides in methods.items():
            run += 1
            _log(f"run {run}/{runs}: seed {seed}, training {name} ({settings.steps} steps x {settings.prompts_per_step} "
                 f"prompts x {settings.rollouts} rollouts)")
            t0 = time.perf_counter()
            model, tokenizer, history, curve = train_one(
                name, overrides, seed, paths, (train_dataset, curve_set), settings, out,
                callbacks=(progress.callback(name, seed, run, runs),))
            result = evaluate(model, tokenizer, test_set, settings, name)
            top = result["benchmarks"]["toy"]
            _log(f"run {run}/{runs}: seed {seed}: {name} Avg@{settings.k} {top['avg']:.1%} Pass@{settings.k} "
                 f"{top['pass'][str(settings.k)]:.1%} ({time.perf_counter() - t0:.0f}s; "
                 f"about {progress.minutes_left():.1f} min left)")
            per_seed[name].append(result)
            curves[name].append({"accuracy": curve, "entropy": [
                {"step": h["step"], "entropy": h["entropy"]} for h in history if "entropy" in h and "step" in h]})
            diagnostics[name].append(_training_diagnostics(history))
            if name == "scope":
                for key in SIGNAL_KEYS:
                    # A step without correct (or wrong) rollouts has no weight of that path to report.
                    signal_steps[key] += [h[key] for h in history
                                          if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]

    summary = {"task": settings.task, "k": settings.k, "seeds": list(range(seeds)), "methods": {},
               "teacher": _scores(teacher_result, settings.k)}
    for name, results in per_seed.items():
        scores = [_scores(r, settings.k) for r in results]
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
    summary["signals"] = {"scope_training": _signal_summary(signal_steps), "recovery": recovery}
    summary["settings"] = {**settings.__dict__, "seeds": seeds, "teacher": str(paths.teacher),
                           "student": str(paths.student), "verifier": "math",
                           "sampling": {"temperature": settings.temperature, "top_p": 0.95, "top_k": 20}}
    summary["curves"] = curves
    summary["wall_seconds"] = time.perf_counter() - started

    (out / "results.json").write_text(json.dumps(summary, indent=2))
    _plot_pass_at_k(summary, out / "pass_at_k.png")
    _plot_curves(summary, out / "training_curves.png")
    report = render_report(summary)
    (out / "report.md").write_text(report)
    print(report)
    _log(f"done in {summary['wall_seconds'] / 60:.1f} min; outputs in {out}")
    return summary


def comparisons(methods: dict) -> dict:
    """Paired differences over seeds: ``scope-opd`` and ``<ablation>-scope`` (Avg@k and Pass@k, 95% CIs)."""
    from .stats import paired_comparison

    pairs = [("scope", "opd")] + [(name, "scope") for name in methods if name.startswith("scope-")]
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


def _recovery_signal(student, teacher, tokenizer, settings: DemoSettings, problem_set) -> dict | None:
    """The recovery study (scope_opd.analysis) on the task's teacher: rates per perplexity quartile and ratio."""
    from ..analysis.recovery import RecoverySettings, TooFewIncorrectError, run_recovery_analysis

    problems = _task_problems(settings.task, "test", settings.recovery_problems, seed=99)
    recovery_settings = RecoverySettings(max_new_tokens=2 * settings.max_completion_length, batch_size=256,
                                         teacher_batch_size=256, apply_chat_template=False, verifier_workers=2)
    try:
        result = run_recovery_analysis(student, teacher, tokenizer, problem_set("recovery", problems),
                                       recovery_settings, progress=False)
    except TooFewIncorrectError as err:
        _log(f"error-recovery study skipped: {err}")
        return {"skipped": str(err)}
    return {key: result[key] for key in ("counts", "buckets", "recovery", "gaps") if key in result}


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
        f"# scope demo: SCOPE vs OPD vs GRPO vs KD on the toy {summary.get('task', 'addition')} task",
        "",
        f"Held-out problems: {s['test_problems']}, {k} samples each (temperature {s['temperature']}, top-p 0.95, "
        f"top-k 20), math verifier. Seeds: {seeds} (mean ± std over seeds).",
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
        f"- wall time: {summary['wall_seconds'] / 60:.1f} min",
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


def _ci(ci) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def comparison_lines(summary: dict) -> list[str]:
    """The paired-difference table and the verdict on the paper's ordering, from the numbers alone."""
    k = summary["k"]
    comps = summary.get("comparisons") or {}
    lines = [f"| difference | Avg@{k} (points) | 95% CI | Pass@{k} (points) | 95% CI | seeds |", "|---|---|---|---|---|---|"]
    for name, c in comps.items():
        lines.append(f"| {name} | {100 * c['avg_diff']:+.1f} | {_ci(c['ci95'])} | {100 * c['pass_diff']:+.1f} "
                     f"| {_ci(c['pass_ci95'])} | {c['n']} |")
    lines.append("")
    main = comps.get("scope-opd")
    if main is None:
        return lines
    if main["ci95"] is None:
        lines.append("- One seed: no interval; the SCOPE - OPD difference is not tested (use --seeds 5).")
    elif main["excludes_zero"]:
        holds = main["avg_diff"] > 0
        lines.append(f"- The paper's ordering SCOPE > OPD {'holds' if holds else 'is reversed'} here: the paired 95% "
                     f"interval of SCOPE - OPD on Avg@{k} is {_ci(main['ci95'])} points, excluding 0.")
    else:
        lines.append(f"- The paper's ordering SCOPE > OPD is not confirmed here: the paired 95% interval of SCOPE - OPD "
                     f"on Avg@{k} is {_ci(main['ci95'])} points, which contains 0.")
    for name, c in comps.items():
        if name == "scope-opd" or c["ci95"] is None:
            continue
        verdict = ("worse than SCOPE (paper: ablations hurt)" if c["excludes_zero"] and c["avg_diff"] < 0 else
                   "better than SCOPE (paper: ablations hurt)" if c["excludes_zero"] else
                   "not distinguishable from SCOPE")
        lines.append(f"- {name.removesuffix('-scope')}: {verdict}, Avg@{k} {_ci(c['ci95'])}.")
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
    if "scope" in methods and "opd" in methods:
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--out", default="scope_demo", help="output folder (default: ./scope_demo)")
    parser.add_argument("--task", choices=TASKS, default="addition",
                        help="addition (2-digit, one solution format) or sums (several valid orders, skewed student)")
    parser.add_argument("--no-recovery", action="store_true", help="skip the error-recovery study of the teacher")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds (default 3 for addition, 5 for sums, 1 with --quick); paired across methods")
    parser.add_argument("--ablations", action="store_true", help="also run the paper's Fig. 5 ablations")
    parser.add_argument("--tau", default="1.0", help="comma-separated DPAW temperatures; values other than 1 add runs")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per method")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny models, 2 steps; < 3 min)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the toy models are so small that more threads mostly add overhead)",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        settings = quick_settings()
        settings.task = args.task
        if args.task == "sums":
            settings.max_completion_length = task_settings("sums").max_completion_length
        if args.steps != DemoSettings().steps:
            settings.steps = args.steps
    else:
        settings = task_settings(args.task, steps=args.steps, learning_rate=args.learning_rate)
    settings.recovery = not args.no_recovery
    taus = [float(t) for t in str(args.tau).split(",") if t.strip()]
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else DEFAULT_SEEDS[args.task])
    only = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(Path(args.out), seeds=seeds, ablations=args.ablations, taus=taus, settings=settings, only=only)
    return 0
