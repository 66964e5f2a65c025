"""memtrack.report: text, JSON (against its schema), CSV, Prometheus, HTML, and the command.

The HTML report is also opened in headless Chromium (when installed) and its screenshot is
checked for the colours only the charts draw, so a page whose charts fail shows up red here.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import re
import shutil
import struct
import subprocess
import zlib
from importlib import resources

import pytest
import synthetic_profiles as sp
from synthetic_profiles import GiB, MiB

from memtrack import cli, report
from memtrack.cli.report import add_report_arguments, run_report_command
from memtrack.profile.insights import insights
from memtrack.report import formats, render
from memtrack.report import html as html_report

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the [test] extra")

SCHEMA = json.loads(resources.files("memtrack.report").joinpath("report.schema.json").read_text())


def busy_pool() -> list[dict]:
    """Six workers, 200 MiB of init state each, a 300 MiB parse spike, a 1 MiB-per-task
    leak, 3 GiB available, and worker 203 killed half-way."""
    return sp.pool_recording(workers=6, leak=1 * MiB, spike=300 * MiB, available=3 * GiB,
                             killed=[2])


PROFILES = {
    "pool": busy_pool,
    "pool rebuilt from samples": lambda: sp.pool_recording(workers=3, pool_records=False,
                                                           worker_records=False),
    "dump": lambda: sp.phases_dump([("index", 0.0, 2.0, 50 * MiB, 60 * MiB, 400 * MiB),
                                    ("index/parse", 0.5, 1.0, 55 * MiB, 58 * MiB, 400 * MiB)]),
    "empty recording": lambda: [sp.header("recording")],
}


@pytest.fixture
def pool_profile():
    return sp.load(busy_pool())


# --------------------------------------------------------------------------- text


def test_text_report_has_every_section_and_the_findings(pool_profile):
    text = render(pool_profile, "text", name="run.mtp")
    for heading in ("memtrack report: run.mtp (recording, host synthetic-host, 8 CPUs, "
                    "3.0 GiB available)", "Memory timeline (pool, from pool records)",
                    "Per phase (all processes)", "Per worker", "Pool peak: ", "Insights"):
        assert heading in text
    assert "<- peak" in text
    killed = next(line for line in text.splitlines() if line.lstrip().startswith("203 "))
    assert "killed" in killed and "signal 9" in killed
    for i in insights(pool_profile):
        assert i.title in text
    assert "(Estimated Savings: ~1000.0 MiB)" in text  # (6 - 1) x 200 MiB of init state


def test_text_report_of_a_dump_and_of_an_empty_recording():
    text = render(sp.load(PROFILES["dump"]()), "text")
    assert "Per phase" in text and "index/parse" in text and "Per worker" not in text
    assert "Peak: 400.0 MiB" in text
    empty = render(sp.load(PROFILES["empty recording"]()), "text")
    assert "none: nothing in this profile crossed an insight's threshold" in empty


def test_text_report_warns_about_an_incomplete_profile():
    profile = sp.load(busy_pool(), end=False)
    assert "warning: incomplete profile" in render(profile, "text")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown report format 'yaml'"):
        render(sp.load(busy_pool()), "yaml")


# --------------------------------------------------------------------------- JSON


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", PROFILES)
def test_json_report_matches_its_schema(name):
    data = json.loads(render(sp.load(PROFILES[name]()), "json"))
    jsonschema.Draft202012Validator(SCHEMA).validate(data)


def test_json_report_of_a_truncated_profile_matches_its_schema():
    data = json.loads(render(sp.load(busy_pool(), end=False), "json"))
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert data["source"]["truncated"].startswith("truncated after record")


def test_json_report_holds_the_numbers(pool_profile):
    data = json.loads(render(pool_profile, "json", name="run.mtp"))
    pool = [r for r in busy_pool() if r["t"] == "pool"]
    assert data["pool"]["peak"]["pss"] == max(p["pss"] for p in pool)
    assert data["pool"]["max_live"] == 6 and len(data["pool"]["timeline"]) == len(pool)
    assert [w["pid"] for w in data["workers"]] == [201, 202, 203, 204, 205, 206]
    assert data["workers"][2]["state"] == "killed" and data["workers"][2]["exit_signal"] == 9
    assert {p["path"] for p in data["phases"]} == {"init", "task", "task/parse"}
    assert [i["kind"] for i in data["insights"]] == [i.kind for i in insights(pool_profile)]
    assert data["source"]["file"] == "run.mtp" and data["source"]["interval"] == 0.25


def test_a_schema_violation_is_caught():
    """The check is real: a report with a wrong type fails validation."""
    data = json.loads(render(sp.load(busy_pool()), "json"))
    data["workers"][0]["rss"] = "a lot"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)


# --------------------------------------------------------------------------- CSV


def test_csv_has_one_row_per_sample(pool_profile):
    rows = list(csv.DictReader(io.StringIO(render(pool_profile, "csv"))))
    samples = [r for r in busy_pool() if r["t"] == "sample"]
    assert len(rows) == len(samples)
    assert list(rows[0]) == list(formats.CSV_COLUMNS)
    first = rows[0]
    assert float(first["time"]) == pytest.approx(sp.T0) and float(first["elapsed"]) == 0
    by_key = {(round(float(r["time"]), 6), int(r["pid"])): r for r in rows}
    for s in samples:
        row = by_key[(round(s["time"], 6), s["pid"])]
        assert int(row["rss"]) == s["rss"] and (row["phase"] or None) == s["phase"]
        assert row["role"] == ("root" if s["source"] == "self" else "worker")


def test_csv_of_a_profile_without_samples_is_the_header_alone():
    assert render(sp.load(PROFILES["dump"]()), "csv") == ",".join(formats.CSV_COLUMNS) + "\n"


# --------------------------------------------------------------------------- Prometheus

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? (\S+)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (\S.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_UNITS = ("_bytes", "_seconds", "_total", "_info", "_workers_max")


def parse_exposition(text: str) -> dict[str, dict]:
    """A strict reader of the text exposition format: every line must parse; every family
    has HELP then TYPE before its samples, which are contiguous, with no repeated label
    set; counters end in _total and every name carries its unit."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HELP.match(line):
            assert m.group(1) not in families, f"line {n}: family {m.group(1)} repeated"
            current = families[m.group(1)] = {"help": m.group(2), "type": None, "samples": {}}
        elif m := _TYPE.match(line):
            assert current is not None and m.group(1) in families, f"line {n}: TYPE before HELP"
            assert families[m.group(1)] is current and current["type"] is None
            current["type"] = m.group(2)
        else:
            m = _SAMPLE.match(line)
            assert m, f"line {n} does not parse: {line!r}"
            name, labels, value = m.groups()
            assert current is not None and families.get(name) is current, (
                f"line {n}: sample of {name} outside its family")
            assert current["type"] is not None, f"line {n}: {name} has no TYPE"
            assert labels not in current["samples"], f"line {n}: repeated labels {labels}"
            current["samples"][labels or ""] = float(value)
    for name, family in families.items():
        assert family["samples"], f"{name} has no samples"
        assert name.endswith(_UNITS), f"{name}: no unit suffix"
        assert (family["type"] == "counter") == name.endswith("_total"), name
    return families


