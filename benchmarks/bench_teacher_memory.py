"""Peak memory of in-process teacher scoring: TRL's fused head, materialised logits and the chunked top-k path.

Each path runs in a fresh child process (so neither inherits the other's allocator state) on the
same randomly initialised Qwen2-shaped teacher: a realistic vocabulary (151,936, Qwen2's) and
completion length (default 2 rows x 4,096 tokens in one forward) with a tiny hidden size, so that
it fits on a CPU. Peak = the highest resident set (CPU: /proc VmHWM, reset just before scoring) or
the highest allocated CUDA memory, minus what was in use just before scoring: the model and its
inputs are not counted, the activations and the logits (or the fused head's tiles) are.

    python benchmarks/bench_teacher_memory.py                         # CPU, fp32
    python benchmarks/bench_teacher_memory.py --rows 8 --completion-tokens 12288 --hidden 896  # GPU, bf16
    python benchmarks/bench_teacher_memory.py --model "$(bash scripts/smollm2.sh | tail -1)"   # a real checkpoint

With ``--model`` the teacher is that checkpoint (its vocabulary, hidden size and layers; ``--vocab``,
``--hidden`` and ``--layers`` are ignored) and the token ids are drawn from its vocabulary.

Paths: ``fused`` (``InProcessTeacher``, TRL's head: what ``opd_loss="sampled"`` trains with), ``logits``
(``fused=False``), ``chunked`` (``score_topk(..., --top-k)`` of ``chunked_scorer.memory_lean(teacher)``: the
tiled ``ChunkedTeacherScorer`` that ``opd_loss="topk_*"`` trains with, returning the sampled tokens' log-probs and
the teacher's top-k per position).

The last line reads ``teacher peak memory: chunked X MiB vs logits Y MiB (Zx less)`` (the top-k path
against materialised logits); the lines before it, each path's peak and time, the fused head's ratio, and
the largest differences between the paths' log-probs.
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

PATHS = ("fused", "logits", "chunked")


def measure(path: str, args, out_file: str) -> None:
    """Child process: build the teacher, score once on ``path`` ("fused", "logits" or "chunked"), write peak and log-probs."""
    from scope_opd.teachers import InProcessTeacher

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = _teacher_model(args).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(args.rows)]
    completions = [torch.randint(0, args.vocab, (args.completion_tokens,), generator=generator).tolist() for _ in range(args.rows)]
    teacher = InProcessTeacher(model, batch_size=args.rows, temperature=args.temperature, fused=path == "fused")
    assert teacher.fused == (path == "fused"), f"{path} path not available"
    if path == "chunked":
        from scope_opd.teachers.chunked_scorer import ChunkedTeacherScorer, memory_lean

        # Built (and self-checked) before the measurement, as the trainer builds it before its first step.
        teacher = memory_lean(teacher)
        assert isinstance(teacher, ChunkedTeacherScorer), "the chunked scorer cannot serve this model"

        def score():
            return [row.logprobs for row in teacher.score_topk(prompts, completions, args.top_k)]
    else:
        def score():
            return teacher.score(prompts, completions)

    scores, peak, seconds = peak_memory_of(device, score)
    torch.save(torch.stack(scores), out_file + ".pt")
    with open(out_file, "w") as f:
        json.dump({"peak_bytes": peak, "seconds": seconds}, f)


def _teacher_model(args):
    """The checkpoint at ``--model``, else a random Qwen2 of ``--vocab`` / ``--hidden`` / ``--layers``."""
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.prompt_tokens + args.completion_tokens + 8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def _describe_model(args) -> None:
    """Fill ``args.vocab`` / ``hidden`` / ``layers`` from ``--model``'s config (for the report and the token ids)."""
    if not args.model:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model).get_text_config()
    args.vocab, args.hidden, args.layers = config.vocab_size, config.hidden_size, config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint (directory or hub id) to use as the teacher")
    parser.add_argument("--rows", type=int, default=2, help="rows in the one teacher forward (teacher_batch_size)")
    parser.add_argument("--completion-tokens", type=int, default=4096, help="completion tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary (default Qwen2's 151,936)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (tiny by default: the head's output is what we measure)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are ~6x slower)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the child processes")
    parser.add_argument("--top-k", type=int, default=20, help="teacher tokens per position on the chunked path (teacher_top_k)")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    _describe_model(args)
    if args.child:
        measure(args.child, args, args.out)
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_teacher_memory_") as tmp:
        for path in PATHS:
            out = os.path.join(tmp, path + ".json")
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", path, "--out", out]
            subprocess.run(child, check=True)
            with open(out) as f:
                results[path] = json.load(f)
            results[path]["logprobs"] = torch.load(out + ".pt")
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    logits_bytes = args.rows * args.completion_tokens * args.vocab * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    print(f"machine: {device}, torch {torch.__version__}, {args.dtype}, {args.threads} thread(s)")
    print(f"one teacher forward: {args.rows} rows x ({args.prompt_tokens} prompt + {args.completion_tokens} completion) tokens, "
          f"vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, temperature {args.temperature}"
          + (f"; model {args.model}" if args.model else " (random Qwen2)"))
    print(f"[completion tokens, V] logits alone would be {logits_bytes / MIB:,.0f} MiB")
    for path in PATHS:
        label = f"chunked (top-{args.top_k})" if path == "chunked" else path
        print(f"{label:>16}: peak {results[path]['peak_bytes'] / MIB:,.0f} MiB, {results[path]['seconds']:.1f} s")
    for path in ("fused", "chunked"):
        diff = (results[path]["logprobs"] - results["logits"]["logprobs"]).abs().max().item()
        print(f"max |{path} - logits| log-prob difference: {diff:.2e}")
    fused, chunked, logits = (results[path]["peak_bytes"] / MIB for path in ("fused", "chunked", "logits"))
    print(f"fused head: {fused:,.0f} MiB vs logits {logits:,.0f} MiB ({logits / max(fused, 1e-9):.1f}x less)")
    print(f"teacher peak memory: chunked {chunked:,.0f} MiB vs logits {logits:,.0f} MiB ({logits / max(chunked, 1e-9):.1f}x less)")


if __name__ == "__main__":
    main()
