"""memtrack.sizing: how many workers fit, why, and the `memtrack workers` command."""

from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import memtrack
from memtrack import _core, limits, sizing
from memtrack.cli import workers
from memtrack.limits import CpuLimit, SystemMemory
from memtrack.profile import FORMAT_VERSION, MAGIC
from memtrack.sizing import WorkerPlan, calculate_max_workers, plan_workers

GB = 10**9
MiB = 1024**2

# The case from the background report: 16 GB, a 0.5 GB main process, 1.2 GB workers,
# 32 CPUs: (16 - 0.5) / 1.2 = 12.9 -> 12 workers.
STORY = {"per_worker": "1.2 GB", "main": "0.5 GB", "available": "16 GB", "cpus": 32}


@dataclass
class FakeWorker:
    """What WorkerTable.workers() yields (duck-typed)."""

    pid: int
    state: str
    rss: int
    peak_rss: int
    uss: int
    pss: int


class FakeTable:
    def __init__(self, *workers: FakeWorker) -> None:
        self._workers = list(workers)

    def workers(self) -> list[FakeWorker]:
        return self._workers


@pytest.fixture
def detected(monkeypatch: pytest.MonkeyPatch) -> SystemMemory:
    """A container limited to 8 GB with 6 GB available and 4 CPUs of quota."""
    memory = SystemMemory(total=8 * GB, available=6 * GB, limit=8 * GB,
                          limit_source="/sys/fs/cgroup/memory.max", used=2 * GB,
                          swap_total=0, swap_free=0)
    monkeypatch.setattr(sizing, "system_memory", lambda: memory)
    monkeypatch.setattr(sizing, "cpu_limit_info",
                        lambda: CpuLimit(4, "/sys/fs/cgroup/cpu.max"))
    return memory


# --------------------------------------------------------------------------- the formula


def test_the_16_gb_story_gives_12_workers() -> None:
    # given: the numbers of the background report

    # when
    plan = plan_workers(STORY["per_worker"], main=STORY["main"],
                        available=STORY["available"], cpus=STORY["cpus"])

    # then
    assert plan.workers == 12
    assert plan.limited_by == "memory"
    assert plan.fit_by_memory == 12
    assert plan.warnings == []
    assert calculate_max_workers("1.2 GB", main="0.5 GB", available="16 GB", cpus=32) == 12


def test_strings_and_ints_give_the_same_plan() -> None:
    # given
    as_text = plan_workers("1.2 GB", main="0.5 GB", available="16 GB", cpus=32)

    # when
    as_bytes = plan_workers(1_200_000_000, main=500_000_000, available=16_000_000_000, cpus=32)

    # then
    assert as_text == as_bytes
    assert (as_bytes.per_worker, as_bytes.main, as_bytes.available) == (1.2 * GB, 0.5 * GB,
                                                                        16 * GB)


def test_binary_units_are_accepted() -> None:
    # given: 4 GiB available, 512 MiB per worker

    # when / then: exactly 8
    assert calculate_max_workers("512 MiB", available="4 GiB", cpus=64) == 8


def test_headroom_keeps_a_fraction_free() -> None:
    # given: 10% of the 16 GB kept free: 14.4 - 0.5 = 13.9 GB -> 11 workers

    # when
    plan = plan_workers("1.2 GB", main="0.5 GB", available="16 GB", cpus=32, headroom=0.1)

    # then
    assert plan.workers == 11
    assert plan.usable == 13_900_000_000


def test_headroom_at_an_exact_boundary_does_not_lose_a_worker() -> None:
    # given: 10 GB x 0.9 = exactly 9 GB = 6 x 1.5 GB (0.9 is not exact in binary floats)

    # when / then
    assert calculate_max_workers("1.5 GB", available="10 GB", cpus=64, headroom=0.1) == 6


def test_cpus_bound_the_answer() -> None:
    # given: memory for 12, but 4 CPUs

    # when
    plan = plan_workers(**{**STORY, "cpus": 4})

    # then
    assert (plan.workers, plan.limited_by) == (4, "cpus")
    assert plan.fit_by_memory == 12


def test_max_workers_bounds_the_answer() -> None:
    # given
    plan = plan_workers(**STORY, max_workers=6)

    # then
    assert (plan.workers, plan.limited_by) == (6, "max_workers")


def test_tie_between_memory_and_cpus_names_memory() -> None:
    # given: memory fits exactly 12 and there are 12 CPUs
    plan = plan_workers(**{**STORY, "cpus": 12})

    # then
    assert (plan.workers, plan.limited_by) == (12, "memory")


