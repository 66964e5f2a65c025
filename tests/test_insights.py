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
    profile = sp.load(sp.pool_recording(leak=2 * MiB, tasks=12, workers=4))
    leak = only(insights(profile), "leak")
    assert leak.evidence["source"] == "task events"
    assert [w["pid"] for w in leak.evidence["workers"]] == [201, 202, 203, 204]
    for w in leak.evidence["workers"]:
        assert w["slope_per_task"] == 2 * MiB
        assert w["growth"] == 20 * MiB  # 11 tasks after the first: 10 steps of 2 MiB
        assert w["tasks"] == w["tasks_measured"] == 12
    assert leak.estimated_savings == 4 * 20 * MiB
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


def test_hot_phase_is_the_phase_that_adds_most_of_the_pool_peak():
    # Each of 4 workers rises 300 MiB above its start in task/parse, at once.
    profile = sp.load(sp.pool_recording(workers=4, spike=300 * MiB, init_retained=20 * MiB))
    run = digest(profile)
    hot = only(insights(profile), "hot_phase")
    assert hot.evidence["phase"] == "task/parse" and hot.evidence["measure"] == "pss"
    assert hot.evidence["max_peak_delta"] == 300 * MiB and hot.evidence["concurrent"] == 4
    assert hot.evidence["bytes"] == 4 * 300 * MiB and hot.estimated_savings == 0
    assert hot.evidence["share"] == pytest.approx(4 * 300 * MiB / run.peak_bytes, abs=1e-4)
    # The same unit as the headline: a share of the pool peak the report prints.
    assert hot.evidence["pool_peak"] == run.peak_bytes
    assert "task/parse" in {row.path for row in run.phases}

    # What a phase keeps for good adds to the peak too: init, 200 MiB of ~240 MiB each.
    hot = only(insights(sp.load(sp.pool_recording(workers=4))), "hot_phase")
    assert hot.evidence["phase"] == "init"


def test_no_hot_phase_for_the_memory_a_worker_had_before_the_phase():
    """The false case of issue 11: a worker at 600 MiB in 'parse' is not 600 MiB of parse."""
    assert "hot_phase" not in kinds(insights(hot_profile(600 * MiB)))
    # Every worker in task/extract at the peak, and its phase table says it adds nothing.
    records = sp.pool_recording(workers=4, spike=0, init_retained=200 * MiB)
    for r in records:
        if r["t"] == "sample" and r["source"] == "worker":
            r["phase"] = "task/extract"
        if r["t"] == "worker":
            r["phases"] = {"task": {"count": 12, "total_time": 12.0, "max_peak_rss": 230 * MiB,
                                    "max_peak_delta": 0, "total_rss_delta": 0},
                           "task/extract": {"count": 12, "total_time": 6.0,
                                            "max_peak_rss": 230 * MiB, "max_peak_delta": 0,
                                            "total_rss_delta": 0}}
    assert "hot_phase" not in kinds(insights(sp.load(records)))


def test_no_hot_phase_when_the_phase_adds_a_small_share():
    profile = sp.load(sp.pool_recording(workers=4, spike=40 * MiB, init_retained=2 * MiB,
                                        base=400 * MiB))
    assert "hot_phase" not in kinds(insights(profile))


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
    profile = sp.load(sp.pool_recording(workers=6, leak=3 * MiB, spike=300 * MiB,
                                        init_retained=100 * MiB, available=2 * GiB))
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
    assert kinds(insights(profile)) == []
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
    assert run.roles[700] == "root" and run.main_peak == 70 * MiB
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


# --------------------------------------------------------------------------- issue 11 cases


def test_leak_of_4_mib_per_task_over_40_tasks_is_found():
    values = [120 * MiB + k * 4 * MiB for k in range(40)]
    leak = only(insights(task_profile({301: values})), "leak")
    (w,) = leak.evidence["workers"]
    assert w["slope_per_task"] == 4 * MiB and w["mann_kendall_z"] > 5


