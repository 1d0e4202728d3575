"""Paired comparisons across seeds for ``scope demo``: mean difference and a paired-t 95% interval.

Seed ``s`` of two methods shares the initial model and the training prompts, so the
per-seed differences are the paired observations; the interval is
``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

__all__ = ["paired_comparison", "t_quantile_975"]

# Student t 0.975 quantiles for 1..30 degrees of freedom (standard tables, 4 decimals;
# tests/test_toy_stats.py checks them against scipy where it is installed).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    A table up to 30; beyond, the Cornish-Fisher expansion to 1/df^2 (error < 1e-4 there).
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a - b`` paired by position (one entry per seed): mean, sd, n, 95% CI, and whether it excludes 0.

    ``ci95`` is ``None`` with one pair (no spread to estimate). Raises ``ValueError`` when the
    lengths differ, nothing is given, or a value is not finite (a missing result must not
    turn into a silent number).
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no paired samples")
    for name, values in (("a", a), ("b", b)):
        bad = [v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"non-finite or missing value in {name}: {bad[0]!r}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"mean": mean, "sd": None, "n": 1, "ci95": None, "excludes_zero": None, "diffs": diffs}
    sd = statistics.stdev(diffs)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"mean": mean, "sd": sd, "n": n, "ci95": [lo, hi], "excludes_zero": lo > 0 or hi < 0, "diffs": diffs}
