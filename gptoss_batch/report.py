"""What the user sees: progress displays (rich bars on a terminal, plain lines in cron/CI) and the
summary table. ``format_*`` are pure and return renderables or text; ``print_*`` write to a Console.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from gptoss_batch.runner import RunState

PROGRESS_REFRESH_S = 0.25
PLAIN_INTERVAL_S = 10.0


async def tick_forever(display: Display) -> None:
    """Refresh ``display`` every PROGRESS_REFRESH_S until cancelled."""
    while True:
        await anyio.sleep(PROGRESS_REFRESH_S)
        display.tick()


def fmt_s(x: float | None) -> str:
    """Seconds for people: "840 ms", "2.31 s", "-" for none."""
    if x is None:
        return "-"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.2f} s"


def _eta(state: RunState, elapsed: float) -> str:
    if state.total is None or not state.done or elapsed <= 0:
        return "?"
    left = max(0, state.total - state.skipped - state.done)
    secs = left / (state.done / elapsed)
    m, s = divmod(int(secs), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_status(state: RunState, now: float) -> str:
    """One plain progress line; pure."""
    elapsed = max(now - state.started_at, 1e-9)
    total = state.total - state.skipped if state.total is not None else None
    pct = f" ({state.done / total:.1%})" if total else ""
    of = f"/{total}" if total is not None else ""
    limit = f" limit={state.limit}" + (f" ({state.limit_reason})" if state.limit_reason else "")
    return (f"{state.done}{of} rows{pct} ok={state.ok} failed={state.failed} in_flight={state.in_flight}{limit} "
            f"{state.done / elapsed:.2f} req/s {state.output_tokens / elapsed:.0f} tok/s "
            f"retries={state.retries} eta={_eta(state, elapsed)}")


class _StateColumn(ProgressColumn):
    """Counters read straight from the RunState when rich refreshes (on its timer, not per row)."""

    def __init__(self, state: RunState) -> None:
        super().__init__()
        self.state = state

    def render(self, task: Task) -> Text:
        st = self.state
        elapsed = max(time.perf_counter() - st.started_at, 1e-9)
        limit = f"limit {st.limit}" + (f" ({st.limit_reason})" if st.limit_reason else "")
        return Text.assemble(
            (f"ok {st.ok}", "green"), " ", (f"failed {st.failed}", "red" if st.failed else "dim"),
            f"  in flight {st.in_flight}  {limit}  {st.done / elapsed:.2f} req/s  "
            f"{st.output_tokens / elapsed:.0f} tok/s  ETA {_eta(st, elapsed)}")


class Display(Protocol):
    def start(self) -> None: ...
    def tick(self) -> None: ...
    def stop(self) -> None: ...
    def message(self, text: str) -> None:
        """Plain text above the progress display (never parsed as rich markup)."""


class RichDisplay:
    def __init__(self, console: Console, state: RunState, description: str = "rows") -> None:
        self.state = state
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.completed}/{task.total}"), _StateColumn(state),
            console=console, refresh_per_second=1 / PROGRESS_REFRESH_S, transient=False)
        self.task = self.progress.add_task(description, total=None)

    def start(self) -> None:
        self.progress.start()

    def tick(self) -> None:
        st = self.state
        total = st.total - st.skipped if st.total is not None else None
        self.progress.update(self.task, completed=st.done, total=total)

    def stop(self) -> None:
        self.tick()
        self.progress.stop()

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False)


class PlainDisplay:
    """Periodic one-line status for logs: every ``interval_s`` and once at the end."""

    def __init__(self, console: Console, state: RunState, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.console = console
        self.state = state
        self.interval_s = interval_s
        self._last = 0.0

    def start(self) -> None:
        self._last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {format_status(self.state, now)}",
                           markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self._line(time.perf_counter())

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)


class NoDisplay:
    def __init__(self, console: Console) -> None:
        self.console = console

    def start(self) -> None:
        return None

    def tick(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)


def make_display(mode: str, console: Console, state: RunState, description: str = "rows") -> Display:
    """``description`` labels the rich bar."""
    if mode == "auto":
        mode = "rich" if console.is_terminal else "plain"
    if mode == "rich":
        return RichDisplay(console, state, description)
    if mode == "plain":
        return PlainDisplay(console, state)
    return NoDisplay(console)


def format_summary(summary: Mapping[str, Any], title: str = "Run summary") -> Table:
    """The end-of-run table; pure."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value")
    rows = summary["rows"]
    total = rows.get("total")
    t.add_row("rows", f"{rows['ok']} ok, {rows['failed']} failed" + (f" of {total}" if total is not None else ""))
    if summary.get("skipped"):
        t.add_row("skipped (already done)", str(summary["skipped"]))
    t.add_row("wall time", fmt_s(summary["wall_s"]))
    t.add_row("throughput", f"{summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s")
    for key, label in (("latency_s", "latency"), ("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL")):
        d = summary.get(key)
        if d and d.get("mean") is not None:
            t.add_row(label, "  ".join(f"{k} {fmt_s(d[k])}" for k in ("mean", "p50", "p90", "p95", "p99")))
    if summary.get("goodput"):
        g = summary["goodput"]
        t.add_row("goodput", f"{g['rows']} rows met the SLOs ({(g['share'] or 0):.1%}), {g['per_s']:.2f}/s")
    if summary.get("errors_by_kind"):
        t.add_row("errors", ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors_by_kind"].items())))
    if summary.get("retries_by_cause"):
        t.add_row("retries", ", ".join(f"{k}: {v}" for k, v in sorted(summary["retries_by_cause"].items())))
    if summary.get("concurrency"):
        t.add_row("concurrency", f"{summary['concurrency']['most_common']} (max {summary['concurrency']['max']})")
    if summary.get("stop_reason"):
        t.add_row("stopped", Text(str(summary["stop_reason"]), style="yellow"))
    return t


def print_summary(console: Console, summary: Mapping[str, Any], title: str = "Run summary") -> None:
    console.print(format_summary(summary, title))
