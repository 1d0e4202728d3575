"""Analyses from the paper (``scope analyze``).

Error recovery vs teacher perplexity (Sec. 2.2, Tables 6-7, Fig. 1b), in-process::

    from scope_opd.analysis import RecoverySettings, run_recovery_analysis, write_recovery_outputs
    results = run_recovery_analysis(student, teacher, tokenizer, problem_set,
                                    RecoverySettings(max_new_tokens=120))
    results["recovery"]["Q1"]["0.2"]["rate"], results["gaps"]["0.2"]["gap"]
    write_recovery_outputs(results, "out/recovery")

The study's rules (truncation point, quartile buckets, what is scored) are
documented in :mod:`scope_opd.analysis.recovery`.
"""

from .recovery import (
    BUCKETS,
    PAPER_REFERENCE,
    RecoverySettings,
    TooFewIncorrectError,
    quartile_buckets,
    run_recovery_analysis,
    teacher_perplexities,
    truncation_point,
)
from .report import format_recovery_report, plot_recovery, write_recovery_outputs

__all__ = [
    "BUCKETS",
    "PAPER_REFERENCE",
    "RecoverySettings",
    "TooFewIncorrectError",
    "format_recovery_report",
    "plot_recovery",
    "quartile_buckets",
    "run_recovery_analysis",
    "teacher_perplexities",
    "truncation_point",
    "write_recovery_outputs",
]
