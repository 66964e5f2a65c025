"""memtrack.insights: each insight fires on the profile that shows it, and not on its look-alikes.

Every profile here is synthetic: records packed with memtrack._core.pack() and read back by
memtrack.profile.parse (tests/synthetic_profiles.py), so the numbers are known exactly.
"""

from __future__ import annotations

import json
import random

import pytest
import synthetic_profiles as sp
from synthetic_profiles import GiB, MiB

import memtrack

# From the module by name: once the package exports the function memtrack.insights(), the
# attribute memtrack.insights is that function, not this module.
from memtrack.profile.insights import (
    LEAK_MIN_TASKS,
    SEVERITIES,
    Insight,
    digest,
    insights,
    kendall_tau,
    theil_sen,
)
from memtrack.sizing import plan_workers


def kinds(found: list[Insight]) -> list[str]:
    return [i.kind for i in found]


def only(found: list[Insight], kind: str) -> Insight:
    matching = [i for i in found if i.kind == kind]
    assert len(matching) == 1, f"expected one {kind}, got {kinds(found)}"
    return matching[0]


def task_profile(series: dict[int, list[int]], *, join_rss: int = 30 * MiB,
                 phase: str = "task") -> memtrack.Profile:
    """A recording with only join and task events: `series` is each worker's retained
    memory after each of its tasks."""
    records = [sp.header("recording")]
    for slot, (pid, values) in enumerate(series.items()):
        records.append({"t": "event", "time": sp.T0, "kind": "join", "pid": pid, "slot": slot,
                        "phase": None, "rss": join_rss, "peak_rss": join_rss,
                        "exit_code": None, "exit_signal": None})
        for k, retained in enumerate(values):
            records.append({"t": "event", "time": sp.T0 + k + 1, "kind": "task", "pid": pid,
                            "retained": retained, "phase": phase})
    return sp.load(records)


# --------------------------------------------------------------------------- statistics


def test_theil_sen_ignores_outliers_that_move_a_first_vs_last_estimate():
    ys = [100.0 + 2 * i for i in range(20)]
    ys[0], ys[-1], ys[7] = 500.0, 0.0, -900.0  # first, last and one in the middle are wild
    assert theil_sen(ys) == pytest.approx(2.0)
    assert (ys[-1] - ys[0]) / 19 < 0  # what first-vs-last would have said


def test_kendall_tau_is_one_for_growth_minus_one_for_decline_and_near_zero_for_noise():
    assert kendall_tau([1, 2, 3, 4]) == 1.0
    assert kendall_tau([4, 3, 2, 1]) == -1.0
    rng = random.Random(7)
    assert abs(kendall_tau([rng.random() for _ in range(200)])) < 0.15


# --------------------------------------------------------------------------- leak


def test_leak_found_from_task_events_with_its_robust_slope_and_savings():
    profile = sp.load(sp.pool_recording(leak=1 * MiB, tasks=12, workers=4))
    leak = only(insights(profile), "leak")
    assert leak.evidence["source"] == "task events"
    assert [w["pid"] for w in leak.evidence["workers"]] == [201, 202, 203, 204]
    for w in leak.evidence["workers"]:
        assert w["slope_per_task"] == 1 * MiB
        assert w["growth"] == 10 * MiB  # 11 tasks after the first: 10 steps of 1 MiB
    assert leak.estimated_savings == 4 * 10 * MiB
    assert "Leak in 'task'" in leak.title and "per 'task'" in leak.message


def test_leak_is_found_when_the_last_task_dips_below_the_first():
    """Steady growth with a collection at the end: first-vs-last says no growth."""
    values = [100 * MiB + k * 2 * MiB for k in range(15)]
    values[-1] = 90 * MiB
    leak = only(insights(task_profile({301: values})), "leak")
    assert leak.evidence["workers"][0]["slope_per_task"] == 2 * MiB


