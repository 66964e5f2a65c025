"""Leak checks: does calling a function again and again make this process keep more memory?

Two samples of RSS (before and after a loop) cannot tell a leak from a one-time cache, a
free list that grows once, or the allocator keeping a page it may reuse. This check calls
the function many times, reads the memory the process *retains* after each call (after
``gc.collect()`` and ``malloc_trim(0)``), and asks two questions of that series:

- **how fast does it grow?** The Theil–Sen slope: the median of the slopes between every
  pair of calls. Up to ~29% of the points may be anything (a cache filled in the first
  calls, a jump of one arena) without moving it, where a least-squares fit would follow them.
- **does it grow steadily?** The Mann–Kendall trend test (later samples above earlier ones
  far more often than chance allows, p < 0.01), and growth that goes on to the end: the
  last half of the calls grows at least half as fast as all of them. A cache that fills
  up and stops fails this even when it takes most of the run to fill.

It fails only when both say so and the slope times the number of calls exceeds the
tolerance, and the message says how much each call keeps.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _core
from ._sizes import format_size, parse_size
from ._trend import mann_kendall_z, theil_sen

#: Mann–Kendall z above which growth counts as a trend (one-sided p < 0.01).
TREND_Z = 2.33


@dataclass(frozen=True)
class Growth:
    """What :func:`measure_growth` saw: the retained RSS after each call, and its trend."""

    name: str              #: the function measured
    iterations: int        #: measured calls (after the warm-up calls)
    warmup: int            #: calls made before measuring
    samples: tuple[int, ...]  #: retained RSS before the first measured call and after each, bytes
    per_call: float        #: Theil–Sen slope over all samples: bytes kept per call
    late_per_call: float   #: the same slope over the last half of the samples
    trend_z: float         #: Mann–Kendall z of the samples (> 2.33: a significant upward trend)

    @property
    def total(self) -> float:
        """The growth the slope predicts over the measured calls, bytes."""
        return self.per_call * self.iterations

    @property
    def steady(self) -> bool:
        """Growth that is a trend and goes on to the end (not a cache that filled up)."""
        return (self.per_call > 0 and self.trend_z >= TREND_Z
                and self.late_per_call >= self.per_call / 2)

    def exceeds(self, tolerance: int | str) -> bool:
        """True when the growth is steady and more than `tolerance` over the calls."""
        return self.steady and self.total > parse_size(tolerance, what="tolerance")


class MemoryGrowthError(AssertionError):
    """:func:`assert_no_growth` found steady growth; ``growth`` holds the measurements."""

    def __init__(self, message: str, growth: Growth) -> None:
        super().__init__(message)
        self.growth = growth


def retained_rss() -> int:
    """RSS once garbage is collected and free malloc heap is returned to the OS: the memory
    something kept. The one definition, for the growth check, the pytest plugin and the
    executor's leak check."""
    gc.collect()
    _core.trim()
    return _core.rss()


def _check_counts(iterations: int, warmup: int) -> None:
    for what, value, least in (("iterations", iterations, 8), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, not {type(value).__name__}")
        if value < least:
            raise ValueError(f"{what} must be at least {least}, not {value}")


def measure_growth(fn: Callable[..., Any], iterations: int = 50, warmup: int = 5, *,
                   args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Growth:
    """Call ``fn(*args, **kwargs)`` `warmup` times, then `iterations` times reading the
    retained RSS after each call; return the series and its trend (see module doc)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    _check_counts(iterations, warmup)
    kwargs = kwargs or {}
    for _ in range(warmup):
        fn(*args, **kwargs)
    samples = [retained_rss()]
    for _ in range(iterations):
        fn(*args, **kwargs)
        samples.append(retained_rss())
    late = samples[len(samples) // 2:]
    return Growth(
        name=getattr(fn, "__qualname__", None) or repr(fn),
        iterations=iterations,
        warmup=warmup,
        samples=tuple(samples),
        per_call=theil_sen(samples),
        late_per_call=theil_sen(late),
        trend_z=mann_kendall_z(samples),
    )


def assert_no_growth(fn: Callable[..., Any], iterations: int = 50, warmup: int = 5,
                     tolerance: int | str = "1 MB", *, args: Sequence[Any] = (),
                     kwargs: dict[str, Any] | None = None) -> Growth:
    """Fail when calling `fn` again and again keeps more and more memory.

    Calls ``fn(*args, **kwargs)`` `warmup` times (caches fill, imports happen), then
    `iterations` times, reading RSS after ``gc.collect()`` and ``malloc_trim(0)`` after
    each call. Raises :class:`MemoryGrowthError` (an ``AssertionError``) when the growth
    is steady and its robust slope times `iterations` is more than `tolerance` (bytes, or
    text such as ``"1 MB"``). One-time caches and allocator noise do not fail it. Returns
    the :class:`Growth` it measured.
    """
    limit = parse_size(tolerance, what="tolerance")
    growth = measure_growth(fn, iterations, warmup, args=args, kwargs=kwargs)
    if growth.exceeds(limit):
        shown = tolerance if isinstance(tolerance, str) else format_size(limit)
        raise MemoryGrowthError(
            f"memtrack: {growth.name} keeps {format_size(growth.per_call)} per call: "
            f"{format_size(growth.total, signed=True)} over {iterations} calls "
            f"(tolerance {shown}); retained RSS went from {format_size(growth.samples[0])} "
            f"to {format_size(growth.samples[-1])}", growth)
    return growth