@pytest.mark.parametrize("seed", range(20))
def test_no_leak_in_flat_rss_with_allocator_noise(seed):
    """Flat RSS with what malloc does to it: pages touched and returned, an arena that
    grows and is trimmed again, a slow drift of +56 KiB a task. Neither material (well
    under 5% of a 300 MiB worker) nor, mostly, significant: never a leak."""
    rng = random.Random(seed)
    values, arena = [], 0
    for k in range(176):
        if rng.random() < 0.1:
            arena = rng.choice([0, 1, 2]) * MiB
        values.append(300 * MiB + k * 56 * 1024 + arena + rng.randint(-64, 64) * 4096)
    assert "leak" not in kinds(insights(task_profile({301: values})))


def test_no_leak_for_growth_that_is_significant_but_immaterial():
    # +64 KiB every task for 60 tasks: a perfect trend, 3.7 MiB in all: below 4 MiB.
    values = [40 * MiB + k * 64 * 1024 for k in range(60)]
    assert "leak" not in kinds(insights(task_profile({301: values})))
    # +1 MiB a task for 12 tasks of a 1 GiB worker: 11 MiB, 1% of it.
    values = [1024 * MiB + k * MiB for k in range(12)]
    assert "leak" not in kinds(insights(task_profile({301: values})))


def _with_limits(profile: memtrack.Profile, total: int, limit: int | None = None):
    profile.header["limits"] = {"total": total, "available": total // 2, "limit": limit,
                                "limit_source": "test", "used": 0, "swap_total": 0,
                                "swap_free": 0}
    return profile


