"""Profiles: dump/load through msgpack-c, and every way a file can be bad."""

import os
import random

import pytest

import memtrack
from memtrack import _core
from memtrack.profile import FORMAT_VERSION


@pytest.fixture
def profile_path(tmp_path):
    with memtrack.phase("index"):
        with memtrack.phase("parse"):
            pass
    try:
        with memtrack.phase("fail"):
            raise ValueError
    except ValueError:
        pass
    path = tmp_path / "run.mtp"
    memtrack.dump(path)
    return path


def test_round_trip_keeps_every_record_and_the_summary(profile_path):
    p = memtrack.load(profile_path)
    assert p.header["magic"] == "memtrack" and p.header["format"] == FORMAT_VERSION
    assert p.header["pid"] == os.getpid() and p.truncated is None
    assert list(p.phases) == list(memtrack.records())
    assert p.summary == memtrack.summary()
    assert p.phases[-1].error == "ValueError"


def test_dump_is_atomic_and_leaves_no_temporary_file(profile_path):
    assert os.listdir(profile_path.parent) == [profile_path.name]


def test_empty_file(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(memtrack.ProfileError, match="empty file"):
        memtrack.load(tmp_path / "e")


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a memtrack profile"),
        (b'{"json": true}', "not a memtrack profile"),
        (_core.pack({"t": "header", "magic": "other", "format": 1}), "no memtrack header"),
        (_core.pack([1, 2, 3]), "no memtrack header"),
        (_core.pack({"t": "header", "magic": "memtrack"}), "no format version"),
        (_core.pack({"t": "header", "magic": "memtrack", "format": 99}), "format 99"),
        (b"\xc1", "not msgpack at byte 0"),
        (b"\xdf\xff\xff\xff\xff" + bytes(32), "more items than the file holds"),
    ],
)
def test_foreign_files_are_refused_with_the_reason(tmp_path, data, words):
    path = tmp_path / "f"
    path.write_bytes(data)
    with pytest.raises(memtrack.ProfileError, match=words):
        memtrack.load(path)


def test_every_truncation_is_an_error_saying_where(profile_path):
    data = profile_path.read_bytes()
    for cut in range(1, len(data)):
        with pytest.raises(memtrack.ProfileError) as err:
            memtrack.profile.parse(data[:cut], name="cut")
        assert "truncated" in str(err.value) or "not a memtrack profile" in str(err.value)


def test_partial_read_of_a_cut_file(profile_path):
    data = profile_path.read_bytes()
    cut = data[: len(data) - 3]
    p = memtrack.profile.parse(cut, partial=True)
    assert p.truncated is not None and "truncated at byte" in p.truncated
    assert len(p.phases) == 3


def test_wrong_field_types_are_reported_with_the_record(profile_path):
    header = _core.pack({"t": "header", "magic": "memtrack", "format": 1})
    bad = _core.pack({"t": "phase", "name": "x", "path": "x", "pid": "nope"})
    with pytest.raises(memtrack.ProfileError, match="record 1: field 'name'|record 1: field 'pid'"):
        memtrack.profile.parse(header + bad + _core.pack({"t": "end"}))


def test_random_bytes_and_bit_flips_never_crash(profile_path):
    rng = random.Random(1234)
    data = bytearray(profile_path.read_bytes())
    outcomes = set()
    for i in range(3000):
        if i % 2:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
        else:
            blob = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                blob[rng.randrange(len(blob))] = rng.getrandbits(8)
            blob = bytes(blob)
        try:
            memtrack.profile.parse(blob)
            outcomes.add("ok")
        except memtrack.ProfileError:
            outcomes.add("error")
    assert "error" in outcomes


def test_reader_refuses_hostile_shapes():
    # deep nesting, a huge declared array, invalid UTF-8, an extension type
    deep = b"\x91" * 100 + b"\xc0"
    huge_array = b"\xdd\xff\xff\xff\xff" + bytes(64)
    bad_utf8 = b"\xa2\xff\xfe"
    ext = b"\xd4\x01\x00"
    for blob, words in [(deep, "nested too deeply"), (huge_array, "more items than the file holds"),
                        (bad_utf8, "UTF-8"), (ext, "extension")]:
        objects, consumed, error = _core.unpack_stream(blob)
        assert objects == [] and consumed == 0
        assert error is not None and __import__("re").search(words, error[2]), error


def test_pack_refuses_what_msgpack_cannot_hold():
    with pytest.raises(TypeError, match="cannot pack a set"):
        _core.pack({1, 2})
    with pytest.raises(OverflowError):
        _core.pack(2**64)
    with pytest.raises(ValueError, match="deeper"):
        nested = []
        for _ in range(100):
            nested = [nested]
        _core.pack(nested)
    value = {"a": [1, -2, 2**63, 1.5, None, True, b"\x00", "é"]}
    objects, _, error = _core.unpack_stream(_core.pack(value))
    assert objects == [value] and error is None


def test_load_of_a_directory_or_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        memtrack.load(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        memtrack.load(tmp_path)


def test_non_finite_numbers_are_refused():
    header = _core.pack({"t": "header", "magic": "memtrack", "format": 1})
    phase = {"t": "phase", "name": "x", "path": "x", "pid": 1, "thread_id": 1,
             "start": float("inf"), "duration": 0.5, "rss_start": 1, "rss_end": 1,
             "peak_rss": 1, "heap_delta": 0, "error": None}
    with pytest.raises(memtrack.ProfileError, match="record 1: field 'start' should be a finite"):
        memtrack.profile.parse(header + _core.pack(phase) + _core.pack({"t": "end"}))


def test_one_encoder_of_phase_records_keeps_those_since_a_time():
    # given: two phases, the second started after a mark
    memtrack.reset()
    with memtrack.phase("before"):
        pass
    (first,) = memtrack.records()
    with memtrack.phase("after"):
        pass
    second = memtrack.records()[-1]
    # when: the C encoder packs all records, and those since the second's start
    everything, _ = _core.pack_phase_records()
    since, dropped = _core.pack_phase_records(since=second.start)
    # then: the records read back are exactly the PhaseStats, filtered by start
    unpacked = _core.unpack_stream(since)[0]
    assert [r["path"] for r in unpacked] == ["after"] and dropped == 0
    assert unpacked[0]["rss_start"] == second.rss_start
    assert unpacked[0]["start"] == second.start
    assert [r["path"] for r in _core.unpack_stream(everything)[0]] == ["before", "after"]
    assert _core.pack_phase_records(since=first.start)[0] == everything
    assert _core.pack_phase_records(since=None)[0] == everything
    with pytest.raises(TypeError):
        _core.pack_phase_records(since="soon")


def test_summary_records_are_the_summary_as_stored():
    from memtrack.profile.files import summary_records

    memtrack.reset()
    for _ in range(3):
        with memtrack.phase("x"):
            pass
    (record,) = summary_records(memtrack.summary())
    s = memtrack.summary()["x"]
    assert record == {"t": "summary", "path": "x", "count": 3, "total_time": s.total_time,
                      "max_peak_rss": s.max_peak_rss, "max_peak_delta": s.max_peak_delta,
                      "total_rss_delta": s.total_rss_delta}
