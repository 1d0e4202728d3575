"""From the jobs' results to ``results.json``: per-method scores, paired comparisons over seeds with 95%
intervals, the verdict on the paper's ordering, the weight signals.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict

from .jobs import Job, verifier_spec
from .settings import DemoSettings, SIGNAL_KEYS


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
                           "student": str(paths.student), "verifier": verifier_spec(settings),
                           "sampling": {"temperature": settings.temperature, "top_p": 0.95, "top_k": 20}}
    summary["curves"] = curves
    summary["timing_seconds"] = {j.label: {**results[j]["seconds"], "cpu": results[j]["cpu_seconds"]} for j in jobs}
    return summary


def comparisons(methods: dict) -> dict:
    """Paired differences over seeds (Avg@k and Pass@k, 95% CIs): ``scope-opd``, ``opd-grpo`` and
    ``opd-kd`` (the paper's ordering), and ``<ablation>-scope`` for every SCOPE variant run."""
    from ..toy.stats import paired_comparison

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