def test_when_no_worker_fits_it_returns_min_workers_and_warns() -> None:
    # given: a 20 GB worker on a 16 GB machine

    # when
    plan = plan_workers("20 GB", available="16 GB", cpus=32)

    # then
    assert plan.workers == 1
    assert plan.limited_by == "min_workers"
    assert plan.fit_by_memory == 0
    assert len(plan.warnings) == 1
    assert "min_workers=1" in plan.warnings[0] and "0 worker" in plan.warnings[0]


def test_main_larger_than_available_leaves_nothing_and_warns() -> None:
    # given
    plan = plan_workers("100 MB", main="2 GB", available="1 GB", cpus=8)

    # then
    assert plan.workers == 1
    assert plan.usable < 0
    assert "no memory for workers" in plan.warnings[0]


def test_min_workers_above_memory_fit_is_honoured_with_a_warning() -> None:
    # given: memory fits 12 but the caller insists on at least 16
    plan = plan_workers(**STORY, min_workers=16)

    # then
    assert (plan.workers, plan.limited_by) == (16, "min_workers")
    assert any("holds 12 worker(s)" in w for w in plan.warnings)


def test_min_workers_above_cpus_warns_about_sharing_cpus() -> None:
    # given
    plan = plan_workers("1 GB", available="64 GB", cpus=2, min_workers=4)

    # then
    assert (plan.workers, plan.limited_by) == (4, "min_workers")
    assert plan.warnings == ["min_workers=4 is more than the 2 CPU(s) available; "
                             "workers will share CPUs"]


def test_it_never_exceeds_memory_with_default_min_workers() -> None:
    # given: many combinations of sizes
    for available in (1, 3 * GB, 16 * GB, 100 * GB):
        for per_worker in (1, 700 * MiB, 1.2 * GB, 5 * GB):
            for main in (0, 457 * MiB):
                # when
                plan = plan_workers(int(per_worker), main=main, available=available, cpus=512)

                # then: workers fit, or the one forced worker is flagged
                fits = plan.workers * plan.per_worker + plan.main <= plan.available
                assert fits or (plan.workers == 1 and plan.warnings)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"headroom": 1.0}, ValueError, "headroom"),
        ({"headroom": -0.1}, ValueError, "headroom"),
        ({"headroom": float("nan")}, ValueError, "headroom"),
        ({"headroom": "0.1"}, TypeError, "headroom"),
        ({"headroom": True}, TypeError, "headroom"),
        ({"min_workers": 0}, ValueError, "min_workers"),
        ({"min_workers": 1.5}, TypeError, "min_workers"),
        ({"max_workers": 0}, ValueError, "max_workers"),
        ({"min_workers": 4, "max_workers": 2}, ValueError, "min_workers (4)"),
        ({"cpus": 0}, ValueError, "cpus"),
        ({"cpus": "8"}, TypeError, "cpus"),
        ({"per_worker": "lots"}, ValueError, "'lots'"),
        ({"per_worker": 0}, ValueError, "per_worker"),
        ({"per_worker": -5}, ValueError, "per_worker"),
        ({"per_worker": 1.5}, TypeError, "per_worker"),
        ({"main": "half a gig"}, ValueError, "'half a gig'"),
        ({"available": "16 GiBs"}, ValueError, "'16 GiBs'"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs: dict, error: type, text: str) -> None:
    # given: the story's arguments with one bad value
    arguments = {**STORY, **kwargs}

    # when / then
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        plan_workers(**arguments)


def test_without_any_per_worker_source_it_says_what_to_pass() -> None:
    # when / then
    with pytest.raises(ValueError, match="per_worker=.*table/profile"):
        plan_workers(available="16 GB", cpus=4)


def test_table_and_profile_together_are_rejected() -> None:
    # when / then
    with pytest.raises(ValueError, match="not both"):
        plan_workers(table=FakeTable(), profile=SimpleNamespace(workers=[], header={}))


def test_a_table_without_workers_method_is_rejected() -> None:
    # when / then
    with pytest.raises(TypeError, match="WorkerTable"):
        plan_workers(table=object(), available="1 GB", cpus=1)


# --------------------------------------------------------------------------- detection


