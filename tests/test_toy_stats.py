"""Paired seed comparisons of ``scope demo``."""

from __future__ import annotations

import math

import pytest

from scope_opd.toy.stats import paired_comparison, t_quantile_975


def test_interval_matches_a_hand_computed_paired_t():
    a, b = [0.50, 0.55, 0.52, 0.58, 0.51], [0.48, 0.50, 0.53, 0.52, 0.49]
    out = paired_comparison(a, b)
    diffs = [0.02, 0.05, -0.01, 0.06, 0.02]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.7764 * sd / math.sqrt(5)
    assert out["n"] == 5 and out["mean"] == pytest.approx(mean)
    assert out["ci95"] == pytest.approx([mean - half, mean + half])
    assert out["excludes_zero"] is False  # 0.028 +- 0.034: a positive mean, but not distinguishable from 0
    shifted = paired_comparison([0.60, 0.62, 0.61, 0.66], [0.50, 0.51, 0.52, 0.53])
    assert shifted["ci95"][0] > 0 and shifted["excludes_zero"] is True


def test_interval_covering_zero_is_not_called_a_difference():
    out = paired_comparison([0.5, 0.6, 0.4], [0.55, 0.5, 0.45])
    assert out["ci95"][0] < 0 < out["ci95"][1] and out["excludes_zero"] is False


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    assert paired_comparison([0.6], [0.5])["ci95"] is None
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no paired samples"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="non-finite"):
        paired_comparison([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        paired_comparison([0.1, None], [0.1, 0.2])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_t_quantiles_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