@pytest.mark.parametrize("per_task, total, severity", [
    (52 * MiB // 39, 23 * GiB, "info"),      # 52 MiB at stake on a 23 GiB machine
    (600 * MiB // 39, 23 * GiB, "warning"),   # 600 MiB: 2.5% of it
    (3 * GiB // 39, 23 * GiB, "critical"),    # 3 GiB: 13%
    (600 * MiB // 39, 2 * GiB, "critical"),   # the same 600 MiB in a 2 GiB machine
])
def test_severity_is_the_share_of_the_machine_at_stake(per_task, total, severity):
    values = [200 * MiB + k * per_task for k in range(41)]
    profile = _with_limits(task_profile({301: values}), total)
    assert only(insights(profile), "leak").severity == severity


def test_severity_uses_the_cgroup_limit_when_it_is_the_smaller():
    values = [200 * MiB + k * (600 * MiB // 39) for k in range(41)]
    profile = _with_limits(task_profile({301: values}), 23 * GiB, limit=2 * GiB)
    assert only(insights(profile), "leak").severity == "critical"


def test_leak_is_named_after_a_phase_of_the_phase_table_and_counts_every_task():
    # Task events that name no phase (what a slot's ring reports), 40 of a worker's 815.
    records = [sp.header("recording")]
    records.append({"t": "event", "time": sp.T0, "kind": "join", "pid": 301, "slot": 0,
                    "rss": 100 * MiB})
    for k in range(40):
        records.append({"t": "event", "time": sp.T0 + k + 1, "kind": "task", "pid": 301,
                        "retained": 100 * MiB + k * 4 * MiB, "tasks": 775 + k + 1})
    records.append({"t": "worker", "pid": 301, "state": "exited", "tasks": 815,
                    "rss": 260 * MiB, "peak_rss": 270 * MiB, "uss": 250 * MiB,
                    "pss": 250 * MiB, "phase": None, "exit_code": 0, "exit_signal": None,
                    "phases": {"index": {"count": 815, "total_time": 9.0,
                                         "max_peak_rss": 270 * MiB, "max_peak_delta": 9 * MiB,
                                         "total_rss_delta": 160 * MiB}}})
    profile = sp.load(records)
    leak = only(insights(profile), "leak")
    assert leak.title.startswith("Leak in 'index'")
    assert leak.evidence["phase"] in {row.path for row in digest(profile).phases}
    assert "40 of its 815 tasks" in leak.message
    # Without any phase, the leak is not named after one.
    records[-1]["phases"] = {}
    leak = only(insights(sp.load(records)), "leak")
    assert leak.title.startswith("Leak across tasks") and "'" not in leak.title.split("(")[0]


def _roles_profile() -> memtrack.Profile:
    """memtrack run of a 2-worker spawn pool: the tool, the root, a resource tracker, a
    forkserver and two workers, every sample saying its role, as the recorder writes."""
    records = [sp.header("recording", limits={"total": 23 * GiB, "available": 20 * GiB,
                                              "limit": None, "limit_source": "test",
                                              "used": 0, "swap_total": 0, "swap_free": 0})]
    procs = [(90, "self", "tool", 24 * MiB), (100, "root", "root", 60 * MiB),
             (101, "proc", "helper", 12 * MiB), (102, "proc", "helper", 14 * MiB),
             (103, "proc", "worker", 50 * MiB), (104, "proc", "worker", 55 * MiB)]
    for k in range(10):
        t = sp.T0 + k * 0.05
        for pid, source, role, rss in procs:
            records.append({"t": "sample", "time": t, "pid": pid, "source": source,
                            "role": role, "rss": rss, "peak_rss": rss, "pss": rss,
                            "uss": rss, "pss_estimated": k > 0, "phase": None})
        records.append({"t": "pool", "time": t, "live": 2, "rss": 105 * MiB,
                        "pss": 105 * MiB, "peak_rss": 105 * MiB, "root_rss": 60 * MiB,
                        "root_pss": 60 * MiB, "others_pss": 26 * MiB})
    for pid, _, role, rss in procs[1:]:
        records.append({"t": "worker", "source": "proc", "pid": pid, "role": role,
                        "state": "running", "tasks": None, "rss": rss, "peak_rss": rss,
                        "pss": rss, "uss": rss, "phases": {}})
    return sp.load(records)


def test_helpers_the_tool_and_the_root_are_not_workers():
    profile = _roles_profile()
    assert [w["pid"] for w in profile.workers] == [103, 104]
    run = digest(profile)
    assert [w.pid for w in run.workers] == [103, 104] and run.max_live == 2
    assert {w.pid: w.role for w in run.processes} == {100: "root", 101: "helper",
                                                      102: "helper"}
    assert run.roles[90] == "tool" and 90 not in run.samples  # in no figure
    assert run.main_peak == 60 * MiB  # the root's own, without memtrack's 24 MiB
    plan = plan_workers(profile=profile, available=20 * GiB, cpus=2)
    assert plan.per_worker == 55 * MiB  # from a worker, never the root or a helper
    for found in insights(profile, cpus=2):
        assert found.kind != "worker_count" or "2 workers" in found.message


def test_worker_count_savings_never_exceed_the_pool_peak():
    profile = sp.load(sp.pool_recording(workers=8, available=300 * MiB, cpus=8))
    found = only(insights(profile), "worker_count")
    assert found.estimated_savings <= digest(profile).peak_bytes


def _deaths_profile(culprit_signal: int | None, oom: bool) -> memtrack.Profile:
    """A pool of 3 where worker 302 dies first; the executor then stops 301 and 303."""
    records = [sp.header("recording")]
    for slot, pid in enumerate((301, 302, 303)):
        records.append({"t": "event", "time": sp.T0, "kind": "join", "pid": pid,
                        "slot": slot, "rss": 30 * MiB, "role": "worker"})
    records.append({"t": "event", "time": sp.T0 + 2, "kind": "death", "pid": 302, "slot": 1,
                    "phase": "parse", "rss": 900 * MiB, "peak_rss": 950 * MiB,
                    "exit_signal": culprit_signal, "state": "killed", "oom": oom,
                    "role": "worker"})
    for pid, slot in ((303, 2), (301, 0)):
        records.append({"t": "event", "time": sp.T0 + 2.05, "kind": "death", "pid": pid,
                        "slot": slot, "phase": "parse", "rss": 40 * MiB, "peak_rss": 40 * MiB,
                        "exit_signal": 15, "state": "killed", "oom": False, "role": "worker"})
    return sp.load(records)


@pytest.mark.parametrize("signal_, oom, how", [(9, False, "signal"), (9, True, "oom"),
                                               (None, True, "oom"), (None, False, "signal")])
def test_the_first_worker_to_die_is_told_apart_from_the_ones_the_pool_stopped(signal_, oom,
                                                                               how):
    run = digest(_deaths_profile(signal_, oom))
    first, *others = run.deaths
    assert first.pid == 302 and first.culprit and first.how == how
    assert first.phase == "parse" and first.peak_rss == 950 * MiB
    assert sorted(d.pid for d in others) == [301, 303]
    assert all(d.stopped_by_pool and not d.culprit for d in others)
    if oom:
        assert "OOM" in first.description
