"""memtrack.leaks: a steady leak fails the check; caches, noise and small growth do not."""

from __future__ import annotations

import random

import pytest

from memtrack._trend import mann_kendall_z
from memtrack._trend import theil_sen as theil_sen_slope
from memtrack.leaks import (
    Growth,
    MemoryGrowthError,
    assert_no_growth,
    measure_growth,
)

KB = 1000
BLOCK = bytes(range(256)) * 400  # 102 400 bytes, every page written


def test_a_list_that_grows_every_call_fails_and_says_how_much_per_call():
    # given a function that keeps 100 KB more on every call
    kept = []

    def leak():
        kept.append(bytearray(BLOCK))

    # then the check fails, with the per-call growth in the message
    with pytest.raises(MemoryGrowthError) as failure:
        assert_no_growth(leak, iterations=40)
    growth = failure.value.growth
    assert growth.per_call == pytest.approx(102_400, rel=0.1)
    assert growth.total == pytest.approx(40 * 102_400, rel=0.1)
    assert growth.steady
    message = str(failure.value)
    assert message.startswith(
        "memtrack: test_a_list_that_grows_every_call_fails_and_says_how_much_per_call."
        "<locals>.leak keeps ")
    assert " KiB per call: +" in message and " MiB over 40 calls (tolerance 1 MB)" in message
    assert isinstance(failure.value, AssertionError)  # pytest shows it as a plain failure


def test_a_one_time_cache_does_not_fail():
    # given a function whose first calls fill a cache (1 MB per call) and then stop
    cache = {}

    def cached():
        if len(cache) < 8:
            cache[len(cache)] = bytearray(BLOCK * 10)

    # the warm-up covers only 5 of the 8 filling calls: 3 MB more appear while measuring
    growth = assert_no_growth(cached, iterations=40, warmup=5)
    assert growth.samples[-1] - growth.samples[0] >= 2_500_000  # it did grow ...
    assert growth.per_call < 4096                                # ... but not steadily
    assert not growth.steady


def test_a_cache_that_fills_over_most_of_the_run_does_not_fail():
    # given a bounded cache that fills during the first 60% of the measured calls
    cache = []

    def bounded():
        if len(cache) < 24:
            cache.append(bytearray(BLOCK))

    growth = assert_no_growth(bounded, iterations=40, warmup=0)
    # the trend over all calls is real, but the last half is flat: not a leak
    assert growth.per_call > 0
    assert growth.late_per_call < growth.per_call / 2
    assert not growth.steady


def test_allocator_noise_does_not_fail():
    # given a function that allocates and frees blocks of random sizes
    rng = random.Random(7)

    def noisy():
        blocks = [bytearray(rng.randint(1, 300 * KB)) for _ in range(8)]
        return sum(map(len, blocks))

    growth = assert_no_growth(noisy, iterations=40)
    assert abs(growth.total) < 1_000_000


def test_a_leak_smaller_than_the_tolerance_passes():
    kept = []
    growth = assert_no_growth(lambda: kept.append(bytearray(4 * KB)), iterations=40,
                              tolerance="1 MB")
    assert growth.total < 1_000_000
    # and the same leak fails a tighter tolerance, given as bytes
    with pytest.raises(MemoryGrowthError, match=r"\(tolerance 48.8 KiB\)"):
        assert_no_growth(lambda: kept.append(bytearray(BLOCK)), iterations=20,
                         tolerance=50_000)


def test_arguments_are_passed_and_the_warmup_is_not_measured():
    calls = []
    growth = measure_growth(lambda a, b=0: calls.append((a, b)), iterations=10, warmup=3,
                            args=(1,), kwargs={"b": 2})
    assert calls == [(1, 2)] * 13
    assert len(growth.samples) == 11 and (growth.iterations, growth.warmup) == (10, 3)


@pytest.mark.parametrize("kwargs, error", [
    ({"iterations": 3}, ValueError),
    ({"iterations": 10.0}, TypeError),
    ({"warmup": -1}, ValueError),
    ({"tolerance": "a lot"}, ValueError),
])
def test_bad_arguments_are_refused_before_any_call(kwargs, error):
    calls = []
    with pytest.raises(error):
        assert_no_growth(lambda: calls.append(1), **kwargs)
    assert calls == []


def test_theil_sen_ignores_a_minority_of_outliers():
    # a line of slope 2 with 25% of its points thrown far off
    values = [2.0 * i for i in range(40)]
    for i in range(0, 40, 4):
        values[i] += 10_000
    assert theil_sen_slope(values) == pytest.approx(2.0, abs=0.2)
    assert theil_sen_slope([5]) == 0.0


def test_mann_kendall_sees_trends_not_plateaus():
    assert mann_kendall_z(list(range(30))) > 7
    assert mann_kendall_z(list(range(30, 0, -1))) < -7
    assert mann_kendall_z([4096] * 30) == 0.0
    rng = random.Random(1)
    assert abs(mann_kendall_z([rng.random() for _ in range(50)])) < 2.33


def test_growth_judges_by_tolerance_and_steadiness():
    steady = Growth("f", 50, 5, tuple(range(51)), per_call=30_000, late_per_call=30_000,
                    trend_z=9.0)
    assert steady.total == 1_500_000
    assert steady.exceeds("1 MB") and not steady.exceeds("2 MB")
    levelled = Growth("f", 50, 5, tuple(range(51)), per_call=30_000, late_per_call=0,
                      trend_z=9.0)
    assert not levelled.exceeds("1 MB")
    random_walk = Growth("f", 50, 5, tuple(range(51)), per_call=30_000,
                         late_per_call=30_000, trend_z=1.0)
    assert not random_walk.exceeds("1 MB")
