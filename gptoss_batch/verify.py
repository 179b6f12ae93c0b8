"""Check a results file against its input (``gptoss-batch verify``) and recompute a summary from a results
file alone (``gptoss-batch summary``, and the ``overall`` block of a resumed run's summary).

The rules, shared by both: a row's **final line** is the latest complete line carrying its id, in file
order (what a resumed run also goes by). A row is **ok** when its final line is ``ok`` and it has exactly
one ``ok`` line in the file; **duplicated** when it has more than one ``ok`` line (whatever its final
line says: exactly-once failed); **errored** when its final line is an error; **missing** when no line
carries its id. ``verify`` passes when every input row is ok. Lines whose id is not in the input are
**extra** (left by ``--force-resume`` after rows changed) and lines that are not result lines are
**corrupt**; both are reported, and neither fails the check by itself, since a row whose only line is
damaged is already counted as missing.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gptoss_batch.errors import OutputError
from gptoss_batch.inputs import InputOptions, open_input
from gptoss_batch.records import Result
from gptoss_batch.sink import read_meta
from gptoss_batch.stats import SummaryBuilder

READ_BLOCK_BYTES = 8 << 20
EXAMPLES = 5

# Per id, one int: the final line's number << 3 | min(ok lines, 2) << 1 | final line is ok. A million ids
# then cost one dict, not a million small objects.
_OK_COUNT_SHIFT = 1
_LINE_SHIFT = 3


def _pack(line_no: int, ok_lines: int, final_ok: bool) -> int:
    return line_no << _LINE_SHIFT | min(ok_lines, 2) << _OK_COUNT_SHIFT | final_ok


def _final_line(v: int) -> int:
    return v >> _LINE_SHIFT


def _ok_lines(v: int) -> int:
    """0, 1, or 2 meaning "two or more"."""
    return v >> _OK_COUNT_SHIFT & 3


def _final_ok(v: int) -> bool:
    return bool(v & 1)


@dataclass
class OutputIndex:
    """One strict pass over a results file: every complete line fully parsed."""

    ids: dict[str, int] = field(default_factory=dict)  # id -> packed (see _pack)
    lines: int = 0
    corrupt_lines: int = 0
    torn_tail_bytes: int = 0


def _complete_lines(path: Path) -> Iterator[bytes]:
    """Every complete line (without its newline) in order; a torn tail is counted, not yielded."""
    with path.open("rb") as f:
        rest = b""
        while block := f.read(READ_BLOCK_BYTES):
            data = rest + block if rest else block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                # Split on newlines only, as the resume scan does (splitlines would also split on \r).
                yield from data[:cut - 1].split(b"\n")
        if rest:
            raise _TornTail(len(rest))


class _TornTail(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _parse(line: bytes) -> tuple[str, bool] | None:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str | int):
        return None
    status = data.get("status")
    if status not in ("ok", "error"):
        return None
    return str(data["id"]), status == "ok"


def index_output(path: str | Path) -> OutputIndex:
    """Index a results file; raises OutputError when it cannot be read."""
    p = Path(path)
    idx = OutputIndex()
    ids = idx.ids
    line_no = -1
    try:
        for line in _complete_lines(p):
            line_no += 1
            if not line.strip():
                continue
            parsed = _parse(line)
            if parsed is None:
                idx.corrupt_lines += 1
                continue
            key, ok = parsed
            prev = ids.get(key)
            oks = (_ok_lines(prev) if prev is not None else 0) + ok
            ids[key] = _pack(line_no, oks, ok)
            idx.lines += 1
    except _TornTail as torn:
        idx.torn_tail_bytes = torn.size
    except OSError as exc:
        raise OutputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return idx


# -- verify ------------------------------------------------------------------------------------------

@dataclass
class Category:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, row_id: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(row_id)


@dataclass
class VerifyReport:
    input_rows: int
    ok: Category
    missing: Category
    duplicated: Category
    errored: Category
    extra: Category
    lines: int
    corrupt_lines: int
    torn_tail_bytes: int
    partial_files: list[str]

    @property
    def passed(self) -> bool:
        return self.ok.count == self.input_rows and self.input_rows > 0

    def to_json(self) -> dict[str, Any]:
        def cat(c: Category) -> dict[str, Any]:
            return {"count": c.count, "examples": c.examples}

        return {"passed": self.passed, "input_rows": self.input_rows, "ok": self.ok.count,
                "missing": cat(self.missing), "duplicated": cat(self.duplicated), "errored": cat(self.errored),
                "extra": cat(self.extra), "lines": self.lines, "corrupt_lines": self.corrupt_lines,
                "torn_tail_bytes": self.torn_tail_bytes, "partial_files": self.partial_files}


def verify(input_path: str, output: str | Path, options: InputOptions | None = None) -> VerifyReport:
    """Compare the input's row ids with the output's lines. Raises InputError/OutputError when either
    file cannot be read. Invalid input rows are kept (with their derived ids), as ``--on-invalid skip``
    would run them, so their error lines count as errored rather than being hidden."""
    out = Path(output)
    if not out.exists():
        raise OutputError(f"{out}: no such results file")
    source = open_input(input_path, replace(options or InputOptions(), on_invalid="skip"))
    idx = index_output(out)
    ids = idx.ids
    partials = sorted(glob.glob(glob.escape(str(out)) + ".partial-*"))
    report = VerifyReport(0, Category(), Category(), Category(), Category(), Category(), idx.lines,
                          idx.corrupt_lines, idx.torn_tail_bytes, partials)
    seen: set[str] = set()
    for row in source.rows():
        report.input_rows += 1
        seen.add(row.id)
        v = ids.get(row.id)
        if v is None:
            report.missing.add(row.id)
        elif _ok_lines(v) > 1:
            report.duplicated.add(row.id)
        elif not _final_ok(v):
            report.errored.add(row.id)
        else:
            report.ok.add(row.id)
    for key in ids:
        if key not in seen:
            report.extra.add(key)
    return report


# -- summary from a results file ---------------------------------------------------------------------

def final_results(path: str | Path, idx: OutputIndex | None = None,
                  only_ids: set[str] | None = None) -> Iterator[Result]:
    """Each id's final line as a Result (in file order), reading the file twice so that memory holds
    one int per id rather than every result."""
    p = Path(path)
    idx = idx if idx is not None else index_output(p)
    wanted = {_final_line(v) for k, v in idx.ids.items() if only_ids is None or k in only_ids}
    line_no = -1
    try:
        for line in _complete_lines(p):
            line_no += 1
            if line_no in wanted:
                yield Result.from_line(line)
    except _TornTail:
        return


def summarize_output(path: str | Path, *, total_rows: int | None = None, slos: Mapping[str, float] | None = None,
                     only_ids: set[str] | None = None, wall_s: float | None = None) -> dict[str, Any]:
    """The summary of a results file: every row once, from its final line.

    ``total_rows``, the number of runs and the wall time come from the meta sidecar when not given
    (the wall time there sums the runs that ended normally or by a signal, not those killed outright).
    ``summary['runs']`` counts the rows by the run that wrote their final line, and ``runs_total`` is how
    many runs the output took.
    """
    meta = read_meta(path)
    if total_rows is None:
        rows = (meta.get("input") or {}).get("rows")
        total_rows = rows if isinstance(rows, int) else None
    if wall_s is None:
        wall_s = float(meta.get("wall_s_total", 0.0))
    idx = index_output(path)
    b = SummaryBuilder(slos=dict(slos or {}), total_rows=total_rows)
    for r in final_results(path, idx, only_ids):
        b.add(r)
    extra: dict[str, Any] = {"output": str(path), "runs_total": meta.get("runs"), "lines": idx.lines,
                             "corrupt_lines": idx.corrupt_lines}
    return b.summary(wall_s, extra)


def format_verify(report: VerifyReport, output: str | Path) -> Group:
    """The verify report as a table and a verdict line; pure."""
    verdict = (Text("PASS: every row has exactly one final ok line", style="bold green") if report.passed
               else Text("FAIL: not every row has exactly one final ok line", style="bold red"))
    t = Table(title=f"verify {output}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("rows", justify="right")
    t.add_column("examples")

    def row(label: str, c: Category, bad: bool) -> None:
        style = "red" if bad and c.count else ""
        t.add_row(label, Text(str(c.count), style=style), ", ".join(c.examples) if bad else "")

    t.add_row("input rows", str(report.input_rows), "")
    row("ok", report.ok, False)
    row("missing", report.missing, True)
    row("duplicated", report.duplicated, True)
    row("errored", report.errored, True)
    row("extra (not in input)", report.extra, True)
    t.add_row("result lines", str(report.lines), "")
    if report.corrupt_lines:
        t.add_row("corrupt lines", Text(str(report.corrupt_lines), style="yellow"), "")
    if report.torn_tail_bytes:
        t.add_row("torn last line", Text(f"{report.torn_tail_bytes} bytes", style="yellow"),
                  "set aside by the next run")
    if report.partial_files:
        t.add_row("torn lines set aside", str(len(report.partial_files)), ", ".join(report.partial_files[:3]))
    return Group(t, verdict)
