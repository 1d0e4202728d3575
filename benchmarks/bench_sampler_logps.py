"""Sampler log-probs vs the trainer's old-log-prob forward: how much would SCOPE's student-guided weights move?

Tinker uses the sampler's log-probs instead of recomputing them; TRL exposes them as
``sampling_per_token_logps`` when vLLM generates. No vLLM here, so the sampler is emulated by the
only honest means at hand: transformers ``generate`` with ``output_scores`` (the processed,
temperature-scaled logits of each decoding step, computed incrementally with the KV cache, in the
sampler's dtype). The trainer's side is what SCOPE computes today: one full-sequence forward of
``prompt + completion`` in float32 at the rollout temperature. Both go through
``dual_path_weights`` with the same verdicts and teacher log-probs; the script prints the
largest differences of the student's sequence mean log-prob and of the correct-path weights.

    python benchmarks/bench_sampler_logps.py                        # toy models, sampler in fp32
    python benchmarks/bench_sampler_logps.py --sampler-dtype bfloat16

What this cannot show: vLLM's own kernels (paged attention, its bf16 sampler, batch-dependent
reductions), where TRL measured mismatches large enough to add an importance-sampling correction.
"""

from __future__ import annotations

import argparse
import platform

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6, help="rollout temperature (paper: 0.6)")
    parser.add_argument("--sampler-dtype", default="float32", help="dtype of the emulated sampler (the trainer is fp32)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from scope_opd.algorithms import dual_path_weights, sequence_mean_logp
    from scope_opd.teachers import InProcessTeacher
    from scope_opd.toy.models import ensure_toy_models
    from scope_opd.toy.task import toy_dataset
    from scope_opd.verifiers import exact_score

    toy = ensure_toy_models()
    tokenizer = AutoTokenizer.from_pretrained(toy.student)
    trainer_model = AutoModelForCausalLM.from_pretrained(toy.student, dtype=torch.float32).eval()
    sampler_model = AutoModelForCausalLM.from_pretrained(toy.student, dtype=getattr(torch, args.sampler_dtype)).eval()
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(toy.teacher, dtype=torch.float32))
    data = toy_dataset("train", args.prompts, seed=0)

    prompts = [tokenizer.encode(p) for p in data["prompt"] for _ in range(args.generations)]
    answers = [a for a in data["answer"] for _ in range(args.generations)]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = sampler_model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                     output_scores=True, return_dict_in_generate=True)
    sampled = out.sequences[:, width:]
    # The processed scores are the sampling distribution's logits (temperature applied; top-k/p off).
    sampler_logps = torch.stack(
        [torch.log_softmax(score.float(), dim=-1).gather(1, sampled[:, t : t + 1]).squeeze(1) for t, score in enumerate(out.scores)],
        dim=1,
    )
    is_eos = sampled == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((len(prompts),), sampled.shape[1]))
    mask = torch.arange(sampled.shape[1])[None] <= first_eos[:, None]
    completions = [row[m].tolist() for row, m in zip(sampled, mask)]

    with torch.no_grad():  # the trainer's old-log-prob forward: full sequence, fp32, rollout temperature
        full = torch.cat([input_ids, sampled], dim=1)
        full_mask = torch.cat([attention_mask, mask.long()], dim=1)
        logits = trainer_model(input_ids=full, attention_mask=full_mask).logits[:, width - 1 : -1].float() / args.temperature
        trainer_logps = torch.log_softmax(logits, dim=-1).gather(2, sampled[:, :, None]).squeeze(2)

    correct = torch.tensor([exact_score(tokenizer.decode(c, skip_special_tokens=True), a) >= 1.0
                            for c, a in zip(completions, answers)])
    teacher_logps = torch.zeros_like(trainer_logps)
    for i, row in enumerate(teacher.score([list(p) for p in prompts], completions)):
        teacher_logps[i, : len(row)] = row
    groups = torch.arange(len(prompts)) // args.generations
    teacher_mean = sequence_mean_logp(teacher_logps, mask)
    results = {}
    for name, logps in (("sampler", sampler_logps), ("trainer", trainer_logps)):
        student_mean = sequence_mean_logp(torch.where(mask, logps, 0.0), mask)
        weights, _ = dual_path_weights(groups, correct, student_mean, teacher_mean)
        results[name] = (student_mean, weights)
    token_diff = (sampler_logps - trainer_logps)[mask].abs()
    mean_diff = (results["sampler"][0] - results["trainer"][0]).abs()
    weight_diff = (results["sampler"][1] - results["trainer"][1])[correct].abs()
    print(f"machine: CPU {platform.machine()}, torch {torch.__version__}; toy student, {args.prompts} prompts x "
          f"{args.generations} rollouts, <= {args.max_new_tokens} new tokens, temperature {args.temperature}; "
          f"sampler {args.sampler_dtype} (generate, KV cache), trainer float32 (full forward)")
    print(f"correct rows: {int(correct.sum())} of {len(prompts)}; tokens: {int(mask.sum())}")
    print(f"token log-prob |sampler - trainer|: max {token_diff.max():.2e}, mean {token_diff.mean():.2e}")
    print(f"student sequence mean log-prob |diff|: max {mean_diff.max():.2e}")
    print(f"correct-path weight |diff|: max {weight_diff.max() if weight_diff.numel() else 0.0:.2e} "
          f"(weights are O(1): 'mean' normalisation sums a path's weights to its size)")


if __name__ == "__main__":
    main()
