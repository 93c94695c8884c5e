"""Confidence intervals over seeds (Student t) and checks judged on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2pl.stats import (
    FAILS,
    HOLDS,
    UNDECIDED,
    Interval,
    above,
    at_least,
    below,
    mean_ci,
    paired_difference,
    t_quantile,
)


def test_t_quantiles_match_the_tables() -> None:
    # two-sided 95 %: t(0.975, dof) from any statistics table
    for dof, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert t_quantile(0.95, dof) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.95, 10_000) == pytest.approx(1.96, abs=1e-3)  # tends to the normal quantile
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=1e-4)


def test_mean_ci_by_hand() -> None:
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), half-width t(0.975, 4) * std / sqrt(5)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert (ci.mean, ci.n) == (3.0, 5)
    assert ci.std == pytest.approx(math.sqrt(2.5))
    assert (ci.low, ci.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert ci.half_width == pytest.approx(half)
    # two values: t(0.975, 1) = 12.706, so the interval is wide
    two = mean_ci([0.90, 0.92])
    assert two.half_width == pytest.approx(12.7062047 * np.std([0.90, 0.92], ddof=1) / math.sqrt(2))


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    trials, hits = 4000, 0
    for _ in range(trials):
        ci = mean_ci(rng.normal(10.0, 3.0, size=4))
        hits += ci.low <= 10.0 <= ci.high
    assert hits / trials == pytest.approx(0.95, abs=0.012)
    # a z interval (1.96) with 4 samples would under-cover badly: the t quantile matters
    narrow_hits = 0
    for _ in range(trials):
        x = rng.normal(10.0, 3.0, size=4)
        half = 1.96 * x.std(ddof=1) / 2
        narrow_hits += abs(x.mean() - 10.0) <= half
    assert narrow_hits / trials < 0.9


def test_one_value_none_and_nan() -> None:
    one = mean_ci([0.93])
    assert (one.mean, one.low, one.high, one.n) == (0.93, 0.93, 0.93, 1)
    assert one.format(100, suffix="%") == "93.0%"  # no interval with one seed
    empty = mean_ci([])
    assert not empty.measured and empty.format(100) == "-"
    dropped = mean_ci([1.0, float("nan"), None, 3.0])  # type: ignore[list-item]
    assert (dropped.n, dropped.mean) == (2, 2.0)


def test_format() -> None:
    ci = Interval(0.931, 0.923, 0.939, 3, 0.003)
    assert ci.format(100, suffix="%") == "93.1 ± 0.8%"
    assert Interval(-0.028, -0.033, -0.023, 3, 0.002).format(100, suffix=" pts", sign=True) == "-2.8 ± 0.5 pts"
    assert Interval(1.5e6, 1.5e6, 1.5e6, 3, 0.0).format(1e-6, 2) == "1.50 ± 0.00"


def test_paired_difference_removes_what_the_seeds_share() -> None:
    a, b = [0.80, 0.90, 0.70], [0.78, 0.88, 0.68]  # seeds differ a lot, the gap does not
    paired = paired_difference(a, b)
    assert paired.mean == pytest.approx(0.02) and paired.half_width == pytest.approx(0.0, abs=1e-12)
    unpaired_half = mean_ci(a).half_width + mean_ci(b).half_width
    assert unpaired_half > 0.3  # separate intervals could not tell the two apart
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_checks_are_tri_state_on_the_interval() -> None:
    def iv(low: float, high: float) -> Interval:
        return Interval((low + high) / 2, low, high, 3, 1.0)

    tol = -0.02
    assert at_least(iv(-0.01, 0.01), tol) == HOLDS  # the whole interval within the tolerance
    assert at_least(iv(-0.05, -0.03), tol) == FAILS  # the whole interval outside
    assert at_least(iv(-0.03, 0.00), tol) == UNDECIDED  # straddles it
    assert below(iv(-3, -1), 0) == HOLDS and below(iv(0, 2), 0) == FAILS and below(iv(-1, 1), 0) == UNDECIDED
    assert above(iv(1, 3), 0) == HOLDS and above(iv(-2, 0), 0) == FAILS and above(iv(-1, 1), 0) == UNDECIDED
    assert at_least(mean_ci([]), 0) == UNDECIDED  # a failed run decides nothing
    # one seed: the point value decides
    assert at_least(mean_ci([-0.01]), tol) == HOLDS and at_least(mean_ci([-0.03]), tol) == FAILS