def test_leak_found_in_a_noisy_series():
    rng = random.Random(1)
    values = [200 * MiB + k * 1 * MiB + rng.randint(-3, 3) * MiB // 2 for k in range(40)]
    leak = only(insights(task_profile({301: values})), "leak")
    assert leak.evidence["workers"][0]["slope_per_task"] == pytest.approx(1 * MiB, rel=0.25)


def test_leak_found_in_a_dump_from_its_outermost_phases():
    phases = [("task", float(k), 0.5, 100 * MiB + k * MiB, 100 * MiB + (k + 1) * MiB,
               120 * MiB + k * MiB) for k in range(12)]
    leak = only(insights(sp.load(sp.phases_dump(phases))), "leak")
    assert leak.evidence["source"] == "phase records"
    assert leak.evidence["workers"][0]["slope_per_task"] == 1 * MiB


@pytest.mark.parametrize("case", ["flat", "noise", "one jump", "few tasks", "small growth",
                                  "shrinking"])
def test_no_leak_without_steady_growth(case):
    rng = random.Random(3)
    base = 200 * MiB
    series = {
        "flat": [base] * 30,
        "noise": [base + rng.randint(-4, 4) * MiB for _ in range(30)],
        # A cache filled once half-way: first-vs-last grows by 64 MiB, but it is no leak.
        "one jump": [base + (64 * MiB if k >= 15 else 0) for k in range(30)],
        "few tasks": [base + k * 4 * MiB for k in range(LEAK_MIN_TASKS)],
        "small growth": [base + k * 64 * 1024 for k in range(30)],
        "shrinking": [base - k * MiB for k in range(30)],
    }[case]
    assert "leak" not in kinds(insights(task_profile({301: series})))


def test_no_leak_in_a_pool_that_fills_a_cache_once():
    profile = sp.load(sp.pool_recording(leak=0, jump=(5, 80 * MiB), tasks=14))
    assert "leak" not in kinds(insights(profile))


# --------------------------------------------------------------------------- duplicated state


def test_duplicated_state_as_in_the_compile_commands_story():
    """32 workers each parse the same ~200 MB compile_commands.json: ~6 GB to save."""
    profile = sp.load(sp.pool_recording(workers=32, tasks=3, init_retained=200_000_000,
                                        available=64 * GiB, cpus=32))
    dup = only(insights(profile), "duplicated_state")
    assert dup.estimated_savings == 31 * 200_000_000
    assert dup.evidence["phase"] == "init" and dup.evidence["workers"] == 32
    assert dup.evidence["concurrent_workers"] == 32
    assert dup.evidence["source"] == "worker summaries"
    assert "Estimated Savings: ~5.8 GiB" in dup.title
    assert "before the pool starts" in dup.message and "(32 - 1) x" in dup.message


def test_duplicated_state_from_task_events_when_workers_have_no_summary():
    profile = sp.load(sp.pool_recording(workers=4, init_retained=100 * MiB,
                                        worker_records=False))
    dup = only(insights(profile), "duplicated_state")
    assert dup.evidence["source"] == "task events"
    assert dup.estimated_savings == 3 * 100 * MiB


def test_duplicated_state_counts_workers_alive_at_once_not_every_worker():
    """Recycled workers: 6 came and went, but never more than 2 at once."""
    records = [sp.header("recording")]
    for i in range(6):
        pid, start = 401 + i, sp.T0 + 10 * (i // 2)
        records.append({"t": "event", "time": start, "kind": "join", "pid": pid,
                        "rss": 20 * MiB})
        records.append({"t": "event", "time": start + 5, "kind": "task", "pid": pid,
                        "retained": 20 * MiB + 100 * MiB, "phase": "task"})
        records.append({"t": "event", "time": start + 9, "kind": "exit", "pid": pid,
                        "rss": 120 * MiB, "exit_code": 0})
    dup = only(insights(sp.load(records)), "duplicated_state")
    assert dup.evidence["workers"] == 6 and dup.evidence["concurrent_workers"] == 2
    assert dup.estimated_savings == 100 * MiB


@pytest.mark.parametrize("retained", [
    [50 * MiB, 200 * MiB, 400 * MiB, 800 * MiB],   # each worker keeps something different
    4 * MiB,                                        # the same, but too little to matter
])
def test_no_duplicated_state_when_workers_differ_or_keep_little(retained):
    profile = sp.load(sp.pool_recording(workers=4, init_retained=retained))
    assert "duplicated_state" not in kinds(insights(profile))


def test_no_duplicated_state_with_a_single_worker():
    profile = sp.load(sp.pool_recording(workers=1, init_retained=500 * MiB))
    assert "duplicated_state" not in kinds(insights(profile))


# --------------------------------------------------------------------------- worker count


def test_oversized_pool_gets_the_plan_for_the_recording_host():
    profile = sp.load(sp.pool_recording(workers=16, available=2 * GiB, cpus=32))
    found = only(insights(profile), "worker_count")
    expected = plan_workers(profile=profile, available=2 * GiB, cpus=32,
                            main=found.evidence["main"])
    assert found.evidence["recommended"] == expected.workers < 16
    assert found.evidence["workers_used"] == 16
    assert found.estimated_savings == (16 - expected.workers) * expected.per_worker
    assert found.severity in ("warning", "critical")
    assert f"max_workers={expected.workers}" in found.message


def test_killed_workers_make_an_oversized_pool_critical():
    profile = sp.load(sp.pool_recording(workers=8, available=1 * GiB, killed=[3]))
    found = only(insights(profile), "worker_count")
    assert found.severity == "critical" and found.evidence["killed_workers"] == [204]


def test_undersized_pool_is_told_it_has_room():
    profile = sp.load(sp.pool_recording(workers=2, available=12 * GiB, cpus=8))
    found = only(insights(profile), "worker_count")
    assert found.severity == "info" and found.estimated_savings == 0
    assert found.evidence["recommended"] == 8 and "Room for more workers: 2 -> 8" in found.title


def test_right_sized_pool_gets_no_worker_count_insight():
    profile = sp.load(sp.pool_recording(workers=4, available=12 * GiB, cpus=4))
    assert "worker_count" not in kinds(insights(profile))


def test_worker_count_for_another_host_on_request():
    profile = sp.load(sp.pool_recording(workers=4, available=12 * GiB, cpus=4))
    found = only(insights(profile, available="1 GB"), "worker_count")
    assert found.evidence["available"] == 10**9 and found.evidence["available_from"] == "given"


def test_no_worker_count_for_a_profile_from_an_unknown_host():
    """Without the header's limits the host's memory is unknown, unless it is this host."""
    records = sp.pool_recording(workers=16)
    del records[0]["limits"]
    assert "worker_count" not in kinds(insights(sp.load(records)))


# --------------------------------------------------------------------------- transient spikes


def test_spike_reported_on_the_nested_phase_that_causes_it():
    profile = sp.load(sp.pool_recording(workers=4, spike=300 * MiB, init_retained=20 * MiB))
    found = [i for i in insights(profile) if i.kind == "transient_spike"]
    assert [i.evidence["phase"] for i in found] == ["task/parse"]  # not its parent "task"
    spike = found[0]
    assert spike.evidence["transient"] == 300 * MiB and spike.evidence["concurrent"] == 4
    assert spike.estimated_savings == 4 * 300 * MiB
    assert "Stream or chunk" in spike.message


def test_spike_in_a_single_process_dump():
    phases = [("load", 0.0, 1.0, 50 * MiB, 52 * MiB, 450 * MiB)]
    spike = only(insights(sp.load(sp.phases_dump(phases))), "transient_spike")
    assert spike.evidence["concurrent"] == 1
    assert spike.estimated_savings == 400 * MiB - 2 * MiB


@pytest.mark.parametrize("spike", [0, 8 * MiB])
def test_no_spike_when_peaks_are_small(spike):
    profile = sp.load(sp.pool_recording(workers=4, spike=spike))
    assert "transient_spike" not in kinds(insights(profile))


def test_no_spike_for_a_phase_that_keeps_what_it_allocates():
    """`init` rises by 200 MiB and keeps all of it: duplicated state, not a spike."""
    phases = [("init", 0.0, 1.0, 50 * MiB, 250 * MiB, 250 * MiB)]
    assert "transient_spike" not in kinds(insights(sp.load(sp.phases_dump(phases))))


# --------------------------------------------------------------------------- hot phase


def hot_profile(parse_rss: int) -> memtrack.Profile:
    """Four workers sampled once: one in 'parse', three idle at 300 MiB."""
    records = [sp.header("recording")]
    for i, (phase, rss) in enumerate([("parse", parse_rss), (None, 300 * MiB),
                                      (None, 300 * MiB), (None, 300 * MiB)]):
        records.append({"t": "sample", "time": sp.T0 + 1, "pid": 501 + i, "source": "worker",
                        "rss": rss, "peak_rss": rss, "pss": rss, "uss": rss, "phase": phase})
    records.append({"t": "pool", "time": sp.T0 + 1, "live": 4, "rss": parse_rss + 900 * MiB,
                    "pss": parse_rss + 900 * MiB, "peak_rss": parse_rss + 900 * MiB})
    return sp.load(records)


def test_hot_phase_is_the_phase_holding_most_of_the_pool_peak():
    hot = only(insights(sp.load(sp.pool_recording(workers=4))), "hot_phase")
    assert hot.evidence["phase"] == "task/parse" and hot.evidence["measure"] == "pss"
    assert hot.evidence["workers_in_phase"] == [201, 202, 203, 204]

    hot = only(insights(hot_profile(600 * MiB)), "hot_phase")
    assert hot.evidence["share"] == pytest.approx(600 / 1500)
    assert hot.evidence["bytes"] == 600 * MiB and hot.estimated_savings == 0


def test_no_hot_phase_when_the_phase_holds_a_small_share():
    assert "hot_phase" not in kinds(insights(hot_profile(50 * MiB)))


def test_no_hot_phase_without_phase_information():
    records = sp.pool_recording(workers=4)
    for r in records:
        if r["t"] == "sample":
            r["phase"] = None
        if r["t"] == "worker":
            r["phases"] = {}
    assert "hot_phase" not in kinds(insights(sp.load(records)))


def test_hot_phase_of_a_single_process_dump():
    phases = [("index", 0.0, 2.0, 50 * MiB, 60 * MiB, 400 * MiB),
              ("index/parse", 0.5, 1.0, 55 * MiB, 58 * MiB, 400 * MiB),
              ("write", 2.0, 1.0, 60 * MiB, 60 * MiB, 70 * MiB)]
    hot = only(insights(sp.load(sp.phases_dump(phases))), "hot_phase")
    assert hot.evidence["phase"] == "index/parse"  # the deepest phase that reached the peak


# --------------------------------------------------------------------------- all together


def test_insights_are_ordered_by_severity_then_savings_and_serialise_to_json():
    profile = sp.load(sp.pool_recording(workers=6, leak=1 * MiB, spike=300 * MiB,
                                        available=3 * GiB))
    found = insights(profile)
    order = [(SEVERITIES.index(i.severity), i.estimated_savings) for i in found]
    assert order == sorted(order, key=lambda o: (-o[0], -o[1]))
    assert set(kinds(found)) == {"leak", "duplicated_state", "worker_count", "transient_spike",
                                 "hot_phase"}
    for i in found:
        json.dumps(i.to_dict())
        assert isinstance(i.estimated_savings, int) and i.estimated_savings >= 0


def test_a_quiet_profile_has_no_insights():
    profile = sp.load(sp.pool_recording(workers=4, init_retained=2 * MiB, spike=1 * MiB,
                                        cpus=4))
    assert kinds(insights(profile)) == ["hot_phase"]  # a pointer, never a warning
    assert insights(sp.load([sp.header("recording")])) == []
    assert insights(sp.load([sp.header("phases")])) == []


def test_insights_take_a_path(tmp_path):
    path = sp.write(tmp_path / "run.mtp", sp.pool_recording(init_retained=100 * MiB))
    assert "duplicated_state" in kinds(insights(path))
    with pytest.raises(TypeError, match="memtrack.Profile"):
        insights(42)


def test_ill_typed_records_are_left_out_not_fatal():
    records = sp.pool_recording(workers=3, init_retained=100 * MiB)
    records += [
        {"t": "sample", "time": "soon", "pid": 1, "rss": 1},
        {"t": "sample", "time": sp.T0, "pid": 1, "rss": -5},
        {"t": "event", "time": None, "kind": "task"},
        {"t": "pool", "time": sp.T0, "live": "many", "rss": 0},
        {"t": "worker", "pid": "x", "phases": [1, 2]},
        {"t": "worker", "pid": 999, "phases": {"p": {"count": "one"}}, "rss": True},
    ]
    profile = sp.load(records)
    run = digest(profile)
    assert run.skipped == 4
    assert "duplicated_state" in kinds(insights(profile))


def test_digest_rebuilds_the_pool_from_worker_samples_when_there_are_no_pool_records():
    with_pool = digest(sp.load(sp.pool_recording(workers=3)))
    rebuilt = digest(sp.load(sp.pool_recording(workers=3, pool_records=False)))
    assert rebuilt.pool_source == "worker samples"
    assert rebuilt.peak.pss == with_pool.peak.pss and rebuilt.peak.rss == with_pool.peak.rss
    assert rebuilt.max_live == with_pool.max_live == 3


def test_digest_stops_counting_a_killed_worker_in_a_rebuilt_pool():
    run = digest(sp.load(sp.pool_recording(workers=3, pool_records=False, killed=[0])))
    death = run.workers[0].last_seen
    assert run.workers[0].state == "killed"
    after = [p.live for p in run.pool if death + 0.3 < p.time < 12]
    assert after and set(after) == {2}
    assert max(p.live for p in run.pool) == 3


def test_descendants_found_by_memtrack_run_are_the_pool():
    """`memtrack run` without a worker table: the command is "root", its children "proc"."""
    records = [sp.header("recording", command=["python", "index.py"])]
    for k in range(6):
        t = sp.T0 + k
        records.append({"t": "sample", "time": t, "pid": 700, "source": "root",
                        "rss": 80 * MiB, "peak_rss": 80 * MiB, "pss": 70 * MiB, "uss": 60 * MiB,
                        "phase": None})
        for pid in (701, 702, 703):
            records.append({"t": "sample", "time": t, "pid": pid, "source": "proc",
                            "rss": 900 * MiB, "peak_rss": 900 * MiB, "pss": 850 * MiB,
                            "uss": 800 * MiB, "phase": None})
    profile = sp.load(records)
    run = digest(profile)
    assert [w.pid for w in run.workers] == [701, 702, 703]
    assert run.roles[700] == "main" and run.main_peak == 70 * MiB
    assert run.pool_source == "worker samples" and run.peak.pss == 3 * 850 * MiB
    found = only(insights(profile, available="2 GiB", cpus=8), "worker_count")
    assert found.evidence["workers_used"] == 3 and found.evidence["recommended"] == 2


@pytest.mark.parametrize("kwargs, exc", [({"available": "lots"}, ValueError),
                                         ({"cpus": 0}, ValueError),
                                         ({"headroom": 2}, ValueError),
                                         ({"cpus": "2"}, TypeError)])
def test_bad_options_are_errors_not_silence(kwargs, exc):
    from memtrack.profile import Profile
    from memtrack.profile.insights import insights

    with pytest.raises(exc):
        insights(Profile(header={"t": "header", "magic": "memtrack", "format": 1}), **kwargs)
