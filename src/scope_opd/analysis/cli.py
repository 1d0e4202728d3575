"""scope analyze: the paper's analyses.

  scope analyze recovery --student S --teacher T --dataset problems.jsonl [--limit 200] [--out DIR]
  scope analyze recovery --student S --teacher T --benchmark MATH500 --limit 100
  scope analyze recovery --student S --teacher T --dataset toy --limit 200

recovery: error recovery vs teacher perplexity (paper Sec. 2.2, App. C.1, Tables 6-7,
Fig. 1b). The student's incorrect solutions are bucketed into quartiles of teacher
perplexity; each is truncated at the newline nearest to r * its length, the teacher
continues from there, and the recovery rate is reported per quartile and ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

DOC_USAGE = __doc__.split("\n\n")[1]
TOY_DATASET = "toy"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _ratio_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from err
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected ratios strictly between 0 and 1, got {text!r}")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "The paper's analyses. " + __doc__.split("\n\n")[2].replace("\n", " ")
    parser.epilog = "examples:\n" + DOC_USAGE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", title="analyses", metavar="ANALYSIS", required=True)
    recovery = actions.add_parser(
        "recovery",
        prog=f"{parser.prog} recovery",
        help="error recovery vs teacher perplexity (paper Tables 6-7, Fig. 1b)",
        description=__doc__.split("\n\n")[2],
        epilog="examples:\n" + DOC_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure_recovery(recovery)


def _configure_recovery(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (must share a tokenizer)")
    models.add_argument("--student", required=True, help="hub id or local path of the student")
    models.add_argument("--teacher", required=True, help="hub id or local path of the teacher")
    models.add_argument(
        "--allow-special-token-mismatch",
        action="store_true",
        help="accept a pair whose bos/eos ids differ (e.g. Qwen3-1.7B-Base with Qwen3-8B)",
    )

    data = parser.add_argument_group("problems")
    data.add_argument(
        "--dataset",
        help=f"a .jsonl/.json/.parquet file or a hub dataset id; '{TOY_DATASET}' for the toy task's test split",
    )
    data.add_argument("--benchmark", metavar="NAME", help="a registered benchmark instead (see scope eval --list-benchmarks)")
    data.add_argument("--benchmark-file", metavar="PATH", help="local copy of the --benchmark's data")
    data.add_argument("--split", default="test", help="split of a hub --dataset (default: test)")
    data.add_argument("--prompt-field", help="problem field (default: the benchmark's; 'problem' for --dataset)")
    data.add_argument("--answer-field", help="gold answer field (default: the benchmark's; 'answer' for --dataset)")
    data.add_argument("--id-field", help="problem id field of a --dataset (default: the row index)")
    data.add_argument(
        "--instruction",
        help="text appended to each problem (default: the benchmark's / the maths instruction; '' for none; "
        "the toy task never gets one)",
    )
    data.add_argument("--limit", type=_positive_int, help="use only the first N problems")
    data.add_argument(
        "--verifier",
        help="math (default: the last \\boxed{} answer, 0 without one), math_any (also unboxed answers), "
        "exact, code, or module:function",
    )

    study = parser.add_argument_group("study (defaults: the paper's, Appendix C.1)")
    study.add_argument("--samples-per-problem", type=_positive_int, default=4, help="student samples (default: 4)")
    study.add_argument(
        "--completions-per-prefix", type=_positive_int, default=4, help="teacher continuations of each prefix (default: 4)"
    )
    study.add_argument(
        "--ratios", type=_ratio_list, default=(0.2, 0.4, 0.6, 0.8), help="truncation ratios (default: 0.2,0.4,0.6,0.8)"
    )
    study.add_argument(
        "--no-newline",
        choices=("char", "skip"),
        default="char",
        help="a solution with no newline to cut at: cut at the nearest character (default) or leave it out at that ratio",
    )
    study.add_argument("--temperature", type=float, default=0.6, help="student and teacher (default: 0.6)")
    study.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    study.add_argument("--top-k", type=int, default=20, help="default: 20 (0 = off)")
    study.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="student solution budget (default: 32768, as in evaluation; 120 for the toy task)",
    )
    study.add_argument(
        "--continuation-max-new-tokens", type=_positive_int, help="teacher continuation budget (default: --max-new-tokens)"
    )
    study.add_argument("--repetition-penalty", type=float, default=1.0, help="default: 1.0 (off)")
    study.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="feed problems as raw text even if the tokenizer has a chat template",
    )
    study.add_argument("--seed", type=int, default=0, help="student sampling seed; the teacher uses seed + 1 (default: 0)")

    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per generate call (default: 32)")
    run.add_argument("--teacher-batch-size", type=_positive_int, default=8, help="rows per scoring forward (default: 8)")
    run.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype (default: the checkpoint's)"
    )
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--verifier-timeout", type=float, default=10.0, help="seconds per verification (default: 10)")
    run.add_argument("--verifier-workers", type=_positive_int, default=4, help="parallel verifications (default: 4)")
    run.add_argument("--out", help="output folder (default: recovery_results/<student name>)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or stage messages")


def _error(message: str) -> int:
    print(f"scope analyze: error: {message}", file=sys.stderr)
    return 2


def load_recovery_problems(args: argparse.Namespace):
    """The ProblemSet a ``recovery`` run studies: the toy test split, a --dataset, or a --benchmark."""
    from ..evaluation import Problem, ProblemSet
    from ..evaluation.cli import benchmark_problem_set, dataset_problem_set

    if args.dataset and args.benchmark:
        raise ValueError("use either --benchmark or --dataset, not both")
    if args.dataset == TOY_DATASET:
        from ..toy.task import toy_problems

        # Fixed problem seed: --seed changes the sampling, not which problems are studied.
        toy = toy_problems("test", args.limit, seed=0) if args.limit else toy_problems("test", seed=0)
        problems = [Problem(str(i), p.prompt, p.answer) for i, p in enumerate(toy)]
        return ProblemSet(TOY_DATASET, problems, verifier=args.verifier or "math", source="scope_opd.toy test split")
    if args.dataset:
        return dataset_problem_set(args)
    if args.benchmark:
        return benchmark_problem_set(args, args.benchmark, args.benchmark_file)
    raise ValueError(f"say which problems to use: --dataset FILE, --dataset {TOY_DATASET} or --benchmark NAME")


def _default_out(student: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(student.rstrip("/")).name or student) or "student"
    return Path("recovery_results") / slug


def _run_recovery(args: argparse.Namespace) -> int:
    from ..evaluation import load_model
    from .recovery import RecoverySettings, run_recovery_analysis
    from .report import format_bucket_table, format_recovery_table, write_recovery_outputs

    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        if args.dataset == TOY_DATASET:
            from ..toy.task import toy_max_completion_chars

            # Twice the longest toy solution plus EOS: room for a rambling wrong answer to show itself.
            max_new_tokens = 2 * (toy_max_completion_chars() + 1)
        else:
            max_new_tokens = 32768
    settings = RecoverySettings(
        samples_per_problem=args.samples_per_problem,
        completions_per_prefix=args.completions_per_prefix,
        ratios=args.ratios,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=max_new_tokens,
        continuation_max_new_tokens=args.continuation_max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        no_newline=args.no_newline,
        batch_size=args.batch_size,
        teacher_batch_size=args.teacher_batch_size,
        seed=args.seed,
        apply_chat_template=args.chat_template,
        verifier_timeout_s=args.verifier_timeout,
        verifier_workers=args.verifier_workers,
    )
    problems = load_recovery_problems(args)
    student, tokenizer = load_model(args.student, dtype=args.dtype, device=args.device)
    teacher, teacher_tokenizer = load_model(args.teacher, dtype=args.dtype, device=args.device)
    results = run_recovery_analysis(
        student,
        teacher,
        tokenizer,
        problems,
        settings,
        teacher_tokenizer=teacher_tokenizer,
        student_name=args.student,
        teacher_name=args.teacher,
        allow_special_token_mismatch=args.allow_special_token_mismatch,
        progress=args.progress,
    )
    out_dir = Path(args.out) if args.out else _default_out(args.student)
    paths = write_recovery_outputs(results, out_dir)
    print("Teacher perplexity of incorrect solutions (Table 6)\n")
    print(format_bucket_table(results))
    print("\nRecovery rate (%), teacher continuing truncated solutions (Table 7)\n")
    print(format_recovery_table(results))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(args: argparse.Namespace) -> int:
    from ..evaluation import UnavailableError

    logging.basicConfig(level=os.environ.get("SCOPE_LOG_LEVEL", "WARNING"))
    try:
        if args.action == "recovery":
            return _run_recovery(args)
        return _error(f"unknown analysis {args.action!r}")
    except (ValueError, KeyError, FileNotFoundError, UnavailableError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        return _error(str(message))
