"""``report.md``: the tables, the verdict on the paper's ordering, the signals and the reading, from
``results.json`` alone.
"""

from __future__ import annotations

import math
import statistics

from ..version import provenance_lines
from .settings import METHODS, PAPER_TABLE1
from .summary import paper_ordering


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
        "Plots: `pass_at_k.png` (Pass@k for k = 1..K, like paper Fig. 4) and `training_curves.png` (held-out "
        "accuracy every few steps on a small held-out set, and the policy entropy the trainer logs, like Fig. 3). "
        "KD's entropy is SFTTrainer's, measured on the teacher's solutions at temperature 1; the on-policy methods' "
        "is measured on their own rollouts with the rollout temperature, so only the on-policy curves compare.",
        "",
        f"Paper Table 1 for reference (1.5B student, 6 maths benchmarks, Avg@32 / Pass@32): "
        + ", ".join(f"{m} {a}/{p}" for m, (a, p) in PAPER_TABLE1.items()),
    ]
    if "provenance" in summary:  # other torch / transformers versions give other numbers for the same seeds
        lines += ["", "## Produced by", "", *provenance_lines(summary["provenance"])]
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
