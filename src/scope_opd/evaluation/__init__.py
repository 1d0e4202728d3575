"""Evaluation (``scope eval``): sampling, the benchmark registry, Avg@n / Pass@k reports and plots.

In-process use (the toy demo, analyses)::

    from scope_opd.evaluation import ProblemSet, Problem, SamplingSettings, evaluate_model
    result = evaluate_model(model, ProblemSet("toy", problems, verifier="exact"),
                            tokenizer=tokenizer, settings=SamplingSettings(n=8, max_new_tokens=64))
    result.benchmarks["toy"]["pass"]["8"]

transformers, datasets, matplotlib and vLLM are imported only when a function needs them.
"""

from .benchmarks import (
    BENCHMARKS,
    Problem,
    ProblemSet,
    UnavailableError,
    get_benchmark,
    load_benchmark,
    load_problems,
)
from .evaluate import EvalResult, aggregate_records, evaluate_model, load_model
from ..sampling import PAPER_SAMPLING, Completion, SamplingSettings, generate_completions, sample_completions

__all__ = [
    "BENCHMARKS",
    "PAPER_SAMPLING",
    "Completion",
    "EvalResult",
    "Problem",
    "ProblemSet",
    "SamplingSettings",
    "UnavailableError",
    "aggregate_records",
    "evaluate_model",
    "generate_completions",
    "get_benchmark",
    "load_benchmark",
    "load_model",
    "load_problems",
    "sample_completions",
]
