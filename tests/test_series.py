"""memtrack._series: the one way a long series is thinned for a table or a chart."""

from memtrack._series import bucket_max, evenly_spaced


def test_evenly_spaced_keeps_the_ends_and_the_count():
    values = list(range(101))
    assert evenly_spaced(values, 5) == [0, 25, 50, 75, 100]
    assert evenly_spaced(values[:3], 5) == [0, 1, 2]
    assert evenly_spaced(values, 1) == [0]


def test_bucket_max_never_thins_a_spike_away():
    values = [1] * 1000
    values[617] = 99
    thinned = bucket_max(values, 10, key=lambda v: v)
    assert len(thinned) == 10 and thinned.count(99) == 1 and thinned[6] == 99
    assert bucket_max(values[:4], 10, key=lambda v: v) == values[:4]
