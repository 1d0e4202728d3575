"""scope eval: sample a model on benchmarks and report Avg@n / Pass@k (paper Tables 1, 2, 4).

  scope eval --model M --benchmark AIME24 --benchmark MATH500 [--out DIR]
  scope eval --model M --dataset problems.jsonl --prompt-field question --answer-field answer
  scope eval compare DIR1 DIR2 ... [--labels a,b] [--out DIR]
  scope eval --model M --benchmark HumanEval --benchmark Codeforces --benchmark LiveCodeBench
  scope eval --list-benchmarks
  scope eval --build-codeforces-list TACO_TEST [--out FILE]

Sampling defaults are the paper's: n = 32, temperature 0.6, top-p 0.95, top-k 20,
max 32768 new tokens, repetition penalty 1.0 (the paper used 1.08 for
Qwen3-1.7B-Base only: pass --repetition-penalty 1.08 to reproduce those rows).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from .benchmarks import BENCHMARK_DIR_ENV, UnavailableError, load_benchmark, load_problems, registry_table

DOC_USAGE = __doc__.split("\n\n")[1]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one k")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[2]
    parser.usage = (
        "%(prog)s --model M (--benchmark NAME [--benchmark NAME ...] | --dataset FILE) [options]\n"
        "       %(prog)s compare DIR [DIR ...] [--labels a,b] [--out DIR]\n"
        "       %(prog)s --list-benchmarks\n"
        "       %(prog)s --build-codeforces-list TACO_TEST [--out FILE]"
    )
    parser.epilog = "examples:\n" + DOC_USAGE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--model", help="hub id or local path of the model to sample")
    what.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="NAME",
        help="registered benchmark (repeatable): AIME24, AIME25, AMC23, MATH500, Minerva, OlympiadBench, HumanEval, "
        "Codeforces, LiveCodeBench; see --list-benchmarks",
    )
    what.add_argument(
        "--benchmark-file",
        action="append",
        default=[],
        metavar="PATH",
        help="local copy of the data for the --benchmark given in the same position (JSONL/JSON/parquet with the hub "
        f"dataset's fields); otherwise ${BENCHMARK_DIR_ENV}/<name>.jsonl, then the hub",
    )
    what.add_argument("--dataset", help="custom problems instead: a .jsonl/.json/.parquet file or a hub dataset id")
    what.add_argument("--split", default="test", help="split of a hub --dataset (default: test)")
    what.add_argument("--name", help="benchmark name to report a --dataset under (default: the file name)")
    what.add_argument("--prompt-field", help="problem field (default: the benchmark's; 'problem' for --dataset)")
    what.add_argument("--answer-field", help="gold answer field (default: the benchmark's; 'answer' for --dataset)")
    what.add_argument("--id-field", help="problem id field of a --dataset (default: the row index)")
    what.add_argument(
        "--verifier",
        help="math (math-verify on the last \\boxed{}), exact, code, or module:function "
        "(default: the benchmark's; math for --dataset)",
    )
    what.add_argument(
        "--instruction",
        help="text appended to each problem on a new line (default: the benchmark's, e.g. 'Please reason step by step, "
        "and put your final answer within \\boxed{}.'; '' for none)",
    )
    what.add_argument("--limit", type=_positive_int, help="evaluate only the first N problems of each benchmark")
    what.add_argument("--list-benchmarks", action="store_true", help="print the benchmark registry and exit")
    what.add_argument(
        "--build-codeforces-list",
        metavar="TACO_TEST",
        help="apply the Codeforces selection rule to a local copy of TACO's test split (file, save_to_disk folder or "
        "BAAI/TACO download) and write the id list (default: into the package, see --out) and exit",
    )

    sampling = parser.add_argument_group("sampling (defaults: the paper's protocol)")
    sampling.add_argument("--n", type=_positive_int, default=32, help="samples per problem (default: 32)")
    sampling.add_argument(
        "--k",
        type=_int_list,
        help="Pass@k values, comma-separated (default: 1,2,4,... up to n; 1,2,4,8,16,32 for n=32)",
    )
    sampling.add_argument("--temperature", type=float, default=0.6, help="default: 0.6 (0 = greedy)")
    sampling.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    sampling.add_argument("--top-k", type=int, default=20, help="default: 20 (0 = off)")
    sampling.add_argument("--max-new-tokens", type=_positive_int, default=32768, help="default: 32768")
    sampling.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="default: 1.0 (off); the paper used 1.08 for Qwen3-1.7B-Base",
    )
    sampling.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="feed problems as raw text even if the tokenizer has a chat template",
    )
    sampling.add_argument(
        "--batch-size", type=_positive_int, default=32, help="sequences per generate call (default: 32)"
    )
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    run = parser.add_argument_group("running")
    run.add_argument(
        "--backend", choices=("transformers", "vllm"), default="transformers", help="default: transformers"
    )
    run.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model weights dtype (default: the checkpoint's)",
    )
    run.add_argument(
        "--device", help="torch device for the transformers backend (default: cuda if available, else cpu)"
    )
    run.add_argument("--verifier-timeout", type=float, default=10.0, help="seconds per verification (default: 10)")
    run.add_argument("--verifier-workers", type=_positive_int, default=4, help="parallel verifications (default: 4)")
    run.add_argument("--out", help="output folder (default: eval_results/<model name>)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    actions = parser.add_subparsers(dest="action", title="other actions")
    cmp = actions.add_parser(
        "compare",
        prog=f"{parser.prog} compare",
        help="merge result folders into one table and one Pass@k plot",
        description="Merge `scope eval` output folders: one table row and one plot line per model.",
    )
    cmp.add_argument("folders", nargs="+", metavar="DIR", help="folders written by `scope eval --out`")
    cmp.add_argument("--labels", help="comma-separated row labels, one per folder (default: model names)")
    cmp.add_argument(
        "--out", help="write table.md, compare.json and pass_at_k.png here (default: print the table only)"
    )


def _error(message: str) -> int:
    print(f"scope eval: error: {message}", file=sys.stderr)
    return 2


def _default_out(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name or model) or "model"
    return Path("eval_results") / slug


def dataset_problem_set(args):
    """The ``--dataset`` problems with the field / verifier / instruction options (also used by ``scope analyze``)."""
    return load_problems(
        args.dataset,
        prompt_field=args.prompt_field or "problem",
        answer_field=args.answer_field or "answer",
        id_field=args.id_field,
        verifier=args.verifier or "math",
        instruction=args.instruction,
        split=args.split,
        name=getattr(args, "name", None),
        limit=args.limit,
    )


def benchmark_problem_set(args, name: str, file=None):
    """One registered benchmark with the override options (also used by ``scope analyze``)."""
    problem_set = load_benchmark(
        name,
        file=file,
        limit=args.limit,
        prompt_field=args.prompt_field,
        answer_field=args.answer_field,
        instruction=args.instruction,
    )
    if args.verifier:
        problem_set.verifier = args.verifier
    return problem_set


def _problem_sets(args) -> list:
    if args.dataset and args.benchmark:
        raise ValueError("use either --benchmark or --dataset, not both")
    if args.dataset:
        return [dataset_problem_set(args)]
    if not args.benchmark:
        raise ValueError("say what to evaluate: --benchmark NAME (repeatable) or --dataset FILE")
    files = args.benchmark_file
    if files and len(files) != len(args.benchmark):
        raise ValueError(
            f"{len(files)} --benchmark-file for {len(args.benchmark)} --benchmark: give one per benchmark, in order"
        )
    return [benchmark_problem_set(args, name, files[i] if files else None) for i, name in enumerate(args.benchmark)]


def _run_compare(args) -> int:
    from .report import compare

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    table, _ = compare(args.folders, labels=labels, out_dir=args.out)
    print(table)
    if args.out:
        print(f"\nwrote {Path(args.out) / 'table.md'}, compare.json and pass_at_k.png")
    return 0


def _run_eval(args) -> int:
    from .evaluate import evaluate_model
    from ..sampling import SamplingSettings

    if not args.model:
        raise ValueError("--model is required (or use `scope eval compare DIR...` / --list-benchmarks)")
    settings = SamplingSettings(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        batch_size=args.batch_size,
        seed=args.seed,
        apply_chat_template=args.chat_template,
    )
    problem_sets = _problem_sets(args)
    out_dir = Path(args.out) if args.out else _default_out(args.model)
    result = evaluate_model(
        args.model,
        problem_sets,
        settings=settings,
        ks=args.k,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        progress=args.progress,
        verifier_timeout_s=args.verifier_timeout,
        verifier_workers=args.verifier_workers,
    )
    paths = result.write(out_dir)
    from .report import format_table

    print(format_table([result.results]))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("SCOPE_LOG_LEVEL", "WARNING"))
    if getattr(args, "list_benchmarks", False):
        print(registry_table())
        return 0
    try:
        if getattr(args, "build_codeforces_list", None):
            from .code_benchmarks import CODEFORCES_LIST, build_codeforces_list

            path, count = build_codeforces_list(args.build_codeforces_list, args.out or CODEFORCES_LIST)
            print(f"wrote {path}: {count} Codeforces problems")
            return 0
        if args.action == "compare":
            return _run_compare(args)
        return _run_eval(args)
    except (ValueError, KeyError, FileNotFoundError, UnavailableError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        return _error(str(message))