def test_available_and_cpus_default_to_the_detected_limits(detected: SystemMemory) -> None:
    # given: a container with 6 GB available and 4 CPUs (fixture)

    # when: 1 GB workers, 0.5 GB main -> 5 by memory, 4 by CPU
    plan = plan_workers("1 GB", main="0.5 GB")

    # then
    assert (plan.workers, plan.limited_by) == (4, "cpus")
    assert plan.available == 6 * GB
    assert plan.cpus == 4
    assert "/sys/fs/cgroup/memory.max" in plan.sources["available"]
    assert plan.sources["cpus"] == "cpu_limit(): /sys/fs/cgroup/cpu.max"


def test_real_machine_defaults_are_used_without_arguments() -> None:
    # given: this machine
    memory = limits.system_memory()

    # when
    plan = plan_workers("1 MB")

    # then: the detected numbers (available may move a little between the reads)
    assert plan.cpus == limits.cpu_limit()
    assert abs(plan.available - memory.available) < 256 * MiB
    assert plan.workers == min(plan.cpus, plan.fit_by_memory)


# --------------------------------------------------------------------------- from measurements


def test_per_worker_from_a_table_is_the_largest_private_peak() -> None:
    # given: three workers; worker 12 peaked at 900 MiB with 100 MiB shared
    table = FakeTable(
        FakeWorker(pid=11, state="running", rss=400 * MiB, peak_rss=600 * MiB, uss=350 * MiB,
                   pss=370 * MiB),
        FakeWorker(pid=12, state="idle", rss=500 * MiB, peak_rss=900 * MiB, uss=400 * MiB,
                   pss=450 * MiB),
        FakeWorker(pid=13, state="exited", rss=300 * MiB, peak_rss=700 * MiB, uss=250 * MiB,
                   pss=270 * MiB),
    )

    # when
    plan = plan_workers(table=table, available="16 GB", cpus=64)

    # then: 900 - (500 - 400) = 800 MiB; main is this process's PSS
    assert plan.per_worker == 800 * MiB
    assert "pid 12" in plan.sources["per_worker"]
    assert plan.main > 0
    assert "PSS" in plan.sources["main"]
    assert abs(plan.main - memtrack.footprint().pss) < 64 * MiB
    assert plan.workers == math.floor((16 * GB - plan.main) / (800 * MiB))


def test_table_falls_back_to_uss_when_peak_minus_shared_is_not_positive() -> None:
    # given: a worker whose shared pages exceed its recorded peak (a torn reading)
    table = FakeTable(FakeWorker(pid=7, state="running", rss=900 * MiB, peak_rss=100 * MiB,
                                 uss=50 * MiB, pss=60 * MiB))

    # when
    plan = plan_workers(table=table, main=0, available="1 GB", cpus=64)

    # then
    assert plan.per_worker == 50 * MiB


def test_explicit_per_worker_wins_over_the_table() -> None:
    # given
    table = FakeTable(FakeWorker(1, "running", 10, 10, 10, 10))

    # when
    plan = plan_workers("1 GB", table=table, main="1 GB", available="10 GB", cpus=64)

    # then
    assert (plan.per_worker, plan.main, plan.workers) == (GB, GB, 9)
    assert plan.sources["per_worker"] == plan.sources["main"] == "given"


def test_a_killed_worker_is_flagged() -> None:
    # given: a worker killed (perhaps by the OOM killer) before it finished
    table = FakeTable(FakeWorker(42, "killed", 1 * GB, 2 * GB, 1 * GB, 1 * GB))

    # when
    plan = plan_workers(table=table, main=0, available="10 GB", cpus=64)

    # then
    assert plan.per_worker == 2 * GB
    assert any("42" in w and "killed" in w for w in plan.warnings)


def test_a_table_with_no_workers_raises() -> None:
    # when / then
    with pytest.raises(ValueError, match="per_worker="):
        plan_workers(table=FakeTable(), available="10 GB", cpus=4)


def test_per_worker_and_main_from_a_profile_object() -> None:
    # given: what memtrack.load() returns, with a malformed worker row among good ones
    profile = SimpleNamespace(
        header={"main_pss": 457 * MiB},
        workers=[
            {"pid": 1, "state": "exited", "rss": 1 * GB, "peak_rss": int(1.3 * GB),
             "uss": int(0.9 * GB), "pss": GB},
            {"pid": 2, "state": "exited", "rss": "?", "peak_rss": None},
            {"pid": 3, "state": "exited", "rss": GB, "peak_rss": int(1.1 * GB),
             "uss": int(0.9 * GB), "pss": GB},
        ],
    )

    # when
    plan = plan_workers(profile=profile, available="16 GB", cpus=32)

    # then: 1.3 - (1.0 - 0.9) = 1.2 GB per worker, main from the header
    assert plan.per_worker == int(1.3 * GB) - (GB - int(0.9 * GB))
    assert plan.main == 457 * MiB
    assert plan.sources["main"] == "profile: header main_pss"
    assert plan.workers == 12


