"""Avg@n and the unbiased Pass@k estimator (paper Sec. 6) against exact combinatorics."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_opd.metrics import avg_at_n, benchmark_scores, default_ks, pass_at_k, pass_at_k_array


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def assert_close_to_exact(value: float, exact: Fraction) -> None:
    # Relative to the exact value and to its complement: both 1e-6 and 1 - 1e-6 must be exact to ~1e-13.
    err = abs(Fraction(value) - exact)
    assert err <= Fraction(1, 10**12) * min(exact, 1 - exact) or err < Fraction(1, 10**15), (value, float(exact))


@pytest.mark.parametrize(
    "n,c,k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (4, 1, 1),
        (4, 1, 2),
        (8, 3, 4),
        (32, 1, 1),
        (32, 1, 32),
        (32, 5, 8),
        (32, 31, 16),
        (100, 7, 50),
    ],
)
def test_pass_at_k_matches_exact_binomials(n, c, k):
    assert_close_to_exact(pass_at_k(n, c, k), exact_pass_at_k(n, c, k))


@pytest.mark.parametrize("c,k", [(1, 1), (1, 32), (3, 512), (17, 1), (100, 100), (500, 2), (1000, 1), (12, 1000)])
def test_pass_at_k_n1024_is_exact_where_factorials_overflow(c, k):
    n = 1024  # C(1024, 512) ~ 4e306: one step from float overflow, so no binomials as floats
    value = pass_at_k(n, c, k)
    assert_close_to_exact(value, exact_pass_at_k(n, c, k))
    assert_close_to_exact(float(pass_at_k_array(n, [c], k)[0]), exact_pass_at_k(n, c, k))


def test_edge_cases_no_correct_is_zero_all_correct_is_one():
    for n in (1, 2, 32, 1024):
        for k in {1, n // 2 or 1, n}:
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0


def test_k_equals_n_is_one_iff_any_correct():
    """Pass@32 with 32 samples is the paper's 'at least one of 32 correct'."""
    for c in range(33):
        assert pass_at_k(32, c, 32) == (1.0 if c > 0 else 0.0)


def test_pass_at_1_is_the_accuracy():
    for c in range(33):
        assert pass_at_k(32, c, 1) == pytest.approx(c / 32, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_scalar_and_vector_agree_with_exact(nck):
    n, c, k = nck
    exact = exact_pass_at_k(n, c, k)
    assert_close_to_exact(pass_at_k(n, c, k), exact)
    assert_close_to_exact(float(pass_at_k_array(n, np.array([c]), k)[0]), exact)


def test_vectorised_over_array_of_counts_keeps_shape():
    counts = np.array([[0, 1, 2], [30, 31, 32]])
    out = pass_at_k_array(32, counts, 4)
    assert out.shape == counts.shape and out.dtype == np.float64
    for idx in np.ndindex(counts.shape):
        assert out[idx] == pytest.approx(pass_at_k(32, int(counts[idx]), 4), rel=1e-13, abs=1e-15)


def test_pass_at_k_is_monotone_in_k_and_c():
    n = 64
    grid = np.array([[pass_at_k(n, c, k) for k in range(1, n + 1)] for c in range(n + 1)])
    assert (np.diff(grid, axis=0) >= -1e-15).all()
    assert (np.diff(grid, axis=1) >= -1e-15).all()


@pytest.mark.parametrize(
    "n,c,k,error",
    [
        (4, 1, 5, ValueError),  # k > n
        (4, 5, 1, ValueError),  # c > n
        (4, -1, 1, ValueError),
        (4, 1, 0, ValueError),
        (0, 0, 1, ValueError),
        (-4, 0, 1, ValueError),
        (4.0, 1, 1, TypeError),
        (4, 1.5, 1, TypeError),
        (4, True, 1, TypeError),
    ],
)
def test_invalid_arguments_raise(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)


def test_vectorised_validation():
    with pytest.raises(ValueError, match="k = 5 > n = 4"):
        pass_at_k_array(4, [1, 2], 5)
    with pytest.raises(ValueError):
        pass_at_k_array(4, [1, 5], 1)
    with pytest.raises(ValueError):
        pass_at_k_array(4, [-1], 1)
    with pytest.raises(TypeError):
        pass_at_k_array(4, [0.5], 1)
    assert pass_at_k_array(4, np.array([2.0, 0.0]), 1).tolist() == pytest.approx(
        [0.5, 0.0]
    )  # integral floats are counts
    assert pass_at_k_array(4, [], 1).shape == (0,)


def test_avg_at_n():
    assert avg_at_n(3, 4) == 0.75
    assert avg_at_n([0, 32, 16], 32) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        avg_at_n([5], 4)
    with pytest.raises(ValueError):
        avg_at_n([-1], 4)
    with pytest.raises(ValueError):
        avg_at_n([], 4)
    with pytest.raises(ValueError):
        avg_at_n(0, 0)


def test_default_k_grid_is_the_papers():
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(1) == [1]
    assert default_ks(12) == [1, 2, 4, 8, 12]


def test_benchmark_scores_average_over_problems():
    scores = benchmark_scores([0, 1, 4], n=4, ks=[1, 4])
    assert scores == {
        "n": 4,
        "avg": pytest.approx(5 / 12),
        "pass": {1: pytest.approx(5 / 12), 4: pytest.approx(2 / 3)},
        "num_problems": 3,
    }
    with pytest.raises(ValueError, match="no problems"):
        benchmark_scores([], n=4, ks=[1])
