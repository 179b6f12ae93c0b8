"""Peak RSS as the input grows: the whole `run` pipeline against the tutorial's gather-everything approach.

Both run with a stub transport that answers at once (one trip through the event loop), not against a
server: the point is what the client keeps in memory, and 10,000,000 HTTP requests would take the better
part of an hour here. Ours is tests/helpers/stub_run.py: the real job (validating first pass, the runner,
the JSONL sink, the summary) with ``InstantTransport`` in place of aiohttp, concurrency 256. The tutorial
is benchmarks/peers/tutorial.py with ``--stub`` (its aiohttp session swapped for an instant one),
Semaphore(256). Peak RSS is each process's own ``ru_maxrss`` (``os.wait4``).

Inputs are generated into a temporary directory and deleted after use (10,000,000 rows with explicit ids
is ~760 MB): rows with explicit ids (``{"id", "prompt"}``: the duplicate-id check must remember them) and
without (``{"prompt"}``: ids derived from position and content, nothing to remember). The tutorial needs
~2 KB per row, so it is skipped where its projected peak passes ``TUTORIAL_MAX_RSS_MB``.

Not measured here, and not flat: resuming an existing output (sink.py's scan keeps each id's latest status
in a dict, on the order of 100 bytes per id), and stdin or a pipe with explicit ids (read once, so the
duplicate check cannot spill to disk and keeps its ids in memory).

    python -m benchmarks.memory [--quick] [--rows 10000,1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from benchmarks.measure import loadavg, run_child, stderr_line

FULL_ROWS = (10_000, 1_000_000, 10_000_000)
QUICK_ROWS = (10_000, 50_000)
CONCURRENCY = 256
TUTORIAL_MAX_RSS_MB = 4096
GOAL_RATIO = 1.2
GOAL_MAX_MB = 150.0
TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class Cell:
    client: str  # "ours, explicit ids" | "ours, derived ids" | "tutorial"
    rows: int
    peak_rss_mb: float | None  # None: not run
    cpu_s: float | None
    wall_s: float | None
    note: str = ""


@dataclass(slots=True)
class Report:
    sizes: tuple[int, ...]
    cells: list[Cell] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)


def write_rows(path: Path, rows: int, explicit_ids: bool) -> Path:
    """Stream the rows to disk in blocks (the generator holds one block, never the file)."""
    block = 10_000
    with path.open("wb") as f:
        for start in range(0, rows, block):
            end = min(start + block, rows)
            if explicit_ids:
                f.write(b"".join(b'{"id": "row-%09d", "prompt": "Tell me about the number %d in a few words."}\n'
                                 % (i, i) for i in range(start, end)))
            else:
                f.write(b"".join(b'{"prompt": "Tell me about the number %d in a few words."}\n' % i
                                 for i in range(start, end)))
    return path


def _ours(path: Path, rows: int, label: str, work: Path) -> Cell:
    out = work / "out.jsonl"
    child = run_child([sys.executable, "-m", "tests.helpers.stub_run", str(path), str(out),
                       "--concurrency", str(CONCURRENCY)], timeout_s=TIMEOUT_S).check(label)
    report = orjson.loads(child.stdout)
    for p in work.glob("out.jsonl*"):
        p.unlink()
    if report["ok"] != rows:
        raise RuntimeError(f"{label}: {report['ok']} of {rows} rows ok")
    return Cell(label, rows, child.peak_rss_kib / 1024, child.cpu_s, child.wall_s)


def _tutorial(path: Path, rows: int, work: Path) -> Cell:
    out = work / "tutorial.jsonl"
    child = run_child([sys.executable, "-m", "benchmarks.peers.tutorial", str(path), str(out), "--stub",
                       "--concurrency", str(CONCURRENCY)], timeout_s=TIMEOUT_S).check("tutorial")
    out.unlink(missing_ok=True)
    return Cell("tutorial", rows, child.peak_rss_kib / 1024, child.cpu_s, child.wall_s)


def run(sizes: Sequence[int], progress: Callable[[str], None] | None = None) -> Report:
    report = Report(tuple(sizes), environment={"loadavg_1m_at_start": loadavg()})
    tutorial_mb_per_row: float | None = None
    tutorial_base_mb: float | None = None
    tutorial_base_rows = 0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        for rows in sizes:
            for explicit in (True, False):
                path = write_rows(work / f"rows-{rows}-{'ids' if explicit else 'noids'}.jsonl", rows, explicit)
                label = "ours, explicit ids" if explicit else "ours, derived ids"
                cells = [_ours(path, rows, label, work)]
                if explicit:
                    projected = (None if tutorial_mb_per_row is None or tutorial_base_mb is None
                                 else tutorial_base_mb + tutorial_mb_per_row * rows)
                    if projected is not None and projected > TUTORIAL_MAX_RSS_MB:
                        cells.append(Cell("tutorial", rows, None, None, None,
                                          f"not run: projected {projected / 1024:,.0f} GB from the smaller runs "
                                          f"(over the {TUTORIAL_MAX_RSS_MB / 1024:g} GB bound)"))
                    else:
                        cell = _tutorial(path, rows, work)
                        cells.append(cell)
                        assert cell.peak_rss_mb is not None
                        if tutorial_base_mb is None:
                            tutorial_base_mb, tutorial_base_rows = cell.peak_rss_mb, rows
                        else:
                            tutorial_mb_per_row = ((cell.peak_rss_mb - tutorial_base_mb)
                                                   / max(rows - tutorial_base_rows, 1))
                path.unlink()
                for cell in cells:
                    report.cells.append(cell)
                    if progress is not None:
                        what = (f"{cell.peak_rss_mb:8.1f} MB peak RSS  {cell.cpu_s:7.1f} s CPU"
                                if cell.peak_rss_mb is not None and cell.cpu_s is not None else cell.note)
                        progress(f"memory {rows:>11,} rows  {cell.client:<20} {what}")
    report.environment["loadavg_1m_at_end"] = loadavg()
    return report


def _cell(report: Report, client: str, rows: int) -> Cell | None:
    return next((c for c in report.cells if c.client == client and c.rows == rows), None)


def format_markdown(report: Report) -> str:
    clients = ("ours, explicit ids", "ours, derived ids", "tutorial")
    base_rows = report.sizes[0]
    lines = [
        f"Peak RSS (MB) of the whole process, stub transport (no server), concurrency {CONCURRENCY}; × is the "
        f"ratio to the {base_rows:,}-row run of the same client. Load average "
        f"{report.environment['loadavg_1m_at_start']} → {report.environment.get('loadavg_1m_at_end', '?')}.",
        "",
        "| rows | " + " | ".join(clients) + " |",
        "|---:|" + "---:|" * len(clients),
    ]
    notes: list[str] = []
    for rows in report.sizes:
        cells = []
        for client in clients:
            c = _cell(report, client, rows)
            base = _cell(report, client, base_rows)
            if c is None or c.peak_rss_mb is None:
                cells.append("not run")
                if c is not None and c.note:
                    notes.append(f"{client} at {rows:,} rows: {c.note}")
                continue
            times = (f" (×{c.peak_rss_mb / base.peak_rss_mb:.2f})"
                     if base is not None and base.peak_rss_mb and rows != base_rows else "")
            cells.append(f"{c.peak_rss_mb:,.1f}{times}")
        lines.append(f"| {rows:,} | " + " | ".join(cells) + " |")
    largest = report.sizes[-1]
    for client in clients[:2]:
        c, base = _cell(report, client, largest), _cell(report, client, base_rows)
        if c is None or base is None or c.peak_rss_mb is None or base.peak_rss_mb is None or largest == base_rows:
            continue
        ratio = c.peak_rss_mb / base.peak_rss_mb
        met = ratio <= GOAL_RATIO and c.peak_rss_mb < GOAL_MAX_MB
        lines.append(f"- Goal, {client}: {largest:,} rows within {GOAL_RATIO}× of {base_rows:,} and under "
                     f"{GOAL_MAX_MB:g} MB: {c.peak_rss_mb:,.1f} MB, ×{ratio:.2f} — **{'met' if met else 'missed'}**.")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``."""
    return format_markdown(run(QUICK_ROWS if quick else FULL_ROWS, progress=stderr_line))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(f'{n:,}' for n in QUICK_ROWS)} rows only")
    ap.add_argument("--rows", help="comma-separated row counts (the first is the baseline)")
    args = ap.parse_args(argv)
    sizes = tuple(int(n) for n in args.rows.split(",")) if args.rows else QUICK_ROWS if args.quick else FULL_ROWS
    print(format_markdown(run(sizes, progress=stderr_line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
