"""memtrack demo, end to end, on a small source tree."""

import os
import shutil
import subprocess
import sys

import memtrack


def test_demo_indexes_a_tree_and_writes_profile_and_report(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.dirname(__import__("json").__file__), src / "json")
    shutil.copytree(os.path.dirname(__import__("email").__file__), src / "email")
    (src / "broken.py").write_text("def f(:\n")  # a file that does not parse
    n_files = len(list(src.rglob("*.py")))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "memtrack", "demo", "--workers", "2",
                           "--source", str(src), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"indexed {n_files} files" in proc.stdout and "1 did not parse" in proc.stdout
    for words in ("Per phase", "Per worker", "Insights", "Worker count for this machine",
                  "report.html"):
        assert words in proc.stdout
    profile = memtrack.load(out / "profile.mtp")
    assert len(profile.workers) == 2
    for w in profile.workers:
        assert {"init", "index", "index/parse", "index/extract"} <= set(w["phases"])
        assert w["state"] == "exited"
    assert sum(w["phases"]["index"]["count"] for w in profile.workers) == n_files
    html = (out / "report.html").read_text()
    assert "<canvas" in html and "index/parse" in html


def test_demo_refuses_a_bad_source(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memtrack", "demo", "--source",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "memtrack", "demo", "--source", str(empty),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no .py files" in proc.stderr