def test_a_profile_without_main_pss_counts_main_as_zero_and_warns() -> None:
    # given
    profile = SimpleNamespace(header={}, workers=[{"pid": 1, "uss": GB}])

    # when
    plan = plan_workers(profile=profile, available="4 GB", cpus=8)

    # then
    assert (plan.per_worker, plan.main, plan.workers) == (GB, 0, 4)
    assert any("main=" in w for w in plan.warnings)


def test_main_from_the_main_process_samples_of_a_recording() -> None:
    # given: a recording (memtrack.record) without main_pss, whose own samples carry pss
    profile = SimpleNamespace(
        header={},
        workers=[{"pid": 1, "uss": GB}],
        samples=[{"source": "self", "pss": None}, {"source": "self", "pss": 300 * MiB},
                 {"source": "worker", "pss": 2 * GB}, {"source": "root", "pss": 500 * MiB}],
    )

    # when
    plan = plan_workers(profile=profile, available="4 GB", cpus=8)

    # then: the largest pss of the main process (self or root), not a worker's
    assert plan.main == 500 * MiB
    assert "largest PSS of the main process" in plan.sources["main"]
    assert not any("main=" in w for w in plan.warnings)


def test_a_profile_without_workers_raises() -> None:
    # when / then
    with pytest.raises(ValueError, match="per_worker=.*table/profile with worker data"):
        plan_workers(profile=SimpleNamespace(header={}, workers=[]), available="4 GB", cpus=8)


def test_a_profile_of_the_wrong_type_is_rejected() -> None:
    # when / then
    with pytest.raises(TypeError, match="memtrack.load"):
        plan_workers(profile=42, available="4 GB", cpus=8)


def _write_profile(path: Path, workers: list[dict], *, main_pss: int | None,
                   complete: bool = True) -> Path:
    header = {"t": "header", "magic": MAGIC, "format": FORMAT_VERSION, "kind": "workers"}
    if main_pss is not None:
        header["main_pss"] = main_pss
    records = [header, *({"t": "worker", **w} for w in workers)]
    if complete:
        records.append({"t": "end"})
    path.write_bytes(b"".join(_core.pack(r) for r in records))
    return path


def test_per_worker_from_a_profile_path(tmp_path: Path) -> None:
    # given: a profile file with two workers
    path = _write_profile(tmp_path / "run.mtp", [
        {"pid": 5, "state": "exited", "rss": 800 * MiB, "peak_rss": 1000 * MiB,
         "uss": 700 * MiB, "pss": 750 * MiB},
        {"pid": 6, "state": "exited", "rss": 800 * MiB, "peak_rss": 1200 * MiB,
         "uss": 700 * MiB, "pss": 750 * MiB},
    ], main_pss=200 * MiB)

    # when
    plan = plan_workers(profile=path, available="8 GiB", cpus=64)

    # then: 1200 - 100 = 1100 MiB; (8192 - 200) // 1100 = 7
    assert plan.per_worker == 1100 * MiB
    assert plan.main == 200 * MiB
    assert plan.workers == 7
    assert str(path) in plan.sources["per_worker"]


def test_a_truncated_profile_is_used_with_a_warning(tmp_path: Path) -> None:
    # given: a run killed before it wrote its end record
    path = _write_profile(tmp_path / "killed.mtp", [{"pid": 5, "uss": GB}], main_pss=0,
                          complete=False)

    # when
    plan = plan_workers(profile=str(path), available="4 GB", cpus=8)

    # then
    assert plan.workers == 4
    assert any("incomplete" in w for w in plan.warnings)


# --------------------------------------------------------------------------- explain


def test_explain_names_the_answer_the_bound_and_the_sources() -> None:
    # given
    plan = plan_workers(**STORY)

    # when
    text = plan.explain()

    # then
    lines = text.splitlines()
    assert lines[0] == "12 workers, bound by memory."
    assert "16 GB" in text and "1.2 GB" in text and "500 MB" in text
    assert "15.5 GB" in text  # usable
    assert "12 fit in memory" in text
    assert "available: given" in text
    assert "cpus: 32 (given)" in text


