"""One ``run`` end to end, as a library call: check the input, take the output's lock, scan what is
already done, run the rows, write the summary. The CLI only parses flags and maps the outcome to an
exit code; tests and the sweep call this directly.
"""

from __future__ import annotations

import resource
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console

from gptoss_batch import __version__
from gptoss_batch.config import RunConfig, describe
from gptoss_batch.errors import OutputError
from gptoss_batch.inputs import InputOptions, InputSource, open_input
from gptoss_batch.records import Row
from gptoss_batch.report import PROGRESS_REFRESH_S, make_display, print_summary
from gptoss_batch.runner import Runner, RunOutcome, Transport
from gptoss_batch.sink import (
    JsonlSink,
    OutputLock,
    ScanResult,
    StreamSink,
    check_resume,
    latest_results,
    move_aside,
    read_meta,
    scan_output,
    write_json_atomic,
)
from gptoss_batch.stats import SummaryBuilder
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


def _filtered(rows: Iterator[Row], done: set[str], latest: dict[str, bool], counter: list[int]) -> Iterator[Row]:
    """Skip rows already done; counter = [rows skipped, of which ok]."""
    for row in rows:
        if row.id in done:
            counter[0] += 1
            counter[1] += latest[row.id]
            continue
        yield row


async def _ticker(display: Any) -> None:
    while True:
        await anyio.sleep(PROGRESS_REFRESH_S)
        display.tick()


TransportFactory = Callable[[RunConfig], AbstractAsyncContextManager[Transport]]


def default_transport(cfg: RunConfig) -> AiohttpTransport:
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
        lock.acquire()
    try:
        scan = ScanResult()
        meta: dict[str, Any] = {}
        if not to_stdout:
            if cfg.overwrite:
                aside = move_aside(spec.output)
                if aside is not None:
                    console.print(f"--overwrite: previous results kept as {aside}")
            else:
                check_resume(spec.output, fingerprint, force=cfg.force_resume)
                scan = scan_output(spec.output)
                if scan.partial_path:
                    console.print(f"A torn last line ({scan.partial_bytes} bytes) from an interrupted run was "
                                  f"moved to {scan.partial_path}")
                meta = read_meta(spec.output)
        run_number = int(meta.get("runs", 0)) + 1
        done_ids = scan.done_ids(cfg.retry_failed)
        sink: JsonlSink | StreamSink = StreamSink() if to_stdout else JsonlSink(spec.output, fsync=cfg.fsync)
        sink.open()
        if not to_stdout:
            meta.update({"tool": f"gptoss-batch {__version__}", "runs": run_number,
                         "input": {"path": spec.input_path, **(fingerprint or {})},
                         "last_started_at": datetime.now(UTC).isoformat(timespec="seconds")})
            write_json_atomic(f"{spec.output}.meta.json", meta)
        try:
            result = await _execute(cfg, spec, console, source, total, done_ids, sink, run_number, scan,
                                    transport_factory)
        finally:
            sink.close()
        if not to_stdout:
            meta["wall_s_total"] = round(float(meta.get("wall_s_total", 0.0)) + result.summary["wall_s"], 3)
            write_json_atomic(f"{spec.output}.meta.json", meta)
        return result
    finally:
        if lock is not None:
            lock.release()


async def _execute(cfg: RunConfig, spec: JobSpec, console: Console, source: InputSource, total: int | None,
                   done_ids: set[str], sink: JsonlSink | StreamSink, run_number: int,
                   scan: ScanResult, transport_factory: TransportFactory) -> JobResult:
    builder = SummaryBuilder(slos=dict(cfg.slos), total_rows=total)
    skipped = [0, 0]
    rows = _filtered(source.rows(), done_ids, scan.latest, skipped) if done_ids else source.rows()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    cpu0 = _cpu_s()
    async with transport_factory(cfg) as transport:
        runner = Runner(cfg, transport, sink, on_result=builder.add, run_number=run_number)
        runner.state.total = total
        # With a known total, rows already done are known up front too (they are skipped on reading).
        runner.state.skipped = len(done_ids) if total is not None else 0
        display = make_display(cfg.progress, console, runner.state)
        signals: list[int] = []
        display.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_ticker, display)
                tg.start_soon(_watch_signals, runner, display, signals)
                outcome = await runner.run(rows, threaded_reads=spec.input_path == "-")
                tg.cancel_scope.cancel()
        finally:
            display.stop()
    extra: dict[str, Any] = {"started_at": started_at, "skipped": skipped[0], "run": run_number,
                             "output": spec.output, "input": spec.input_path,
                             "stop_reason": outcome.stop_reason,
                             # The client's own CPU for the run loop (read, build, send, parse, write,
                             # progress): what this tool costs per request, beside the server's time.
                             "client_cpu_s": round(_cpu_s() - cpu0, 4)}
    summary = builder.summary(outcome.wall_s, extra)
    summary["config"] = describe(cfg)
    if scan.lines and spec.output != "-":
        # A resumed output: the overall figures count every row once, from its final line.
        summary["overall"] = overall_summary(spec.output, total, dict(cfg.slos))
    sp = summary_path_for(spec)
    if sp is not None:
        write_json_atomic(sp, summary)
    if outcome.input_error is not None:
        raise outcome.input_error
    print_summary(console, summary)
    if outcome.stop_reason:
        console.print(f"[yellow]Stopped early:[/] {outcome.stop_reason}", highlight=False)
    code = _exit_code(outcome, signals, total, builder.failed, builder.ok + skipped[1])
    return JobResult(code, summary, outcome)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def overall_summary(output: str, total: int | None, slos: dict[str, float]) -> dict[str, Any]:
    b = SummaryBuilder(slos=slos, total_rows=total)
    for r in latest_results(output).values():
        b.add(r)
    meta = read_meta(output)
    return b.summary(float(meta.get("wall_s_total", 0.0)), {"runs": meta.get("runs")})


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

