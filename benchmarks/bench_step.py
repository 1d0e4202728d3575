"""Seconds per training step, GRPO vs OPD vs SCOPE, same batch, same machine, interleaved.

Prints a paper-Table-8-style breakdown (generation, old log-prob, reference log-prob,
reward, teacher scoring, update) from the trainer's own ``timing/*`` metrics and the
ratio ``(SCOPE step - teacher time) / GRPO step``: what SCOPE costs beyond the teacher.
GRPO is measured twice: TRL's default (beta = 0: no reference model, and no separate
old-log-prob pass when steps are aligned) and the paper's (beta = 1e-4: a reference pass).

    python benchmarks/bench_step.py                      # CPU, the toy teacher/student
    python benchmarks/bench_step.py --random-qwen2 0.5b  # GPU: random ~0.5B student, ~1.5B teacher, bf16

Rounds interleave the methods (A B C A B C ...) so machine noise hits all alike; the
table shows medians over rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

PHASES = ("generation", "old_logprob", "ref_logprob", "reward", "teacher", "update")
METHODS = {
    "grpo(beta=0)": dict(algorithm="grpo", beta=0.0),
    "grpo(beta=1e-4)": dict(algorithm="grpo", beta=1e-4),
    "opd": dict(algorithm="opd"),
    "scope": dict(algorithm="scope"),
}

RANDOM_SIZES = {  # (hidden, layers, heads, kv_heads, intermediate) roughly Qwen2-0.5B / 1.5B shaped
    "0.5b": ((896, 24, 14, 2, 4864), (1536, 28, 12, 2, 8960)),
    "tiny": ((64, 2, 4, 2, 128), (128, 2, 4, 2, 256)),
}


def build_random_pair(size: str, root: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = {}
    for role, (hidden, layers, heads, kv, inter) in zip(("student", "teacher"), RANDOM_SIZES[size]):
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
        torch.manual_seed(0 if role == "student" else 1)
        model = Qwen2ForCausalLM(config).to(dtype)
        model.save_pretrained(f"{root}/{role}")
        tokenizer.save_pretrained(f"{root}/{role}")
        paths[role] = f"{root}/{role}"
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="student path (default: toy student)")
    parser.add_argument("--teacher", help="teacher path (default: toy teacher)")
    parser.add_argument("--random-qwen2", choices=sorted(RANDOM_SIZES), help="use randomly initialised Qwen2-shaped models")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from scope_opd.toy.task import toy_dataset
    from scope_opd.trainer import SCOPEConfig, SCOPETrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    workdir = tempfile.mkdtemp(prefix="bench_step_")
    if args.random_qwen2:
        paths = build_random_pair(args.random_qwen2, workdir, dtype)
    elif args.student and args.teacher:
        paths = {"student": args.student, "teacher": args.teacher}
    else:
        from scope_opd.toy.models import ensure_toy_models

        toy = ensure_toy_models()
        paths = {"student": str(toy.student), "teacher": str(toy.teacher)}
    prompts = toy_dataset("train", args.prompts * (args.rounds + 1) * args.steps_per_round * 4, seed=0)
    dataset = Dataset.from_dict({"prompt": prompts["prompt"], "answer": prompts["answer"]})
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])

    trainers, initial_weights = {}, None
    for name, overrides in METHODS.items():
        config = SCOPEConfig(
            output_dir=f"{workdir}/{name}", per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations, max_completion_length=args.max_completion_length,
            max_steps=args.steps_per_round, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=not cuda, bf16=cuda, seed=0, verifier="exact", disable_tqdm=True,
            teacher_model=None if overrides["algorithm"] == "grpo" else paths["teacher"],
            **overrides,
        )
        model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=dtype)
        if initial_weights is None:
            initial_weights = {k: v.clone() for k, v in model.state_dict().items()}
        trainers[name] = SCOPETrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainers[name].remove_callback(PrinterCallback)  # the table below is the output

    per_method = {name: [] for name in METHODS}
    for round_index in range(args.rounds + 1):
        for name, trainer in trainers.items():
            # Every round starts from the same student, so each method samples from the same policy.
            trainer.model.load_state_dict(initial_weights)
            trainer.state.log_history.clear()
            start = time.perf_counter()
            trainer.train()
            wall = (time.perf_counter() - start) / args.steps_per_round
            if round_index == 0:
                continue  # warm-up
            steps = [h for h in trainer.state.log_history if "timing/update" in h]
            for h in steps:
                row = {phase: h.get(f"timing/{phase}", 0.0) for phase in PHASES}
                row["total"] = sum(row.values())
                row["wall"] = wall
                per_method[name].append(row)

    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}"
    print(f"machine: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {dtype}")
    print(f"batch: {args.prompts} prompts x {args.generations} rollouts, max {args.max_completion_length} new tokens; "
          f"student {paths['student']}, teacher {paths['teacher']}")
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in (*PHASES, "total", "wall")}
        for name, rows in per_method.items()
    }
    header = "| phase (s/step) | " + " | ".join(METHODS) + " |"
    print(header)
    print("|" + "---|" * (len(METHODS) + 1))
    for key in (*PHASES, "total"):
        print(f"| {key} | " + " | ".join(f"{medians[m][key]:.3f}" for m in METHODS) + " |")
    scope, opd = medians["scope"], medians["opd"]
    for baseline in ("grpo(beta=0)", "grpo(beta=1e-4)"):
        ratio = (scope["total"] - scope["teacher"]) / medians[baseline]["total"]
        print(f"(SCOPE step - teacher) / {baseline} step = {ratio:.3f}")
    print(f"teacher share of a SCOPE step = {scope['teacher'] / scope['total']:.1%} (paper Table 8: 31%)")
    print(f"(OPD step - teacher) / grpo(beta=0) step = {(opd['total'] - opd['teacher']) / medians['grpo(beta=0)']['total']:.3f}")


if __name__ == "__main__":
    main()