def test_prometheus_exposition_parses_strictly(pool_profile):
    families = parse_exposition(render(pool_profile, "prometheus"))
    rss = families["memtrack_worker_rss_bytes"]
    assert rss["type"] == "gauge"
    assert rss["samples"]['{pid="203",phase="task/parse"}'] == 236 * MiB
    assert rss["samples"]['{pid="201",phase=""}'] == 242 * MiB
    assert families["memtrack_phase_runs_total"]["samples"]['{phase="task"}'] == 66
    assert "memtrack_pool_peak_pss_bytes" in families
    savings = families["memtrack_insight_estimated_savings_bytes"]["samples"]
    assert savings['{kind="duplicated_state",severity="warning",subject="init"}'] == 5 * 200 * MiB


@pytest.mark.parametrize("name", PROFILES)
def test_prometheus_exposition_of_every_profile_parses(name):
    parse_exposition(render(sp.load(PROFILES[name]()), "prometheus"))


def test_prometheus_label_values_are_escaped():
    records = sp.pool_recording(workers=2)
    for r in records:
        if r["t"] == "worker":
            r["phase"] = 'say "hi"\\ \nnow'
    text = render(sp.load(records), "prometheus")
    families = parse_exposition(text)
    assert '{pid="201",phase="say \\"hi\\"\\\\ \\nnow"}' in families["memtrack_worker_rss_bytes"][
        "samples"]


