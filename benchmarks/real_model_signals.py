"""SCOPE's signals on a real model: a sometimes-right SmolLM2 student and a more often right SmolLM2 teacher.

The pair (built once and cached by scripts/word_problems_teacher.py, seeded): the student is SmolLM2-135M-Instruct
after a 4-step SFT on the word problems' worked solutions (``--steps 4 --out smollm2-word-problems-student``), the
teacher the same recipe run for 12 steps. The pair was chosen from accuracies alone (the base model is never right
on these problems; the 4-step SFT is right on some samples of most problems, the 12-step SFT more often).

Like benchmarks/calibrate_toy.py for the toy, and through the user-facing commands only:

* ``scope eval`` of the student and the teacher on held-out word problems (scope_opd.tasks.word_problems, test
  split; ``verifier: math``, the paper's \\boxed{} instruction): Avg@k / Pass@k, the share of problems whose k
  samples mix right and wrong (what gives SCOPE's student-guided path rows to weight), the share cut at the
  token budget;
* ``scope train`` with the paper's SCOPE preset (CPU overrides) for a few steps, reading the trainer's logged
  signals: the largest student- and teacher-guided weight per step, the share of all-right / all-wrong groups,
  and the student and teacher perplexity on right and wrong rollouts;
* ``scope analyze recovery`` (paper Tables 6-7): teacher-perplexity quartiles of the student's wrong solutions
  and the teacher's recovery rate from their prefixes.

The SCOPE-vs-OPD difference is never computed here. On the toy the student-guided weight barely moves
(max 1.18); the last lines say whether it moves more here.

    nice -n 10 python benchmarks/real_model_signals.py [--problems 8 --k 4 --steps 3 --max-tokens 96]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "paper" / "r1-distill-qwen-1.5b.yaml"
TOY_STUDENT_WEIGHT_MAX = 1.18  # benchmarks/calibrate_toy.py on the toy sums pair


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))


def run(command: list[str]) -> str:
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env())
    if result.returncode != 0:
        # the steps logged before the failure (an OOM kill in a later step) are on stdout: keep them
        logged = [line for line in result.stdout.splitlines() if "{'loss'" in line]
        sys.exit(f"{' '.join(command[:4])} ... failed (exit {result.returncode}; -9: killed, e.g. out of memory):\n"
                 + "\n".join(logged) + f"\n{result.stderr[-4000:]}")
    print(f"  ({' '.join(command[2:4])}: {time.time() - start:.0f} s)", file=sys.stderr)
    return result.stdout + result.stderr


def scope(*args: str) -> list[str]:
    return [sys.executable, "-m", "scope_opd.cli", *args]


def accuracy(model: str, test_file: Path, out: Path, k: int, max_tokens: int) -> dict:
    run(scope("eval", "--model", model, "--dataset", str(test_file), "--prompt-field", "question", "--n", str(k),
              "--k", f"1,{k}", "--max-new-tokens", str(max_tokens), "--device", "cpu", "--out", str(out),
              "--no-progress"))
    by_problem: dict[str, list[dict]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        by_problem.setdefault(sample["problem_id"], []).append(sample)
    groups = [[bool(s["correct"]) for s in samples] for samples in by_problem.values()]
    samples = [s for ss in by_problem.values() for s in ss]
    return {
        "avg": 100 * sum(map(sum, groups)) / sum(map(len, groups)),
        "pass": 100 * sum(any(g) for g in groups) / len(groups),
        "mixed": 100 * sum(any(g) and not all(g) for g in groups) / len(groups),
        "boxed": 100 * sum("\\boxed" in s["completion"] for s in samples) / len(samples),
        "cut": 100 * sum(not s["finished"] for s in samples) / len(samples),
        "tokens": sum(s["num_tokens"] for s in samples) / len(samples),
    }


def logged_steps(text: str) -> list[dict]:
    steps = []
    for line in text.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            steps.append(ast.literal_eval(line[start:line.rindex("}") + 1]))
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="default: scripts/word_problems_teacher.py --steps 4 "
                        "--out smollm2-word-problems-student (built when missing)")
    parser.add_argument("--teacher", help="default: scripts/word_problems_teacher.py's checkpoint")
    parser.add_argument("--problems", type=int, default=8, help="held-out problems for eval and recovery")
    parser.add_argument("--k", type=int, default=4, help="samples per problem (eval) and rollouts per prompt (train)")
    parser.add_argument("--steps", type=int, default=3, help="SCOPE steps")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per SCOPE step")
    parser.add_argument("--max-tokens", type=int, default=96, help="completion budget everywhere")
    parser.add_argument("--parts", default="eval,train,recovery",
                        help="comma-separated subset of eval,train,recovery to run (default: all)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"eval", "train", "recovery"}:
        parser.error(f"--parts takes eval, train, recovery; got {args.parts!r}")
    student = args.student or run([sys.executable, str(REPO / "scripts" / "word_problems_teacher.py"), "--steps", "4",
                                   "--out", "smollm2-word-problems-student"]).strip().splitlines()[-1]
    teacher = args.teacher or run([sys.executable, str(REPO / "scripts" / "word_problems_teacher.py")]
                                  ).strip().splitlines()[-1]
    sys.path.insert(0, str(REPO / "src"))
    from scope_opd.tasks.word_problems import word_problems

    work = Path(tempfile.mkdtemp(prefix="real-signals-"))
    files = {}
    for split, n in (("train", args.prompts * args.steps), ("test", args.problems)):
        files[split] = work / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in word_problems(split, n, seed=0)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} at start; one torch thread per model")
    if "eval" in parts:
        print(f"\n## Accuracy on {args.problems} test problems, {args.k} samples, {args.max_tokens} tokens, verifier: math\n")
        print(f"| model | Avg@{args.k} | Pass@{args.k} | mixed groups | has \\boxed | cut at budget | mean tokens |")
        print("|---|---|---|---|---|---|---|")
        for name, model in ((f"student ({Path(student).name})", student), (f"teacher ({Path(teacher).name})", teacher)):
            a = accuracy(model, files["test"], work / f"eval-{name.split()[0]}", args.k, args.max_tokens)
            print(f"| {name} | {a['avg']:.1f} | {a['pass']:.1f} | {a['mixed']:.1f}% | {a['boxed']:.0f}% | "
                  f"{a['cut']:.0f}% | {a['tokens']:.0f} |", flush=True)

    steps = []
    if "train" in parts:
        out = run(scope("train", "--config", str(PRESET), "--model_name_or_path", student, "--teacher_model", teacher,
                        "--dataset_name", str(files["train"]), "--answer_field", "answer", "--output_dir",
                        str(work / "scope"), "--dtype", "float32", "--teacher_dtype", "float32", "--bf16", "false",
                        "--use_cpu", "true", "--use_vllm", "false", "--activation_checkpointing", "false",
                        "--max_completion_length", str(args.max_tokens), "--num_generations", str(args.k),
                        "--per_device_train_batch_size", str(args.prompts * args.k), "--gradient_accumulation_steps",
                        "1", "--steps_per_generation", "1", "--max_steps", str(args.steps), "--save_strategy", "no",
                        "--report_to", "none"))
        steps = logged_steps(out)
        keys = ["scope/frac_correct", "scope/frac_all_correct_groups", "scope/frac_all_wrong_groups",
                "scope/student_weight_max", "scope/teacher_weight_max", "scope/frac_groups_student_weight_above_1.5",
                "scope/frac_groups_teacher_weight_above_1.5", "scope/student_ppl_correct",
                "scope/student_ppl_incorrect", "scope/teacher_ppl_correct", "scope/teacher_ppl_incorrect",
                "completions/clipped_ratio"]
        print(f"\n## SCOPE signals over {args.steps} steps ({args.prompts} prompts x {args.k} rollouts, tau 1, mean "
              f"normalisation)\n")
        print("| step | mixed groups | " + " | ".join(k.split("/")[-1] for k in keys) + " |")
        print("|---" * (len(keys) + 2) + "|")
        for i, step in enumerate(steps, 1):
            mixed = 1 - float(step["scope/frac_all_correct_groups"]) - float(step["scope/frac_all_wrong_groups"])
            print(f"| {i} | {mixed:.3g} | " + " | ".join("-" if step.get(k) is None else f"{float(step[k]):.3g}"
                                                        for k in keys) + " |")

    if "recovery" in parts:
        out = run(scope("analyze", "recovery", "--student", student, "--teacher", teacher, "--dataset",
                        str(files["test"]), "--prompt-field", "question", "--limit", str(args.problems),
                        "--samples-per-problem", str(args.k), "--completions-per-prefix", "2", "--max-new-tokens",
                        str(args.max_tokens), "--device", "cpu", "--out", str(work / "recovery"), "--no-progress"))
        print("\n## Recovery study (paper Tables 6-7)\n")
        print(out[out.find("Teacher perplexity"):out.find("\nwrote")].strip() if "Teacher perplexity" in out else out[-2000:])

    # the trainer logs values as text, and a step without a correct row logs a weight max of 0
    weights = [float(s["scope/student_weight_max"]) for s in steps
               if float(s.get("scope/frac_correct") or 0) > 0 and s.get("scope/student_weight_max") is not None]
    if weights:
        verdict = "stronger than" if max(weights) > TOY_STUDENT_WEIGHT_MAX else "no stronger than"
        print(f"\nstudent-guided weight max {max(weights):.3g} over {len(weights)} steps with a correct row: "
              f"{verdict} the toy's {TOY_STUDENT_WEIGHT_MAX} (a group with a single right rollout gives it "
              "weight 1 by construction: the spread needs groups with two or more)")
    else:
        print("\nno step had a correct rollout: the student-guided path never ran (nothing to compare with the toy's "
              f"{TOY_STUDENT_WEIGHT_MAX})")
    print(f"load at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
