"""Robust trend statistics shared by the leak check (leaks.py) and the leak insight."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence


def theil_sen(values: Sequence[float]) -> float:
    """The median of the slopes between every pair of points ``(i, values[i])``.

    Robust: up to ~29% of the points can be wild without moving it, unlike a least-squares
    fit or first-vs-last.
    """
    n = len(values)
    if n < 2:
        return 0.0
    slopes = [(values[j] - values[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]
    return float(statistics.median(slopes))


def kendall_s(values: Sequence[float]) -> int:
    """Kendall's S: increasing pairs minus decreasing pairs."""
    n = len(values)
    s = 0
    for i in range(n):
        vi = values[i]
        for j in range(i + 1, n):
            d = values[j] - vi
            s += (d > 0) - (d < 0)
    return s


def kendall_tau(values: Sequence[float]) -> float:
    """S over all pairs: 1 when the series always grows, -1 when it always falls."""
    n = len(values)
    return kendall_s(values) / (n * (n - 1) / 2) if n >= 2 else 0.0


def mann_kendall_z(values: Sequence[float]) -> float:
    """The Mann–Kendall trend statistic as a z score, with the correction for ties.

    RSS moves in whole pages, so equal samples are common: without the correction a flat
    series with a few steps would look more significant than it is.
    """
    n = len(values)
    s = kendall_s(values)
    ties = [t for t in Counter(values).values() if t > 1]
    variance = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in ties)) / 18
    if variance <= 0 or s == 0:
        return 0.0
    return (s - 1 if s > 0 else s + 1) / math.sqrt(variance)
