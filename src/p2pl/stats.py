"""Statistics over seeds: mean with a Student-t confidence interval, and verdicts judged on it.

A number measured over ``K`` seeds is reported as ``mean +- t(0.975, K-1) * s / sqrt(K)`` (``s`` the
sample standard deviation): the 95 % confidence interval of the mean, assuming the seeds'
results are independent draws of a roughly normal quantity. With one seed there is no interval
(the half-width is reported as 0 and the verdicts fall back to the point value; the report says so).

A comparison of two settings run with the *same* seeds is paired (same data split, same inits),
so its interval is the interval of the per-seed differences, which is tighter than comparing two
separate intervals.

A check (e.g. "P2PL's worst device reaches FedAvg within 2 points") is judged on the interval of
the quantity it is about: it *holds* when the whole interval satisfies it, *fails* when the whole
interval violates it, and is *undecided* when the interval straddles the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
HOLDS, FAILS, UNDECIDED = "holds", "fails", "undecided"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` finite values and its two-sided Student-t confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    std: float  # sample standard deviation (ddof=1); nan with fewer than 2 values
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def measured(self) -> bool:
        return self.n > 0

    def format(self, scale: float = 1.0, digits: int = 1, suffix: str = "", sign: bool = False) -> str:
        """``93.1 +- 0.8`` (with ``scale=100``); only the mean with one seed; ``-`` with none."""
        if not self.measured:
            return "-"
        spec = f"{'+' if sign else ''}.{digits}f"
        text = format(scale * self.mean, spec)
        if self.n > 1:
            text += f" ± {format(scale * self.half_width, f'.{digits}f')}"
        return text + suffix


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= q) = confidence for ``dof`` degrees."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Mean and ``confidence`` interval of the finite values (nan/None are dropped)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, nan, confidence)
    mean = float(finite.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1, float("nan"), confidence)
    std = float(finite.std(ddof=1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std, confidence)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Interval:
    """Interval of the mean of ``a[i] - b[i]`` (the same seed ``i`` on both sides)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds on both sides, got {len(a)} and {len(b)}")
    return mean_ci((float(x) - float(y) for x, y in zip(a, b, strict=True)), confidence)


def at_least(interval: Interval, threshold: float) -> str:
    """Is the quantity >= threshold? holds / fails / undecided (undecided also when unmeasured)."""
    if not interval.measured:
        return UNDECIDED
    if interval.low >= threshold:
        return HOLDS
    if interval.high < threshold:
        return FAILS
    return UNDECIDED


def below(interval: Interval, threshold: float) -> str:
    """Is the quantity < threshold? holds / fails / undecided."""
    if not interval.measured:
        return UNDECIDED
    if interval.high < threshold:
        return HOLDS
    if interval.low >= threshold:
        return FAILS
    return UNDECIDED


def above(interval: Interval, threshold: float) -> str:
    """Is the quantity > threshold? holds / fails / undecided."""
    if not interval.measured:
        return UNDECIDED
    if interval.low > threshold:
        return HOLDS
    if interval.high <= threshold:
        return FAILS
    return UNDECIDED


__all__ = [
    "CONFIDENCE",
    "FAILS",
    "HOLDS",
    "UNDECIDED",
    "Interval",
    "above",
    "at_least",
    "below",
    "mean_ci",
    "paired_difference",
    "t_quantile",
]
