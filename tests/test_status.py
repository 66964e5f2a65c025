"""The status region of memtrack demo and memtrack run: redrawn in place, ends at 100%."""

from __future__ import annotations

import io
import subprocess
import sys

from memtrack.cli._status import StatusRegion
from memtrack.cli.demo import _progress


def test_a_terminal_region_is_redrawn_in_place_without_clearing_the_screen():
    out = io.StringIO()
    region = StatusRegion(out, tty=True)
    region.update("workers: 2\n[#.....] 1/6 files")
    region.update("workers: 2\n[###...] 3/6 files")
    region.close("workers: 2\n[######] 6/6 files")
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\x1b[H" not in text  # no full-screen clear
    # The second and third frames start by going back up over the two lines drawn before.
    frames = text.split("\x1b[2F")
    assert len(frames) == 3 and all(f.startswith("\x1b[J") for f in frames[1:])
    assert frames[-1].endswith("[######] 6/6 files\n")
    region.update("late")  # after close: nothing more is drawn
    assert out.getvalue() == text


def test_a_pipe_gets_plain_lines_and_the_final_one():
    out = io.StringIO()
    region = StatusRegion(out, tty=False, every=3600)
    region.update("frame\n[#.....] 1/6 files")
    region.update("frame\n[###...] 3/6 files")  # within `every`: not written
    region.close("frame\n[######] 6/6 files")
    assert out.getvalue() == "[#.....] 1/6 files\n[######] 6/6 files\n"
    assert "\x1b" not in out.getvalue()


def test_progress_reaches_100_percent():
    assert _progress(6, 6, width=6) == "[######] 6/6 files"
    assert _progress(0, 6, width=6) == "[......] 0/6 files"


def test_the_demo_ends_on_its_last_frame(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    proc = subprocess.run([sys.executable, "-m", "memtrack", "demo", "--workers", "2",
                           "--source", str(src), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: plain lines, the last one at 100%.
    lines = [line for line in proc.stderr.splitlines() if "files" in line]
    assert lines and lines[-1].startswith("[" + "#" * 30 + "] 20/20 files")
    assert "\x1b" not in proc.stderr