def test_the_strict_parser_rejects_a_bad_exposition():
    with pytest.raises(AssertionError):
        parse_exposition("# TYPE memtrack_x_bytes gauge\nmemtrack_x_bytes 1\n")
    with pytest.raises(AssertionError):
        parse_exposition("# HELP memtrack_x_bytes x\n# TYPE memtrack_x_bytes gauge\n"
                         'memtrack_x_bytes{pid="1} 1\n')


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package: prometheus)")
@pytest.mark.parametrize("name", PROFILES)
def test_promtool_accepts_the_exposition(name):
    text = render(sp.load(PROFILES[name]()), "prometheus")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


# --------------------------------------------------------------------------- HTML


def embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="memtrack-data">(.*?)</script>', page,
                  re.S)
    assert m
    return json.loads(m.group(1))


def test_html_is_one_self_contained_file(pool_profile):
    page = render(pool_profile, "html", name="run.mtp")
    assert page.startswith("<!doctype html>")
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "Chart.js v3.9.1" in page  # the library is embedded, not fetched
    assert not re.search(r"\{\{[A-Z_]+\}\}", page)  # every placeholder filled
    data = embedded_data(page)
    assert {p["pid"] for p in data["processes"]} == {100, 201, 202, 203, 204, 205, 206}
    assert data["phases"][:3] == ["init", "task", "task/parse"]
    assert data["lanes"][0] == "root 100" and len(data["lanes"]) == 7
    for i in insights(pool_profile):
        assert html.escape(i.title) in page
    assert '<tr class="bad"><td class="num">203</td>' in page


def test_html_keeps_hostile_names_inert():
    evil = "</script><script>alert(1)</script><!--"
    records = sp.pool_recording(workers=2)
    for r in records:
        if r.get("phase") == "init":
            r["phase"] = evil
        if r["t"] == "worker":
            r["phases"][evil] = r["phases"].pop("init")
    page = render(sp.load(records), "html")
    assert "<script>alert(1)" not in page
    assert evil in embedded_data(page)["phases"]


def test_html_of_a_dump_and_of_an_empty_recording_render():
    for name in ("dump", "empty recording"):
        page = render(sp.load(PROFILES[name]()), "html")
        assert embedded_data(page)["duration"] >= 0


def read_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and the unfiltered rows of an 8-bit, non-interlaced
    RGB or RGBA PNG (what Chromium writes). No imaging library needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    low7 = int.from_bytes(b"\x7f" * stride, "big")
    high = int.from_bytes(b"\x80" * stride, "big")
    rows, prev = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], raw[start + 1:start + 1 + stride]
        if kind == 0:
            row = line
        elif kind == 2:  # Up: bytewise (line + prev) mod 256, all bytes at once
            a, b = int.from_bytes(line, "big"), int.from_bytes(prev, "big")
            row = (((a & low7) + (b & low7)) ^ ((a ^ b) & high)).to_bytes(stride, "big")
        else:
            out = bytearray(line)
            for i in range(stride):
                left = out[i - bpp] if i >= bpp else 0
                up = prev[i]
                if kind == 1:
                    out[i] = (out[i] + left) & 0xFF
                elif kind == 3:
                    out[i] = (out[i] + ((left + up) >> 1)) & 0xFF
                else:  # Paeth
                    corner = prev[i - bpp] if i >= bpp else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                    out[i] = (out[i] + pred) & 0xFF
            row = bytes(out)
        rows.append(row)
        prev = row
    return width, height, bpp, rows


def count_colour(rows: list[bytes], bpp: int, hex_colour: str) -> int:
    rgb = bytes.fromhex(hex_colour.lstrip("#"))
    total = 0
    for row in rows:
        pixels = row if bpp == 3 else bytes(b for i, b in enumerate(row) if i % 4 != 3)
        total += sum(1 for i in range(0, len(pixels), 3) if pixels[i:i + 3] == rgb) \
            if rgb in pixels else 0
    return total


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium not installed (apt-get install chromium)")
def test_html_report_draws_its_charts_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(sp.load(busy_pool()), "html", name="busy pool"), encoding="utf-8")
    shot = tmp_path / "report.png"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--virtual-time-budget=5000", "--window-size=1400,2000",
               f"--user-data-dir={tmp_path / 'profile'}"]
    # The page's own script marks the body when every chart was built without an error.
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=60)
    assert 'data-charts="ready"' in dom.stdout, dom.stderr[-2000:]
    subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=60, check=True)
    width, height, bpp, rows = read_png(shot.read_bytes())
    assert (width, height) == (1400, 2000)
    # Only the charts paint these: the phase colours (lanes, per-phase bars, the coloured
    # worker lines) and the pool line. An unstyled or chart-less page has none of them.
    palette = html_report.PALETTE
    assert count_colour(rows, bpp, palette[0]) > 5000, "no 'init' bars (blue)"
    assert count_colour(rows, bpp, palette[1]) > 5000, "no 'task' bars (orange)"
    assert count_colour(rows, bpp, palette[2]) > 5000, "no 'task/parse' bars (red)"
    assert count_colour(rows, bpp, "#111111") > 500, "no pool line"
    distinct = {row[i:i + bpp] for row in rows[::8] for i in range(0, len(row), bpp * 8)}
    assert len(distinct) > 50


