"""Evaluation metrics of the paper (Tables 1, 2, 4; Fig. 4): Avg@n and unbiased Pass@k.

For one problem with ``n`` samples of which ``c`` are correct:

* **Avg@n** = c / n, the mean accuracy over the samples (paper: Avg@32);
* **Pass@k** = 1 - C(n-c, k) / C(n, k), the unbiased estimate of the chance that at
  least one of k samples drawn without replacement from the n is correct (paper:
  Pass@32 with k = n is "at least one of 32 correct"; the Pass@k curves use
  k = 1, 2, 4, ..., 32).

A benchmark's score is the mean over its problems. Binomials are never formed:
C(n-c, k)/C(n, k) = prod_{i=n-c+1..n} (1 - k/i), evaluated as a sum of ``log1p``
terms and closed with ``expm1``, so n = 1024 (or 10^6) is as accurate as n = 4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral

import numpy as np

__all__ = ["avg_at_n", "benchmark_scores", "default_ks", "pass_at_k", "pass_at_k_array"]


def _check_int(name: str, value) -> int:
    # bool is an int subclass; True samples is a bug, not a count.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_n_k(n, k) -> tuple[int, int]:
    n, k = _check_int("n", n), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k = {k} > n = {n}: Pass@k needs at least k samples per problem")
    return n, k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k for one problem: 1 - C(n-c, k) / C(n, k).

    ``n`` samples, ``c`` of them correct, ``1 <= k <= n``. Raises ``ValueError``
    for k > n, c > n or negative counts, ``TypeError`` for non-integers.
    """
    n, k = _check_n_k(n, k)
    c = _check_int("c", c)
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n = {n}], got {c}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # log C(n-c,k)/C(n,k) = sum_{i=n-c+1..n} log(1 - k/i); each term is finite since i > n-c >= k.
    log_fail = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_fail)


def pass_at_k_array(n: int, c, k: int) -> np.ndarray:
    """Vectorised :func:`pass_at_k` over an array of correct counts ``c`` (any shape), float64.

    One pass over i = 1..n serves every c: a reverse cumulative sum of
    log(1 - k/i) from i = n downwards, so small c (the usual case) sums only its
    own few terms and keeps full relative precision.
    """
    n, k = _check_n_k(n, k)
    c = np.asarray(c)
    integral = np.issubdtype(c.dtype, np.integer) or (np.issubdtype(c.dtype, np.floating) and np.all(np.mod(c, 1) == 0))
    if c.size and not integral:
        raise TypeError(f"c must hold integer counts, got dtype {c.dtype}")
    c = c.astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > n):
        raise ValueError(f"c (correct samples) must be in [0, n = {n}], got values in [{c.min()}, {c.max()}]")
    # tail[m] = sum_{i=m+1..n} log1p(-k/i) for m = k..n (tail[n] = 0); only m = n - c >= k is used.
    i = np.arange(k + 1, n + 1, dtype=np.float64)
    terms = np.log1p(-k / i)
    tail = np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])  # index m - k
    m = n - c
    out = np.ones(c.shape, dtype=np.float64)
    ok = m >= k
    out[ok] = -np.expm1(tail[m[ok] - k])
    return out


def avg_at_n(c, n: int) -> float:
    """Avg@n: mean accuracy c / n, averaged over problems when ``c`` is an array of counts."""
    n = _check_int("n", n)
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    c = np.asarray(c, dtype=np.float64)
    if c.size == 0:
        raise ValueError("avg_at_n needs at least one problem")
    if c.min() < 0 or c.max() > n:
        raise ValueError(f"c (correct samples) must be in [0, n = {n}]")
    return float(np.mean(c) / n)


def default_ks(n: int) -> list[int]:
    """The paper's k grid 1, 2, 4, ... capped at n, with n itself always last."""
    n = _check_int("n", n)
    ks = [1 << p for p in range(n.bit_length()) if (1 << p) <= n]
    return ks if ks[-1] == n else ks + [n]


def benchmark_scores(correct_counts: Sequence[int] | np.ndarray, n: int, ks: Iterable[int]) -> dict:
    """Benchmark-level scores from per-problem correct counts (each out of ``n`` samples).

    Returns ``{"n": n, "avg": Avg@n, "pass": {k: Pass@k}, "num_problems": P}``
    with fractions in [0, 1] (the mean over problems).
    """
    counts = np.asarray(correct_counts)
    if counts.size == 0:
        raise ValueError("no problems to score")
    return {
        "n": int(n),
        "avg": avg_at_n(counts, n),
        "pass": {int(k): float(pass_at_k_array(n, counts, k).mean()) for k in ks},
        "num_problems": int(counts.size),
    }
