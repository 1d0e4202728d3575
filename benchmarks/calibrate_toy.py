"""Calibrate the toy sums world: do SCOPE's signals exist before any comparison is run?

Builds (or reuses, from the toy cache) the sums teacher/student pair of a recipe and prints,
all from samples at the paper's protocol (8 per prompt, temperature 0.6, top-p 0.95, top-k 20)
on held-out test problems:

* teacher and student Avg@8 / Pass@8, the share of groups of 8 that mix right and wrong;
* the strategy histogram of each model's correct samples (``None``: a correct answer whose
  chain is no strategy's exact text, e.g. two compensating slips), and the student's
  mean NLL on its correct samples per strategy (mechanism (a): rare orders cost more);
* the wrong samples by kind (a consistent chain with an arithmetic slip, or a broken line)
  and the teacher's mean NLL on each kind (mechanism (b));
* from the base student's own rollouts, scored by the student and the teacher, the
  dual-path weights of :func:`scope_opd.algorithms.dual_path_weights` at tau 1 (and 0.5) with
  mean normalisation, from full-vocabulary log-probs at temperature 1: the largest student-guided weight of each group with 2+ correct rows,
  the largest teacher-guided weight of each group with 2+ wrong rows, their quantiles and
  the share of groups where it exceeds 1.5;
* the error-recovery study (:mod:`scope_opd.analysis.recovery`) on this teacher, as
  ``scope demo`` runs it.

The SCOPE-vs-OPD difference is never computed here: the task and recipe are chosen from
these numbers only.

    python benchmarks/calibrate_toy.py                       # the default sums recipe
    python benchmarks/calibrate_toy.py --variant 5-terms     # a rejected alternative
    python benchmarks/calibrate_toy.py --quick --problems 8  # seconds, for a smoke run

Models are trained on one thread (as ``ensure_toy_models`` does); the build time of each is
printed with the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path


def _variants():
    from scope_opd.toy.models import SUMS_RECIPES

    base = SUMS_RECIPES["default"]
    # Rejected alternatives (reported in the README beside the chosen recipe).
    return {
        "default": base,
        "5-terms": dataclasses.replace(base, name=base.name + "-alt5terms", terms=5,
                                       teacher=dataclasses.replace(base.teacher, steps=1500)),
        "student-60-25-15": dataclasses.replace(
            base, name=base.name + "-alt60", student_mix=(("left", 0.60), ("right", 0.25), ("pairs", 0.15))
        ),
        "student-85-10-5": dataclasses.replace(
            base, name=base.name + "-alt85", student_mix=(("left", 0.85), ("right", 0.10), ("pairs", 0.05))
        ),
    }


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def sample(model, tokenizer, problems, n: int, max_new_tokens: int, seed: int = 0):
    from scope_opd.sampling import SamplingSettings, generate_completions

    settings = SamplingSettings(n=n, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=max_new_tokens,
                                batch_size=256, seed=seed, apply_chat_template=False)
    return generate_completions(model, tokenizer, [p.prompt for p in problems], settings, progress=False)


def accuracy(problems, completions) -> dict:
    from scope_opd.toy.sums import solution_strategy, verify_sum_answer

    n = len(completions[0])
    correct = [[verify_sum_answer(c.text, p.answer) == 1.0 for c in cs] for p, cs in zip(problems, completions)]
    # A correct sample that is no strategy's exact text: another valid order, or compensating slips.
    strategies = Counter(
        str(solution_strategy(p, c.text) or "other-" + chain_kind(p, c.text))
        for p, cs, oks in zip(problems, completions, correct) for c, ok in zip(cs, oks) if ok
    )
    total_correct = sum(map(sum, correct))
    return {
        "avg": total_correct / (n * len(problems)),
        "pass": sum(any(oks) for oks in correct) / len(problems),
        "mixed_groups": sum(0 < sum(oks) < n for oks in correct) / len(problems),
        "correct_strategies": dict(strategies.most_common()),
        "correct": correct,
    }


def chain_kind(problem, text: str) -> str:
    """How a completion's chain reads, line by line from the prompt.

    ``"valid"``: every line replaces one neighbouring pair (or every pair) of the line above by
    its sum, down to ``\\boxed{total}``; ``"slip"``: the same, but some lines differ from a valid
    rewrite of the line above in exactly one term (a wrong sum, or a dropped or miscopied term
    that looks like one); ``"broken"``: anything else (a line of the wrong length or two terms
    off, a malformed line, no box at the end).
    """
    previous = list(problem.numbers)
    slipped = False
    for line in text.split("\n"):
        body = line[len("\\boxed{") : -1] if line.startswith("\\boxed{") and line.endswith("}") else line
        try:
            terms = [int(t) for t in body.split("+")]
        except ValueError:
            return "broken"
        candidates = []
        if len(terms) == len(previous) - 1:  # one neighbouring pair merged
            candidates += [previous[:i] + [previous[i] + previous[i + 1]] + previous[i + 2 :] for i in range(len(previous) - 1)]
        if len(previous) > 3 and len(terms) == (len(previous) + 1) // 2:  # every pair merged
            candidates.append([previous[i] + previous[i + 1] for i in range(0, len(previous) - 1, 2)]
                              + previous[len(previous) - len(previous) % 2 :])
        if terms in candidates:
            pass
        elif any(sum(a != b for a, b in zip(terms, c)) == 1 for c in candidates):
            slipped = True
        else:
            return "broken"
        previous = terms
    if len(previous) != 1 or not text.rstrip().endswith("}"):
        return "broken"
    return "slip" if slipped else "valid"


def _mean_nll(scorer, problems, completions, tokenizer):
    prompts, responses = [], []
    for p, cs in zip(problems, completions):
        ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        for c in cs:
            prompts.append(ids)
            responses.append(list(c.token_ids))
    rows = scorer.score(prompts, responses)
    return [-float(r.double().mean()) if r.numel() else math.nan for r in rows]


def _quantiles(values) -> dict:
    if not values:
        return {"groups": 0}
    values = sorted(values)
    q = lambda f: values[min(len(values) - 1, int(f * len(values)))]  # noqa: E731
    return {"groups": len(values), "median": round(q(0.5), 3), "p90": round(q(0.9), 3), "max": round(values[-1], 3),
            "share_above_1.5": round(sum(v > 1.5 for v in values) / len(values), 3)}


def signals(student, teacher, tokenizer, problems, completions, correct) -> dict:
    import torch

    from scope_opd.algorithms import dual_path_weights
    from scope_opd.teachers import InProcessTeacher
    from scope_opd.toy.sums import solution_strategy

    n = len(completions[0])
    student_nll = _mean_nll(InProcessTeacher(student, batch_size=256), problems, completions, tokenizer)
    teacher_nll = _mean_nll(InProcessTeacher(teacher, batch_size=256), problems, completions, tokenizer)
    flat_correct = [ok for oks in correct for ok in oks]
    group_ids = torch.arange(len(problems)).repeat_interleave(n)
    valid = torch.tensor([math.isfinite(a) and math.isfinite(b) for a, b in zip(student_nll, teacher_nll)])
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    kinds = [str(solution_strategy(p, c.text) or "other-" + chain_kind(p, c.text)) for p, c in flat]
    out = {}
    for tau in (1.0, 0.5):  # tau 1: the paper's default and the demo's; 0.5: the sharper end of its C.2 sweep
        s_w, t_w = dual_path_weights(group_ids, torch.tensor(flat_correct), -torch.tensor(student_nll).nan_to_num(0.0),
                                     -torch.tensor(teacher_nll).nan_to_num(0.0), tau=tau, normalization="mean", valid=valid)
        largest_s, largest_t, argmax_kind = [], [], Counter()
        for g in range(len(problems)):
            rows = range(g * n, (g + 1) * n)
            ok = [i for i in rows if flat_correct[i] and bool(valid[i])]
            bad = [i for i in rows if not flat_correct[i] and bool(valid[i])]
            if len(ok) >= 2:
                largest_s.append(max(float(s_w[i]) for i in ok))
                # Which kind of correct rollout the student path weighs most (ties: the first row).
                argmax_kind[kinds[max(ok, key=lambda i: float(s_w[i]))]] += 1
            if len(bad) >= 2:
                largest_t.append(max(float(t_w[i]) for i in bad))
        suffix = "" if tau == 1.0 else f"_tau{tau}"
        out["student_guided_largest" + suffix] = _quantiles(largest_s)
        out["teacher_guided_largest" + suffix] = _quantiles(largest_t)
        if tau == 1.0:
            out["student_guided_argmax_kind"] = dict(argmax_kind.most_common())
    by_strategy, by_kind = defaultdict(list), defaultdict(list)
    for i, (p, c) in enumerate(flat):
        if flat_correct[i]:
            by_strategy[kinds[i]].append(student_nll[i])
        else:
            by_kind[chain_kind(p, c.text)].append(teacher_nll[i])
    mean = lambda xs: round(statistics.fmean(xs), 3) if xs else None  # noqa: E731
    return {
        **out,
        "student_nll_of_correct_by_strategy": {k: {"n": len(v), "mean_nll": mean(v)} for k, v in sorted(by_strategy.items())},
        "teacher_nll_of_wrong_by_kind": {k: {"n": len(v), "mean_nll": mean(v)} for k, v in sorted(by_kind.items())},
    }


def recovery(student, teacher, tokenizer, terms: int, problems: int, max_new_tokens: int) -> dict:
    from scope_opd.analysis.recovery import RecoverySettings, TooFewIncorrectError, run_recovery_analysis
    from scope_opd.evaluation.benchmarks import Problem, ProblemSet
    from scope_opd.toy.sums import sum_problems

    chosen = sum_problems("test", problems, seed=99, terms=terms)
    problem_set = ProblemSet("recovery", [Problem(id=str(i), prompt=p.prompt, answer=p.answer) for i, p in enumerate(chosen)],
                             verifier="math")
    settings = RecoverySettings(max_new_tokens=max_new_tokens, batch_size=256, teacher_batch_size=256,
                                apply_chat_template=False, verifier_workers=1)
    try:
        result = run_recovery_analysis(student, teacher, tokenizer, problem_set, settings, progress=False)
    except TooFewIncorrectError as err:
        return {"skipped": str(err)}
    return {key: result[key] for key in ("counts", "buckets", "recovery", "gaps") if key in result}


def main(argv=None) -> int:
    import torch

    from scope_opd.toy.models import ToyModelPaths, build_toy_pair, default_cache_dir, max_completion_tokens, recipe_for
    from scope_opd.toy.sums import sum_problems

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="default", help="default or an alternative: 5-terms, student-60-25-15, student-85-10-5")
    parser.add_argument("--quick", action="store_true", help="the tiny test recipe (seconds; the numbers mean nothing)")
    parser.add_argument("--problems", type=int, default=160, help="test problems for accuracies and weights")
    parser.add_argument("--recovery-problems", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="toy model cache (default: the demo's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    variants = _variants()
    if args.quick:
        recipe = recipe_for("sums", quick=True)
    elif args.variant in variants:
        recipe = variants[args.variant]
    else:
        parser.error(f"--variant must be one of {sorted(variants)}, got {args.variant!r}")
    root = args.cache or default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{recipe.name}-seed{args.seed}"
    cached = (root / name / "recipe.json").is_file()
    if not cached:
        build_toy_pair(recipe, root, name, seed=args.seed, progress=False)
    info = json.loads((root / name / "recipe.json").read_text())
    paths = ToyModelPaths(root / name / "teacher", root / name / "student")
    report = {"recipe": recipe.name, "variant": "quick" if args.quick else args.variant, "seed": args.seed,
              "build_seconds": info["build_seconds"], "load_at_start": os.getloadavg()}
    print(f"{recipe.name} seed {args.seed}: build seconds {info['build_seconds']} "
          f"({'cached' if cached else 'built now'}); load {os.getloadavg()}", flush=True)

    teacher, tokenizer = _load(paths.teacher)
    student, _ = _load(paths.student)
    problems = sum_problems("test", args.problems, seed=1234, terms=recipe.terms)
    max_new = -(-max_completion_tokens(recipe) // 8) * 8
    for role, model in (("teacher", teacher), ("student", student)):
        t = time.perf_counter()
        completions = sample(model, tokenizer, problems, 8, max_new)
        acc = accuracy(problems, completions)
        correct = acc.pop("correct")
        report[role] = {k: round(v, 3) if isinstance(v, float) else v for k, v in acc.items()}
        print(f"{role}: Avg@8 {acc['avg']:.1%} Pass@8 {acc['pass']:.1%} mixed groups {acc['mixed_groups']:.1%} "
              f"correct by strategy {acc['correct_strategies']} ({time.perf_counter() - t:.0f} s)", flush=True)
        if role == "student":
            report["signals"] = signals(student, teacher, tokenizer, problems, completions, correct)
    for key, value in report["signals"].items():
        print(f"{key}: {value}", flush=True)
    t = time.perf_counter()
    report["recovery"] = recovery(student, teacher, tokenizer, recipe.terms, args.recovery_problems, 2 * max_new)
    rec = report["recovery"]
    print(f"recovery ({time.perf_counter() - t:.0f} s):", flush=True)
    if "skipped" in rec:
        print(f"  skipped: {rec['skipped']}")
    else:
        counts = rec["counts"]
        print(f"  {counts['incorrect']} wrong of {counts['samples']} student samples; rate of correct teacher "
              "continuations from r x the solution, by teacher-perplexity quartile:")
        ppl = {b["bucket"]: b["mean_ppl"] for b in rec["buckets"]}
        for bucket, row in rec["recovery"].items():
            cells = "  ".join(f"r={r} {cell['rate']:.2f}" for r, cell in row.items())
            print(f"  {bucket:>3} (PPL {ppl[bucket]:.2f})  {cells}" if bucket in ppl else f"  {bucket:>3}             {cells}")
        print("  gap Q1-Q4: " + "  ".join(f"r={r} {g['gap']:+.2f}" for r, g in rec["gaps"].items()))
    report["load_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
