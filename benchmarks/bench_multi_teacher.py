"""Several teachers on the toy sums task: does each routing do what it claims, and does a second teacher help?

Two specialist teachers are SFT'd on the sums train split, one writing only left-to-right rewrites
("left": (a+b)+c+d first), one only right-to-left ("right": a+b+(c+d) first); the student is the demo's
sums student (it writes both, and "pairs"). Then:

1. ``min_perplexity`` routing (the real :class:`~scope_opd.teachers.routing.TeacherPool`): the student's
   wrong rollouts on test prompts whose first line is one strategy's first rewrite; the fraction routed to
   that strategy's teacher (95% Wilson interval).
2. ``key`` routing: a column naming a teacher per prompt; each teacher's recorded rows against the column.
3. A paired comparison over seeds: SCOPE with the left teacher alone vs both teachers under
   ``min_perplexity`` and under ``key`` (a per-prompt tag that carries no strategy information: prompt
   index parity), held-out Avg accuracy after a short run (mean difference and 95% t interval).

    OMP_NUM_THREADS=1 python benchmarks/bench_multi_teacher.py --seeds 3 --steps 12 --out /tmp/multi-teacher.json

Not part of the demo's time budget: teachers ~2-6 min each to build on a shared 2-core machine (cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

STRATEGIES = ("left", "right")


def build_specialist(strategy: str, steps: int, seed: int, cache: Path) -> Path:
    """A sums teacher SFT'd on one strategy only (the demo's teacher architecture, ``steps`` steps), cached."""
    from scope_opd.toy.models import SUMS_RECIPES, _save_checkpoint, sft_texts, train_toy_model
    from scope_opd.toy.tokenizer import build_char_tokenizer

    path = cache / f"sums-{strategy}-only-steps{steps}-seed{seed}"
    if (path / "config.json").is_file():
        return path
    recipe = dataclasses.replace(SUMS_RECIPES["default"], teacher_mix=((strategy, 1.0),),
                                 teacher=dataclasses.replace(SUMS_RECIPES["default"].teacher, steps=steps))
    tokenizer = build_char_tokenizer()
    start = time.perf_counter()
    model = train_toy_model(recipe.teacher, tokenizer, seed=seed, progress=False, desc=f"{strategy} teacher",
                            texts=sft_texts(recipe, "teacher", seed))
    _save_checkpoint(model, tokenizer, path, recipe)
    print(f"built the {strategy}-only teacher in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return path


def first_line_strategy(problem, completion: str) -> str | None:
    """The strategy of the completion's first rewrite, by which terms it keeps (arithmetic errors included).

    For a+b+c+d: "left" keeps c and d as the last two of three terms ((a+b)+c+d), "right" keeps a and b as the
    first two of three (a+b+(c+d)); anything else (pairs, a malformed line) is ``None``.
    """
    first = completion.split("\n", 1)[0]
    try:
        terms = tuple(int(t) for t in first.split("+"))
    except ValueError:
        return None
    a, b, c, d = problem.numbers
    hits = [s for s, ok in (("left", len(terms) == 3 and terms[1:] == (c, d)),
                            ("right", len(terms) == 3 and terms[:2] == (a, b))) if ok]
    return hits[0] if len(hits) == 1 else None


def wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


class Recording:
    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def score(self, prompt_ids, completion_ids):
        self.rows.extend(tuple(p) + (-1,) + tuple(c) for p, c in zip(prompt_ids, completion_ids))
        return self.inner.score(prompt_ids, completion_ids)


def routing_measurement(student_dir: Path, teachers: dict, n_prompts: int, samples: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_opd.teachers import InProcessTeacher
    from scope_opd.teachers.routing import TeacherPool
    from scope_opd.toy.sums import sum_problems, verify_sum_answer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    problems = sum_problems("test", n_prompts, seed=5, terms=4)
    torch.manual_seed(0)
    rows = []  # (problem, prompt ids, completion ids, strategy of the first line)
    for problem in problems:
        prompt = tokenizer(problem.prompt, return_tensors="pt")
        with torch.no_grad():
            out = student.generate(**prompt, do_sample=True, temperature=0.6, max_new_tokens=64,
                                   num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        for seq in out[:, prompt["input_ids"].shape[1]:]:
            ids = seq.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            else:
                ids = [i for i in ids if i != tokenizer.pad_token_id]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if verify_sum_answer(text, problem.answer) < 1.0:
                rows.append((problem, prompt["input_ids"][0].tolist(), ids, first_line_strategy(problem, text)))
    labelled = [r for r in rows if r[3] is not None]
    inner = {name: InProcessTeacher(AutoModelForCausalLM.from_pretrained(path)) for name, path in teachers.items()}
    pool = TeacherPool(inner, routing="min_perplexity")
    pool.score([r[1] for r in labelled], [r[2] for r in labelled])
    routes = pool.last_routes
    result = {"wrong_rollouts": len(rows), "labelled_by_first_line": len(labelled)}
    for strategy in STRATEGIES:
        mine = [route for r, route in zip(labelled, routes) if r[3] == strategy]
        k = sum(route == strategy for route in mine)
        result[f"{strategy}_rollouts"] = len(mine)
        result[f"{strategy}_routed_to_{strategy}_teacher"] = k
        result[f"{strategy}_fraction"] = k / len(mine) if mine else None
        result[f"{strategy}_wilson95"] = wilson(k, len(mine))
    k = sum(route == r[3] for r, route in zip(labelled, routes))
    result["overall_fraction"] = k / len(labelled) if labelled else None
    result["overall_wilson95"] = wilson(k, len(labelled))

    # key routing: a column names each row's teacher; every teacher must get exactly those rows.
    recording = {name: Recording(t) for name, t in inner.items()}
    key_pool = TeacherPool(recording, routing="key")
    column = [STRATEGIES[i % 2] for i in range(len(labelled))]
    key_pool.score([r[1] for r in labelled], [r[2] for r in labelled], teacher_names=column)
    exact = all(
        sorted(recording[name].rows) == sorted(tuple(r[1]) + (-1,) + tuple(r[2]) for r, c in zip(labelled, column) if c == name)
        for name in STRATEGIES
    )
    result["key_rows_per_teacher"] = {name: len(recording[name].rows) for name in STRATEGIES}
    result["key_column_counts"] = {name: column.count(name) for name in STRATEGIES}
    result["key_exact"] = exact
    return result


def train_and_eval(arm: str, seed: int, student_dir: Path, teachers: dict, steps: int, out: Path, eval_prompts: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from scope_opd.toy.sums import sum_dataset
    from scope_opd.trainer import SCOPEConfig, SCOPETrainer
    from scope_opd.verifiers import RewardFunction

    train = sum_dataset("train", 400, seed=seed, terms=4)
    train = train.add_column("teacher", [STRATEGIES[i % 2] for i in range(len(train))])
    common = dict(output_dir=str(out / f"{arm}-seed{seed}"), algorithm="scope", verifier="math",
                  per_device_train_batch_size=64, num_generations=8, max_completion_length=64, temperature=0.6,
                  learning_rate=1e-4, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  bf16=False, seed=seed, data_seed=seed, disable_tqdm=True)
    if arm == "left-only":
        config = SCOPEConfig(teacher_model=str(teachers["left"]), **common)
    else:
        config = SCOPEConfig(teachers={name: {"model": str(path)} for name, path in teachers.items()},
                             teacher_routing=arm.removeprefix("both-"), **common)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    reward = RewardFunction("math", answer_field="answer", max_workers=1)
    trainer = SCOPETrainer(model, reward_funcs=[reward], args=config, train_dataset=train, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        reward.close()
    return held_out_accuracy(model, tokenizer, eval_prompts)


def held_out_accuracy(model, tokenizer, eval_prompts: int) -> float:
    """Avg@4 on ``eval_prompts`` test problems (temperature 0.6, top-p 0.95, top-k 20, sampling seed 0)."""
    from scope_opd.evaluation import Problem, ProblemSet, SamplingSettings, evaluate_model
    from scope_opd.toy.sums import sum_problems

    problems = sum_problems("test", eval_prompts, seed=99, terms=4)
    problem_set = ProblemSet("sums", [Problem(id=str(i), prompt=p.prompt, answer=p.answer) for i, p in enumerate(problems)],
                             verifier="math")
    sampling = SamplingSettings(n=4, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=64, batch_size=256, seed=0)
    result = evaluate_model(model, problem_set, tokenizer=tokenizer, settings=sampling, ks=[1], progress=False,
                            verifier_workers=1)
    return result.benchmarks["sums"]["avg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--teacher-steps", type=int, default=700)
    parser.add_argument("--routing-prompts", type=int, default=60)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", default="/tmp/bench-multi-teacher.json")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "scope_opd"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from scope_opd.toy.models import ensure_toy_models

    cache = Path(args.cache)
    student_dir = ensure_toy_models(task="sums", progress=False).student
    teachers = {s: build_specialist(s, args.teacher_steps, 0, cache) for s in STRATEGIES}
    report = {"teacher_steps": args.teacher_steps, "student": str(student_dir)}
    start = time.perf_counter()
    report["routing"] = routing_measurement(student_dir, teachers, args.routing_prompts, 8)
    report["routing_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report["routing"], indent=1), flush=True)
    if not args.skip_training:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from scope_opd.toy.stats import paired_comparison

        report["untrained_student_avg"] = held_out_accuracy(AutoModelForCausalLM.from_pretrained(student_dir),
                                                            AutoTokenizer.from_pretrained(student_dir), args.eval_prompts)
        print(f"untrained student: Avg@4 {report['untrained_student_avg']:.3f}", flush=True)

        arms = ("left-only", "both-min_perplexity", "both-key")
        accuracy = {arm: [] for arm in arms}
        for seed in range(args.seeds):
            for arm in arms:
                start = time.perf_counter()
                accuracy[arm].append(train_and_eval(arm, seed, student_dir, teachers, args.steps, Path(args.out).parent
                                                    / "bench-multi-teacher-runs", args.eval_prompts))
                print(f"seed {seed} {arm}: Avg@4 {accuracy[arm][-1]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        report["accuracy"] = accuracy
        report["paired"] = {f"{arm} - left-only": paired_comparison(accuracy[arm], accuracy["left-only"]) for arm in arms[1:]}
        print(json.dumps(report["paired"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
