"""Peak memory of in-process teacher scoring: materialised logits vs TRL's fused head vs our tiled scorer.

Side by side in one run, each variant in a fresh child process (none inherits another's allocator
state) on the same randomly initialised Qwen2-shaped teacher: a realistic vocabulary (151,936,
Qwen2's) and completion length (default 2 rows x (64 prompt + 4,096 completion) tokens in one
forward) with a tiny hidden size, so that it fits on a CPU and the head's output is what dominates.

Variants:

* ``logits``: :class:`~scope_opd.teachers.InProcessTeacher` with ``fused=False`` (``[completion tokens, V]`` logits);
* ``fused``: the same with TRL's ``add_fused_lm_head`` (skipped, and said so, where TRL cannot install it);
* ``chunked``: :class:`~scope_opd.teachers.chunked_scorer.ChunkedTeacherScorer`, sampled-token log-probs;
* ``chunked-top20``: the same, with the teacher's top-20 per position (what ``opd_loss="topk_*"`` needs).

Peak = the highest resident set (CPU: ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``
just before scoring) or the highest allocated CUDA memory, minus what was in use just before scoring:
the model and its inputs are not counted, the activations and the logits (or tiles) are.

    python benchmarks/bench_topk_scorer.py                                   # CPU, fp32, the issue's shape
    python benchmarks/bench_topk_scorer.py --completion-tokens 1024          # a lighter shape
    python benchmarks/bench_topk_scorer.py --rows 8 --completion-tokens 12288 --hidden 896   # GPU, bf16

The last line reads ``teacher peak memory: chunked X MiB vs logits Y MiB (Nx less)``; the lines
before it give every variant's peak and time and its largest log-prob difference from ``logits``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
from _memory import MIB, peak_memory_of

VARIANTS = ("logits", "fused", "chunked", "chunked-top20")


def measure(variant: str, args, out_file: str) -> None:
    """Child process: build the teacher, score once with ``variant``, write peak, time and log-probs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_opd.teachers import InProcessTeacher
    from scope_opd.teachers.chunked_scorer import ChunkedTeacherScorer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.prompt_tokens + args.completion_tokens + 8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(args.rows)]
    completions = [torch.randint(0, args.vocab, (args.completion_tokens,), generator=generator).tolist() for _ in range(args.rows)]
    top_k = 20 if variant == "chunked-top20" else 0
    if variant.startswith("chunked"):
        teacher = ChunkedTeacherScorer(
            model, batch_size=args.rows, temperature=args.temperature,
            token_chunk_size=args.token_chunk_size, vocab_chunk_size=args.vocab_chunk_size or None,
        )
    else:
        teacher = InProcessTeacher(model, batch_size=args.rows, temperature=args.temperature, fused=variant == "fused")
        if teacher.fused != (variant == "fused"):
            with open(out_file, "w") as f:
                json.dump({"skipped": "TRL's fused head could not be installed on this model"}, f)
            return

    scores, peak, seconds = peak_memory_of(device, lambda: teacher.score_tokens(prompts, completions, top_k=top_k))
    torch.save(torch.stack([row.logprobs for row in scores]), out_file + ".pt")
    with open(out_file, "w") as f:
        json.dump({"peak_bytes": peak, "seconds": seconds}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2, help="rows in the one teacher forward (teacher_batch_size)")
    parser.add_argument("--completion-tokens", type=int, default=4096, help="completion tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary (default Qwen2's 151,936)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (tiny by default: the head's output is what we measure)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--token-chunk-size", type=int, default=512, help="chunked scorer: completion positions per tile")
    parser.add_argument("--vocab-chunk-size", type=int, default=32_768, help="chunked scorer: vocabulary entries per tile (0: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the child processes")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        measure(args.child, args, args.out)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "logits" not in variants or "chunked" not in variants:
        parser.error(f"--variants must include logits and chunked, from {VARIANTS}; got {args.variants!r}")

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_topk_scorer_") as tmp:
        for variant in variants:
            out = os.path.join(tmp, variant + ".json")
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", variant, "--out", out]
            subprocess.run(child, check=True)
            with open(out) as f:
                results[variant] = json.load(f)
            if "skipped" not in results[variant]:
                results[variant]["logprobs"] = torch.load(out + ".pt")
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    element = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    logits_bytes = args.rows * args.completion_tokens * args.vocab * element
    tile = args.token_chunk_size * (args.vocab_chunk_size or args.vocab) * 4
    print(f"machine: {device}, load average {load}, torch {torch.__version__}, {args.dtype}, {args.threads} thread(s)")
    print(f"one teacher forward: {args.rows} rows x ({args.prompt_tokens} prompt + {args.completion_tokens} completion) tokens, "
          f"vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, temperature {args.temperature}")
    print(f"[completion tokens, V] logits alone would be {logits_bytes / MIB:,.0f} MiB; one chunked tile "
          f"({args.token_chunk_size} x {args.vocab_chunk_size or args.vocab:,} float32) is {tile / MIB:,.0f} MiB")
    reference = results["logits"]["logprobs"]
    for variant in variants:
        result = results[variant]
        if "skipped" in result:
            print(f"{variant:>13}: skipped ({result['skipped']})")
            continue
        diff = (result["logprobs"] - reference).abs().max().item()
        print(f"{variant:>13}: peak {result['peak_bytes'] / MIB:,.0f} MiB, {result['seconds']:.1f} s, "
              f"max |log-prob - logits| {diff:.1e}")
    chunked, logits = results["chunked"]["peak_bytes"] / MIB, results["logits"]["peak_bytes"] / MIB
    print(f"teacher peak memory: chunked {chunked:,.0f} MiB vs logits {logits:,.0f} MiB ({logits / max(chunked, 1e-9):.1f}x less)")


if __name__ == "__main__":
    main()