# --------------------------------------------------------------------------- the command


def run_command(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="memtrack report")
    add_report_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = run_report_command(parser.parse_args(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_command_prints_the_text_report(tmp_path):
    path = sp.write(tmp_path / "run.mtp", busy_pool())
    code, out, err = run_command([str(path)])
    assert code == 0 and err == ""
    assert out.startswith(f"memtrack report: {path} (recording")


def test_command_writes_the_format_its_output_suffix_names(tmp_path):
    path = sp.write(tmp_path / "run.mtp", busy_pool())
    for suffix, check in ((".json", lambda t: json.loads(t)["schema"] == report.SCHEMA_ID),
                          (".html", lambda t: t.startswith("<!doctype html>")),
                          (".csv", lambda t: t.startswith("time,elapsed,pid")),
                          (".prom", lambda t: "# TYPE memtrack_worker_rss_bytes gauge" in t)):
        out_path = tmp_path / f"report{suffix}"
        code, out, err = run_command([str(path), "-o", str(out_path)])
        assert code == 0 and out == "" and f"wrote {out_path.suffix[1:]}" in err.replace(
            "prometheus", "prom")
        assert check(out_path.read_text(encoding="utf-8"))
    code, out, _ = run_command([str(path), "--format", "json", "-o", str(tmp_path / "x.txt")])
    assert json.loads((tmp_path / "x.txt").read_text())["schema"] == report.SCHEMA_ID


def test_command_sizes_for_another_host_on_request(tmp_path):
    path = sp.write(tmp_path / "run.mtp", sp.pool_recording(workers=4, cpus=4))
    code, out, _ = run_command([str(path), "--format", "json", "--available", "1 GB"])
    found = {i["kind"]: i for i in json.loads(out)["insights"]}
    assert found["worker_count"]["evidence"]["available"] == 10**9


def test_command_reports_an_incomplete_file_with_a_warning(tmp_path):
    path = sp.write(tmp_path / "cut.mtp", busy_pool(), end=False)
    code, out, err = run_command([str(path)])
    assert code == 0 and "is incomplete" in err and "Per worker" in out


@pytest.mark.parametrize("content, words", [(None, "No such file"),
                                            (b"not msgpack at all", "not a memtrack profile")])
def test_command_refuses_a_missing_or_foreign_file(tmp_path, content, words):
    path = tmp_path / "bad.mtp"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_command([str(path)])
    assert code == 2 and out == "" and words in err and err.startswith("memtrack report: error")


def test_memtrack_report_is_a_cli_command(tmp_path, capsys):
    parser = cli.build_parser()
    if "report" not in cli._COMMANDS:
        pytest.skip("memtrack.cli does not register `report` yet")
    path = sp.write(tmp_path / "run.mtp", busy_pool())
    assert parser is not None and cli.main(["report", str(path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("time,elapsed,pid")


def test_a_rise_seen_in_rss_before_pss_is_reported():
    """PSS of a descendant is read every few rounds: the RSS peak can come later."""
    records = [sp.header("recording")]
    for k, rss in enumerate([100 * MiB, 150 * MiB, 400 * MiB, 120 * MiB]):
        records.append({"t": "pool", "time": sp.T0 + k, "live": 2, "rss": rss,
                        "pss": 90 * MiB + (5 * MiB if k == 1 else 0), "peak_rss": rss})
    profile = sp.load(records)
    text = render(profile, "text")
    assert "Pool peak: 95.0 MiB PSS" in text
    assert "RSS sum peaked at 400.0 MiB at 2.0 s" in text
    data = json.loads(render(profile, "json"))
    assert data["pool"]["rss_peak"]["rss"] == 400 * MiB and data["pool"]["peak"]["time"] == 1.0
    assert "Pool RSS sum peak" in render(profile, "html")