def test_explain_says_where_detected_memory_came_from(detected: SystemMemory) -> None:
    # given
    plan = plan_workers("3 GB")

    # when
    text = plan.explain()

    # then
    assert "bound by memory" in text
    assert "cgroup limit" in text and "/sys/fs/cgroup/memory.max" in text
    assert "/sys/fs/cgroup/cpu.max" in text


def test_explain_lists_warnings() -> None:
    # given
    plan = plan_workers("20 GB", available="16 GB", cpus=4)

    # when / then
    assert "bound by min_workers" in plan.explain()
    assert "warning: " in plan.explain()


def test_worker_plan_is_constructible_with_the_documented_fields() -> None:
    # given / when
    plan = WorkerPlan(workers=2, per_worker=GB, main=0, available=3 * GB, cpus=4,
                      limited_by="memory", warnings=[])

    # then
    assert plan.explain().startswith("2 workers, bound by memory.")


# --------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="memtrack")
    workers.add_workers_parser(top.add_subparsers(dest="command"))
    return top


def run(argv: list[str]) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_detected_limits_and_the_plan() -> None:
    # given / when
    code, out, err = run(["workers", "--per-worker", "1.2 GB", "--main", "0.5 GB",
                          "--available", "16 GB", "--cpus", "32"])

    # then
    assert code == 0, err
    assert "Detected limits" in out
    assert "memory available" in out and "cpus" in out
    assert limits.system_memory().limit_source in out
    assert "12 workers, bound by memory." in out


def test_cli_options_reach_the_plan() -> None:
    # given / when
    code, out, _ = run(["workers", "--per-worker", "1.2 GB", "--main", "0.5 GB",
                        "--available", "16 GB", "--cpus", "32", "--headroom", "0.1",
                        "--max-workers", "8"])

    # then
    assert code == 0
    assert "8 workers, bound by max_workers." in out
    assert "10% headroom" in out


def test_cli_from_profile(tmp_path: Path) -> None:
    # given
    path = _write_profile(tmp_path / "run.mtp", [{"pid": 5, "uss": GB}], main_pss=GB)

    # when
    code, out, _ = run(["workers", "--from", str(path), "--available", "5 GB", "--cpus", "8"])

    # then
    assert code == 0
    assert "4 workers, bound by memory." in out
    assert str(path) in out


def test_cli_bad_size_is_an_error_naming_it() -> None:
    # when
    code, _, err = run(["workers", "--per-worker", "lots"])

    # then
    assert code == 2
    assert "'lots'" in err and err.startswith("memtrack workers: error:")


def test_cli_without_per_worker_or_profile_explains_what_to_pass() -> None:
    # when
    code, _, err = run(["workers"])

    # then
    assert code == 2
    assert "per_worker=" in err


def test_cli_missing_profile_file_is_an_error(tmp_path: Path) -> None:
    # when
    code, _, err = run(["workers", "--from", str(tmp_path / "missing.mtp")])

    # then
    assert code == 2
    assert "missing.mtp" in err


def test_cli_corrupt_profile_is_an_error(tmp_path: Path) -> None:
    # given
    bad = tmp_path / "bad.mtp"
    bad.write_bytes(b"not msgpack at all")

    # when
    code, _, err = run(["workers", "--from", str(bad)])

    # then
    assert code == 2
    assert "bad.mtp" in err


def test_cli_bad_input_prints_only_the_error() -> None:
    # when
    code, out, err = run(["workers", "--per-worker", "1 GB", "--headroom", "1.5"])

    # then: no half-printed report before the error
    assert code == 2
    assert out == ""
    assert "headroom" in err


def test_add_workers_parser_also_accepts_a_parser_made_for_the_command() -> None:
    # given: a dispatcher that creates the "workers" parser itself
    top = argparse.ArgumentParser(prog="memtrack")
    sub = top.add_subparsers(dest="command")
    workers.add_workers_parser(sub.add_parser("workers"))

    # when
    args = top.parse_args(["workers", "--from", "run.mtp", "--max-workers", "3"])

    # then
    assert (args.profile, args.max_workers, args.func) == ("run.mtp", 3,
                                                            workers.run_workers_command)


def test_memtrack_cli_runs_the_workers_command(capsys: pytest.CaptureFixture[str]) -> None:
    # given: the package's own command line
    from memtrack import cli

    # when
    code = cli.main(["workers", "--per-worker", "1.2 GB", "--main", "0.5 GB",
                     "--available", "16 GB", "--cpus", "32"])

    # then
    assert code == 0
    assert "12 workers, bound by memory." in capsys.readouterr().out
