"""``memtrack demo``: a real worker-pool analyzer, measured from end to end.

It indexes a source tree (by default the Python standard library that runs it) the way a
code indexer does: a ProcessPoolExecutor whose workers each load a project manifest
(``init``), then per batch of files read and ``ast``-parse them (``parse``) and extract
symbols and calls (``extract``). While it runs you see a progress bar and the live worker
table; at the end, the per-phase and per-worker summary, the insights, the worker count
this machine affords, and a profile plus an HTML report written to ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import os
import shutil
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from .._phase import phase
from .._sizes import format_size
from ..limits import cpu_limit
from ..pool.executor import default_context
from ..pool.table import WorkerTable, init_worker
from ..profile.recording import record
from ..sizing import plan_workers
from ._status import StatusRegion
from .top import render_frame

BATCH = 16

# --------------------------------------------------------------------------------------
# The analyzer (runs in the workers)

_manifest: dict[str, dict[str, Any]] | None = None


def _find_sources(root: str) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _load_manifest(root: str) -> None:
    """The per-worker state a real indexer loads: every file with its module name, size and
    a line index. Each worker holds its own copy: the duplicated-state insight finds it."""
    global _manifest
    manifest = {}
    for path in _find_sources(root):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        rel = os.path.relpath(path, root)
        manifest[path] = {
            "module": rel[:-3].replace(os.sep, "."),
            "size": len(data),
            "line_offsets": list(itertools.accumulate(len(line) + 1 for line in data.split(b"\n"))),
        }
    _manifest = manifest


def worker_init(table_name: str, root: str) -> None:
    init_worker(table_name)
    with phase("init"):
        _load_manifest(root)


class _Extractor(ast.NodeVisitor):
    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.calls: Counter[str] = Counter()
        self.imports: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.symbols.append(node.name)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.symbols.append(node.name)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.update(a.name for a in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module:
            self.imports.add(node.module)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name:
            self.calls[name] += 1
        self.generic_visit(node)


def analyze_batch(paths: list[str]) -> dict[str, Any]:
    """Parse and index one batch of files; one outermost phase per file (one task each)."""
    symbols = 0
    calls: Counter[str] = Counter()
    failed = 0
    for path in paths:
        with phase("index"):
            with phase("parse"):
                try:
                    with open(path, "rb") as f:
                        tree = ast.parse(f.read(), filename=path)
                except (SyntaxError, ValueError, OSError):
                    failed += 1
                    continue
            with phase("extract"):
                ex = _Extractor()
                ex.visit(tree)
                symbols += len(ex.symbols)
                calls.update(ex.calls)
                del tree
    return {"files": len(paths), "failed": failed, "symbols": symbols,
            "calls": dict(calls.most_common(20)), "pid": os.getpid()}


# --------------------------------------------------------------------------------------
# The parent: pool, live view, report


def _progress(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files"


def _frame(table: WorkerTable, counts: dict[str, int], tty: bool) -> str:
    bar = _progress(counts["done"], counts["total"])
    if tty:
        return render_frame(table, width=shutil.get_terminal_size().columns) + "\n\n" + bar
    t = table.totals()
    return f"{bar}  pool pss {format_size(t.pss)}, {t.live} workers"


def _live_view(table: WorkerTable, counts: dict[str, int], stop: threading.Event,
               region: StatusRegion) -> None:
    while not stop.wait(0.5):
        region.update(_frame(table, counts, region.tty))


def run_demo(workers: int | None = None, source: str | None = None, out: str = "memtrack-demo",
             *, quiet: bool = False) -> dict[str, Any]:
    """Run the demo analyzer; returns what it found and where it wrote the files."""
    source = source or os.path.dirname(os.__file__)
    if not os.path.isdir(source):
        raise ValueError(f"--source {source!r} is not a directory")
    files = _find_sources(source)
    if not files:
        raise ValueError(f"--source {source!r} holds no .py files")
    if workers is None:
        workers = cpu_limit()
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    os.makedirs(out, exist_ok=True)
    profile_path = os.path.join(out, "profile.mtp")
    html_path = os.path.join(out, "report.html")
    batches = [files[i:i + BATCH] for i in range(0, len(files), BATCH)]
    counts = {"done": 0, "total": len(files)}
    totals: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    started = time.monotonic()
    with WorkerTable(capacity=max(8, workers * 2), heartbeat=0.05) as table:
        with record(profile_path, table=table, command=["memtrack", "demo"]):
            stop = threading.Event()
            view = None
            region = StatusRegion(sys.stderr)
            if not quiet:
                view = threading.Thread(target=_live_view, args=(table, counts, stop, region),
                                        daemon=True)
                view.start()
            try:
                with phase("main"):
                    # The recording's sampler and the live view are threads: fork() from
                    # here is unsafe (Python 3.12+ warns); a forkserver's children are not.
                    with ProcessPoolExecutor(workers, mp_context=default_context(),
                                             initializer=worker_init,
                                             initargs=(table.name, source)) as ex:
                        futures = [ex.submit(analyze_batch, b) for b in batches]
                        for fut in as_completed(futures):
                            r = fut.result()
                            counts["done"] += r["files"]
                            totals.update(files=r["files"], failed=r["failed"],
                                          symbols=r["symbols"])
                            calls.update(r["calls"])
            finally:
                stop.set()
                if view is not None:
                    view.join()
                    # The last frame shows where it ended: every file, 100%, when it did.
                    region.close(_frame(table, counts, region.tty))
            plan = plan_workers(table=table)
    elapsed = time.monotonic() - started

    from ..profile import load
    from ..report import render

    profile = load(profile_path)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render(profile, "html"))
    if not quiet:
        print(f"memtrack demo: indexed {totals['files']} files of {source} "
              f"({totals['symbols']} symbols, {sum(calls.values())} calls; "
              f"{totals['failed']} did not parse) with {workers} workers in {elapsed:.1f} s\n")
        print(render(profile, "text"))
        print("\nWorker count for this machine (memtrack.plan_workers, from the measured pool):")
        print("  " + plan.explain().replace("\n", "\n  "))
        print(f"\nprofile: {profile_path}\nreport:  {html_path}  (open it in a browser)")
    return {"files": totals["files"], "symbols": totals["symbols"], "failed": totals["failed"],
            "workers": workers, "elapsed": elapsed, "profile": profile_path, "html": html_path,
            "plan": plan, "calls": calls}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None,
                        help="pool size (default: the CPUs this process may use)")
    parser.add_argument("--source", default=None,
                        help="tree of .py files to index (default: the standard library)")
    parser.add_argument("--out", default="memtrack-demo",
                        help="folder for profile.mtp and report.html (default: memtrack-demo)")


def run_demo_command(args: argparse.Namespace) -> int:
    run_demo(args.workers, args.source, args.out)
    return 0

