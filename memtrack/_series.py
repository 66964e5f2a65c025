"""Thinning a long series for a table or a chart, defined once for the reports and insights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def evenly_spaced(values: Sequence[T], limit: int) -> list[T]:
    """At most `limit` items, evenly spaced, the first and the last always among them."""
    if len(values) <= limit:
        return list(values)
    if limit < 2:
        return list(values[:limit])
    step = (len(values) - 1) / (limit - 1)
    return [values[round(i * step)] for i in range(limit)]


def bucket_max(values: Sequence[T], limit: int, key: Callable[[T], Any]) -> list[T]:
    """At most `limit` items: the largest (by `key`) of each of `limit` equal buckets, so a
    spike is never thinned away."""
    if len(values) <= limit:
        return list(values)
    size = len(values) / limit
    return [max(values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)], key=key)
            for i in range(limit)]
