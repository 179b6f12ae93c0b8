"""One ``run`` end to end, as a library call: check the input, take the output's lock, scan what is
already done, run the rows, write the summary. The CLI only parses flags and maps the outcome to an
exit code; tests and the sweep call this directly.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from rich.console import Console
from rich.markup import escape

from gptoss_batch import __version__
from gptoss_batch.adaptive import AdaptiveDriver, Pool
from gptoss_batch.config import RunConfig, describe
from gptoss_batch.errors import OutputError
from gptoss_batch.inputs import InputOptions, InputSource, open_input
from gptoss_batch.records import Row
from gptoss_batch.report import make_display, print_summary, tick_forever
from gptoss_batch.runner import Runner, RunOutcome, Transport
from gptoss_batch.sink import (
    JsonlSink,
    OrderedSink,
    OutputLock,
    ScanResult,
    StreamSink,
    check_resume,
    meta_path,
    move_aside,
    ordered_window,
    read_meta,
    scan_output,
    write_json_atomic,
)
from gptoss_batch.stats import SummaryBuilder
from gptoss_batch.verify import summarize_output

if TYPE_CHECKING:
    from gptoss_batch.transport import AiohttpTransport

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 74  # EX_IOERR: the output could not be written (disk full, I/O error)
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the output; try again later
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass(frozen=True)
class JobSpec:
    input_path: str
    output: str
    input_options: InputOptions = field(default_factory=InputOptions)
    summary_path: str | None = None


@dataclass
class JobResult:
    exit_code: int
    summary: dict[str, Any]
    outcome: RunOutcome | None = None


def summary_path_for(spec: JobSpec) -> Path | None:
    if spec.summary_path:
        return Path(spec.summary_path)
    if spec.output == "-":
        return None
    return Path(f"{spec.output}.summary.json")


def _filtered(rows: Iterator[Row], scan: ScanResult, retry_failed: bool, counter: list[int]) -> Iterator[Row]:
    """Skip rows already done (latest line ok, or an error kept by --no-retry-failed);
    counter = [rows skipped, of which ok]."""
    for row in rows:
        if scan.is_done(row.id, retry_failed):
            counter[0] += 1
            counter[1] += scan.latest[row.id]
            continue
        yield row


TransportFactory = Callable[[RunConfig], AbstractAsyncContextManager[Transport]]


def default_transport(cfg: RunConfig) -> AiohttpTransport:
    # Imported here: aiohttp is the largest import of the CLI, and `--help` or a bad flag never needs it.
    from gptoss_batch.transport import AiohttpTransport

    return AiohttpTransport(cfg.base_url, api_key=cfg.api_key, headers=cfg.headers, timeouts=cfg.timeouts,
                            limit=cfg.worker_count)


async def run_job(cfg: RunConfig, spec: JobSpec, console: Console,
                  transport_factory: TransportFactory = default_transport) -> JobResult:
    """Run a job; raises ConfigError/InputError/OutputError/LockedError/ResumeMismatchError for run-level
    problems (the CLI maps them to exit codes) and returns everything else as a JobResult."""
    source: InputSource = open_input(spec.input_path, spec.input_options)
    total = source.check() if spec.input_path != "-" else None  # validates the whole file first
    fingerprint = source.fingerprint()
    to_stdout = spec.output == "-"

    lock = None if to_stdout else OutputLock(spec.output)
    if lock is not None:
        _make_parent(spec.output)  # the lock file lives beside the output
        lock.acquire()
    try:
        scan = ScanResult()
        meta: dict[str, Any] | None = None if to_stdout else {}
        forced = False
        if meta is not None:
            if cfg.overwrite:
                aside = move_aside(spec.output)
                if aside is not None:
                    console.print(f"--overwrite: previous results kept as {aside}")
            else:
                forced = check_resume(spec.output, fingerprint, force=cfg.force_resume, input_path=spec.input_path)
                scan = scan_output(spec.output)
                if scan.partial_path:
                    console.print(f"A torn last line ({scan.partial_bytes} bytes) from an interrupted run was "
                                  f"moved to {scan.partial_path}")
                if scan.bad_lines:
                    console.print(f"[yellow]warning:[/] {scan.bad_lines} lines of {escape(spec.output)} are not result "
                                  "lines; they are kept and ignored")
                if forced:
                    console.print("[yellow]--force-resume:[/] the input differs from the one this output was "
                                  "written from; rows whose id already has a final ok line are kept, the rest "
                                  "run, and the output now belongs to this input")
                if scan.lines or scan.bad_lines:
                    meta = read_meta(spec.output)  # with no results yet, an old sidecar has nothing to say
        run_number = int((meta or {}).get("runs", 0)) + 1
        inner: JsonlSink | StreamSink = StreamSink() if to_stdout else JsonlSink(spec.output, fsync=cfg.fsync)
        sink: JsonlSink | StreamSink | OrderedSink = (
            OrderedSink(inner, ordered_window(cfg.worker_count)) if cfg.ordered else inner)
        sink.open()
        try:
            if meta is not None:
                meta.update({"tool": f"gptoss-batch {__version__}", "runs": run_number,
                             "input": {"path": spec.input_path, **(fingerprint or {})},
                             "last_started_at": datetime.now(UTC).isoformat(timespec="seconds")})
                write_json_atomic(meta_path(spec.output), meta)
            result = await _execute(cfg, spec, console, source, total, sink, run_number, scan, meta, forced,
                                    transport_factory)
        finally:
            with contextlib.suppress(OutputError):
                sink.close()  # already closed by _execute unless it failed
        return result
    finally:
        if lock is not None:
            lock.release()


def _make_parent(output: str) -> None:
    parent = Path(output).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output's directory: {exc.strerror or exc}") from None


async def _execute(cfg: RunConfig, spec: JobSpec, console: Console, source: InputSource, total: int | None,
                   sink: JsonlSink | StreamSink | OrderedSink, run_number: int, scan: ScanResult,
                   meta: dict[str, Any] | None, forced: bool, transport_factory: TransportFactory) -> JobResult:
    builder = SummaryBuilder(slos=dict(cfg.slos), total_rows=total)
    skipped = [0, 0]
    rows = _filtered(source.rows(), scan, cfg.retry_failed, skipped) if scan.latest else source.rows()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    # Made before the clock starts: building it imports aiohttp, start-up rather than the run loop.
    transport_cm = transport_factory(cfg)
    cpu0 = _cpu_s()
    signals: list[int] = []
    async with transport_cm as transport:
        runner = Runner(cfg, transport, sink, on_result=builder.add, run_number=run_number)
        if isinstance(sink, OrderedSink):
            runner.admit = sink.admit
        runner.state.total = total
        if total is not None:
            # With a known total, rows already done are known up front too (they are skipped on reading).
            runner.state.skipped = min(total, scan.done_count(cfg.retry_failed))
        # --concurrency auto: the controller's driver takes over the runner's limit from its first request.
        driver = AdaptiveDriver(cfg, runner, transport if isinstance(transport, Pool) else None) \
            if cfg.auto_concurrency else None
        if driver is not None:
            driver.attach()
        display = make_display(cfg.progress, console, runner.state)
        async with anyio.create_task_group() as tg:
            # Signals are watched until the summary is on disk: a Ctrl-C during the drain or while
            # finishing up still ends with a closed output, a summary and exit 130/143.
            tg.start_soon(_watch_signals, runner, display, signals)
            display.start()
            try:
                async with anyio.create_task_group() as ticking:
                    ticking.start_soon(tick_forever, display)
                    if driver is not None:
                        ticking.start_soon(driver.run)
                    outcome = await runner.run(rows, threaded_reads=spec.input_path == "-")
                    ticking.cancel_scope.cancel()
            finally:
                display.stop()
            summary = _finish(cfg, spec, console, sink, outcome, builder, meta, forced, source, total, scan,
                              {"started_at": started_at, "skipped": skipped[0], "run": run_number,
                               "output": spec.output, "input": spec.input_path,
                               "stop_reason": outcome.stop_reason,
                               # The client's own CPU for the run loop (read, build, send, parse, write,
                               # progress): what this tool costs per request, beside the server's time.
                               "client_cpu_s": round(_cpu_s() - cpu0, 4),
                               **({"adaptive": driver.summary()} if driver is not None else {})})
            tg.cancel_scope.cancel()
    if outcome.input_error is not None:
        raise outcome.input_error
    print_summary(console, summary)
    if outcome.stop_reason:
        console.print(f"[yellow]Stopped early:[/] {escape(outcome.stop_reason)}", highlight=False)
    code = _exit_code(outcome, signals, total, builder.failed, builder.ok + skipped[1])
    return JobResult(code, summary, outcome)


def _finish(cfg: RunConfig, spec: JobSpec, console: Console, sink: JsonlSink | StreamSink | OrderedSink,
            outcome: RunOutcome, builder: SummaryBuilder, meta: dict[str, Any] | None, forced: bool,
            source: InputSource, total: int | None, scan: ScanResult, extra: dict[str, Any]) -> dict[str, Any]:
    """After the run loop: close the output (--ordered writes what it still holds), then the sidecar and
    the summary. A failure here is an output error like any other (exit 74), never a traceback."""

    def failed(exc: OutputError) -> None:
        if outcome.output_error is None:
            outcome.output_error = exc
        else:
            console.print(f"[yellow]warning:[/] {escape(str(exc))}", highlight=False)

    try:
        sink.close()
    except OutputError as exc:
        failed(exc)
    summary = builder.summary(outcome.wall_s, extra)
    summary["config"] = describe(cfg)
    if meta is not None:
        meta["wall_s_total"] = round(float(meta.get("wall_s_total", 0.0)) + outcome.wall_s, 3)
        try:
            write_json_atomic(meta_path(spec.output), meta)
            if scan.lines:
                # A resumed output: the overall figures count every row once, from its final line.
                only = {row.id for row in source.rows()} if forced else None
                summary["overall"] = summarize_output(spec.output, total_rows=total, slos=cfg.slos,
                                                      only_ids=only, wall_s=meta["wall_s_total"])
        except OutputError as exc:
            failed(exc)
    sp = summary_path_for(spec)
    if sp is not None:
        try:
            write_json_atomic(sp, summary)
        except OutputError as exc:
            failed(exc)
    return summary


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _exit_code(outcome: RunOutcome, signals: list[int], total: int | None, failed: int, ok_total: int) -> int:
    if outcome.output_error is not None:
        return EXIT_OUTPUT
    if signals:
        return EXIT_SIGTERM if signals[0] == signal.SIGTERM else EXIT_SIGINT
    if outcome.stop_reason or failed:
        return EXIT_FAILED
    if total is not None and ok_total < total:
        return EXIT_FAILED  # e.g. --no-retry-failed kept earlier failures
    return EXIT_OK


async def _watch_signals(runner: Runner, display: Any, seen: list[int]) -> None:
    """First SIGINT/SIGTERM: drain (stop reading, let in-flight rows finish). Second: stop at once."""
    if sys.platform == "win32":  # pragma: no cover
        return
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async for signum in receiver:
            seen.append(signum)
            name = signal.Signals(signum).name
            if len(seen) == 1:
                display.message(f"{name}: no new rows; finishing {runner.state.in_flight} in-flight requests "
                                f"(up to {runner.cfg.drain_timeout_s:g}s). Press Ctrl-C again to stop now.")
                runner.stop(f"interrupted by {name}", interrupted=True)
            else:
                display.message(f"{name} again: stopping now; results written so far are kept.")
                runner.abort()


def output_error_message(exc: OutputError) -> str:
    return f"{exc}. Everything written so far is kept; free space and rerun the same command to resume."

