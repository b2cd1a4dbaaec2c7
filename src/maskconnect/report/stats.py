"""Seed statistics: Student-t confidence intervals and Welch's t-test.

The paper's effects (tenths of a point to two points) are of the size of seed noise, so every number
we report carries an interval over seeds and every comparison a test. Both functions are total: they
never return NaN, and say in words when a quantity is undefined (one seed, no variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats as _st

ALPHA = 0.05  # significance level used for every verdict in the report


def _finite(values: Iterable) -> np.ndarray:
    """The finite values as floats (None/NaN dropped: e.g. top-5 of a dataset with < 5 classes)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float).ravel()
    return arr[np.isfinite(arr)]


def _std(arr: np.ndarray) -> float:
    # Identical values give exactly 0 (np.std can return ~1e-15 from rounding of the mean).
    return 0.0 if np.ptp(arr) == 0 else float(np.std(arr, ddof=1))


@dataclass(frozen=True)
class Interval:
    """Mean of n seeds with its Student-t confidence interval.

    ``half_width`` and ``std`` are None when n == 1 (undefined), never NaN; all-equal values give 0.
    """

    mean: float
    half_width: float | None
    std: float | None
    n: int
    best: float
    confidence: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def t_interval(values: Iterable, confidence: float = 0.95) -> Interval:
    """mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n), with s the sample std (ddof=1).

    None/NaN values are ignored. Raises ValueError when no finite value is left.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"invalid confidence={confidence!r}: must be in (0, 1)")
    arr = _finite(values)
    n = int(arr.size)
    if n == 0:
        raise ValueError("t_interval needs at least one finite value, got none")
    mean, best = float(arr.mean()), float(arr.max())
    if n == 1:
        return Interval(mean=mean, half_width=None, std=None, n=1, best=best, confidence=confidence)
    std = _std(arr)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if std > 0 else 0.0
    return Interval(mean=mean, half_width=half, std=std, n=n, best=best, confidence=confidence)


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    ``t``, ``p``, ``df`` and the confidence interval of the difference are None when the test is
    undefined; ``reason`` then says why ("n<2 in a (n=1)", "no variance in either sample").
    """

    diff: float | None
    t: float | None = None
    p: float | None = None
    df: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.p is not None

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def welch(a: Interval | None, b: Interval | None, confidence: float = 0.95) -> WelchResult:
    """Welch's two-sided t-test of mean(a) - mean(b) from the two samples' seed statistics (mean, sample
    std and n: all the test depends on; scipy.stats.ttest_ind_from_stats, equal_var=False, with the
    Welch-Satterthwaite degrees of freedom). ``a`` and ``b`` are :class:`Interval` s (the summary's
    rows, :func:`.tables.interval`); None: a side with no run.

    Returns a result whose ``p`` is None (with ``reason``) when either side has fewer than two values
    or both sides have zero variance (the t statistic is then 0/0 or ±inf, not a test).
    """
    ia, ib = a, b
    na, nb = (ia.n if ia else 0), (ib.n if ib else 0)
    diff = ia.mean - ib.mean if ia and ib else None
    short = [f"n<2 in {name} (n={n})" for name, n in (("a", na), ("b", nb)) if n < 2]
    if short:
        return WelchResult(diff=diff, reason="; ".join(short))
    va, vb = ia.std ** 2, ib.std ** 2
    if va == 0 and vb == 0:
        return WelchResult(diff=diff, reason="no variance in either sample")
    res = _st.ttest_ind_from_stats(ia.mean, ia.std, na, ib.mean, ib.std, nb, equal_var=False)
    ea, eb = va / na, vb / nb
    df = (ea + eb) ** 2 / (ea ** 2 / (na - 1) + eb ** 2 / (nb - 1))
    half = float(_st.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(ea + eb)
    return WelchResult(diff=diff, t=float(res.statistic), p=float(res.pvalue), df=float(df),
                       ci_low=diff - half, ci_high=diff + half)
