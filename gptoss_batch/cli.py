"""The ``gptoss-batch`` command line: parse flags, build a config, call the library, map errors to exit
codes. No logic of its own."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from gptoss_batch.config import build_config, read_config_file
from gptoss_batch.errors import ConfigError, InputError, LockedError, OutputError, ResumeMismatchError
from gptoss_batch.inputs import InputOptions
from gptoss_batch.job import (
    EXIT_LOCKED,
    EXIT_OUTPUT,
    EXIT_SIGINT,
    EXIT_USAGE,
    JobSpec,
    output_error_message,
    run_job,
)
from gptoss_batch.sink import ORDERED_WINDOW_MIN_ROWS, ORDERED_WINDOW_PER_WORKER

app = typer.Typer(
    name="gptoss-batch",
    help="Run files of prompts through OpenAI-compatible LLM servers (vLLM, llama.cpp, SGLang, TGI, Ollama, "
         "OpenAI): bounded concurrency, retries, crash-safe resumable JSONL results and a latency summary.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONN = "Connection"
REQ = "Request"
LOAD = "Concurrency and limits"
OUT = "Output and resume"
INP = "Input"


# Connection options shared word for word by run, sweep and chat.
BaseUrlOption = Annotated[str | None, typer.Option(
    "--base-url", help="Server base URL ending in /v1 \\[env: OPENAI_BASE_URL; default http://127.0.0.1:8000/v1].",
    rich_help_panel=CONN, show_default=False)]
ApiKeyOption = Annotated[str | None, typer.Option(
    "--api-key", help="API key \\[env: OPENAI_API_KEY]. Never printed or logged.", rich_help_panel=CONN,
    show_default=False)]
HeaderOption = Annotated[list[str] | None, typer.Option(
    "--header", help="Extra HTTP header 'Name: value' (repeatable).", rich_help_panel=CONN)]
ConnectTimeoutOption = Annotated[float | None, typer.Option(
    "--connect-timeout", help="Seconds to connect (default 10).", rich_help_panel=CONN)]

# Options shared word for word by run and sweep.
MaxTokensOption = Annotated[int | None, typer.Option(
    help="Default max_tokens (rows may override).", rich_help_panel=REQ)]
TemperatureOption = Annotated[float | None, typer.Option(help="Default temperature.", rich_help_panel=REQ)]
TopPOption = Annotated[float | None, typer.Option(help="Default top_p.", rich_help_panel=REQ)]
BackoffInitialOption = Annotated[float | None, typer.Option(
    help="First backoff cap in seconds (default 0.5).", rich_help_panel=LOAD)]
BackoffMaxOption = Annotated[float | None, typer.Option(
    help="Largest backoff in seconds (default 30).", rich_help_panel=LOAD)]
MaxRetryAfterOption = Annotated[float | None, typer.Option(
    help="Cap on a server's Retry-After hint, seconds (default 120).", rich_help_panel=LOAD)]
RequestTimeoutOption = Annotated[float | None, typer.Option(
    help="Seconds for a whole attempt (default 300).", rich_help_panel=CONN)]
TemplateOption = Annotated[str | None, typer.Option(
    help="CSV prompt template with {column} placeholders.", rich_help_panel=INP)]
IdColumnOption = Annotated[str | None, typer.Option(help="CSV column holding each row's id.", rich_help_panel=INP)]

# Shared word for word by run and chat.
ParamOption = Annotated[list[str] | None, typer.Option(
    "--param", help="Extra body field key=value (value parsed as JSON when it can be), e.g. --param seed=7 "
    "(repeatable).", rich_help_panel=REQ)]


def err_console() -> Console:
    return Console(stderr=True)


def fail(console: Console, message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# CPython collects its youngest generation every 700 net allocations; a run keeps hundreds of requests'
# objects alive, so that meant hundreds of collections per 20,000 requests: 15-20% of the run loop's CPU.
GC_GEN0_THRESHOLD = 10_000


def run_async(fn: Any, *args: Any) -> Any:
    import gc

    import anyio

    # What start-up built (modules, typer, rich) lives until exit: freeze it out of every collection, and
    # collect young objects less often. Memory stays flat (at most ~10,000 young objects wait for a
    # collection); the collector's CPU in a 20,000-request run drops from ~0.45 s to ~0.03 s.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD)
    try:
        import uvloop  # noqa: F401

        backend_options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        backend_options = {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=backend_options)


def load_run_config(config: Path | None, flags: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    file_values = read_config_file(config) if config else {}
    cfg = build_config(flags, config_file=file_values, config_path=str(config) if config else None)
    return cfg, file_values


def _input_options(file_values: Mapping[str, Any], input_format: str, prompt_column: str | None,
                   template: str | None, id_column: str | None, on_invalid: str = "error") -> InputOptions:
    """The input flags, with the config file's values where a flag was not given. InputOptions rejects an
    unknown format or on_invalid (ConfigError)."""
    return InputOptions(
        format=file_values.get("input_format", input_format) if input_format == "auto" else input_format,  # type: ignore[arg-type]
        prompt_column=prompt_column or file_values.get("prompt_column"),
        template=template or file_values.get("template"),
        id_column=id_column or file_values.get("id_column"),
        on_invalid=on_invalid,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _exit_on_run_errors(console: Console) -> Iterator[None]:
    """run's and sweep's errors as exit codes: LockedError before OutputError, its base class."""
    try:
        yield
    except (ConfigError, InputError, ResumeMismatchError) as exc:
        fail(console, str(exc), EXIT_USAGE)
    except LockedError as exc:
        fail(console, str(exc), EXIT_LOCKED)
    except OutputError as exc:
        fail(console, output_error_message(exc), EXIT_OUTPUT)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_SIGINT) from None


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="Prompt file: JSONL, OpenAI Batch JSONL or CSV; '-' reads stdin.",
                                         show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Results JSONL, appended as rows finish. "
                      "An existing file is resumed (rows already ok are skipped). '-' writes to stdout.",
                      rich_help_panel=OUT)],
    base_url: BaseUrlOption = None,
    model: Annotated[str | None, typer.Option(help="Model name sent with every request (rows may override).",
                     rich_help_panel=REQ)] = None,
    api_key: ApiKeyOption = None,
    header: HeaderOption = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with the same keys as these "
                      "flags (flags win). Examples in configs/.", show_default=False)] = None,
    route: Annotated[str | None, typer.Option(help="chat or completions. Default: the row's own route (Batch "
                     "API url), else chat; a prompt row on chat becomes one user message.",
                     rich_help_panel=REQ)] = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    param: ParamOption = None,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Stream responses (SSE) to "
                      "measure TTFT, TPOT and inter-token latency.", rich_help_panel=REQ)] = None,
    concurrency: Annotated[str | None, typer.Option("--concurrency", "-n", help="Requests in flight at most "
                           "(default 8), or 'auto' to tune it from latency, 429s and the server's /metrics.",
                           rich_help_panel=LOAD)] = None,
    concurrency_from: Annotated[Path | None, typer.Option(help="Take --concurrency from a sweep: the knee "
                                "recorded in SWEEP.json (or a --report-dir) by gptoss-batch sweep.",
                                rich_help_panel=LOAD, metavar="SWEEP.json", show_default=False)] = None,
    min_concurrency: Annotated[int | None, typer.Option(help="Lower bound for --concurrency auto.",
                               rich_help_panel=LOAD)] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Upper bound for --concurrency auto (default 256).",
                               rich_help_panel=LOAD)] = None,
    metrics_url: Annotated[str | None, typer.Option(help="--concurrency auto: the server's Prometheus page, read "
                           "for its queue and KV-cache gauges (vLLM, SGLang, TGI, llama.cpp names; default: the "
                           "base URL without /v1, plus /metrics).", rich_help_panel=LOAD, show_default=False)] = None,
    server_metrics: Annotated[bool | None, typer.Option("--server-metrics/--no-server-metrics", help="--concurrency "
                              "auto: use the server's /metrics (default on; skipped when it has none). Off, "
                              "latency and errors decide alone.", rich_help_panel=LOAD)] = None,
    log_controller: Annotated[str | None, typer.Option(help="--concurrency auto: append the controller's "
                              "decisions to this JSONL file (time, limit, event, reason, the window measured), "
                              "for plotting.", rich_help_panel=LOAD, metavar="FILE", show_default=False)] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute at most.", rich_help_panel=LOAD)] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute at most (estimated before, corrected "
                   "with usage after).", rich_help_panel=LOAD)] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts per row, the first included (default 6; 1 "
                            "disables retries).", rich_help_panel=LOAD)] = None,
    backoff_initial: BackoffInitialOption = None,
    backoff_max: BackoffMaxOption = None,
    max_retry_after: MaxRetryAfterOption = None,
    unavailable_after: Annotated[float | None, typer.Option(help="End the run (exit 1, resumable) when every "
                                 "attempt has failed with connection errors, timeouts or 5xx for this many "
                                 "seconds (default 60). Meanwhile the server gets one probe at a time, on the "
                                 "backoff, not one retry per worker.", rich_help_panel=LOAD)] = None,
    connect_timeout: ConnectTimeoutOption = None,
    read_timeout: Annotated[float | None, typer.Option(help="Seconds without a byte before an attempt fails "
                            "(default: the request timeout; 60 when streaming).", rich_help_panel=CONN)] = None,
    request_timeout: RequestTimeoutOption = None,
    deadline: Annotated[float | None, typer.Option(help="Seconds for the whole run; unfinished rows are left "
                        "for a resumed run.", rich_help_panel=LOAD)] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Stop early (exit 1) once more than this "
                              "fraction of finished rows failed, after --min-error-sample rows.",
                              rich_help_panel=LOAD)] = None,
    min_error_sample: Annotated[int | None, typer.Option(help="Rows finished before --max-error-rate applies "
                                "(default 20).", rich_help_panel=LOAD)] = None,
    slo: Annotated[list[str] | None, typer.Option("--slo", help="Service-level objective name=seconds (ttft, "
                   "tpot, itl, latency); the summary reports goodput against them (repeatable).",
                   rich_help_panel=LOAD)] = None,
    input_format: Annotated[str, typer.Option(help="auto, jsonl, batch (OpenAI Batch API) or csv.",
                            rich_help_panel=INP)] = "auto",
    prompt_column: Annotated[str | None, typer.Option(help="CSV column holding the prompt (default 'prompt').",
                             rich_help_panel=INP)] = None,
    template: TemplateOption = None,
    id_column: IdColumnOption = None,
    on_invalid: Annotated[str, typer.Option(help="error: an invalid row stops the run before any request "
                          "(exit 2). skip: record it as an error line and go on.", rich_help_panel=INP)] = "error",
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Start afresh: the existing output is "
                         "moved aside to <output>.bak-<time>, never deleted.", rich_help_panel=OUT)] = None,
    retry_failed: Annotated[bool | None, typer.Option("--retry-failed/--no-retry-failed", help="On resume, "
                            "retry rows whose latest line is an error (default) or keep them.",
                            rich_help_panel=OUT)] = None,
    force_resume: Annotated[bool | None, typer.Option("--force-resume", help="Resume even though the input "
                            "no longer matches the one the output was written from: rows whose id (explicit, or "
                            "position plus content hash) already has a final ok line are kept, the rest run, "
                            "and lines of ids no longer in the input stay in the file (verify lists them as "
                            "extra).", rich_help_panel=OUT)] = None,
    ordered: Annotated[bool | None, typer.Option("--ordered", help="Write lines in input order instead of "
                       "completion order. Finished rows wait in memory for earlier, slower ones: at most "
                       f"max({ORDERED_WINDOW_MIN_ROWS}, {ORDERED_WINDOW_PER_WORKER} x concurrency) rows run ahead "
                       "of the oldest unwritten one, so that many result lines at most are held (about 1 MB "
                       "per 1,000 lines of 1 KB); when the buffer is full, no new row starts until the oldest "
                       "finishes. A stopped run writes what it holds; a resumed one appends the missing rows "
                       "at the end.", rich_help_panel=OUT)] = None,
    fsync: Annotated[str | None, typer.Option(help="always, interval (at most once a second and at exit; "
                     "default) or never.", rich_help_panel=OUT)] = None,
    drain_timeout: Annotated[float | None, typer.Option(help="On SIGINT/SIGTERM, seconds to let in-flight "
                             "requests finish (default 30).", rich_help_panel=OUT)] = None,
    summary: Annotated[str | None, typer.Option(help="Where to write the summary JSON (default "
                       "<output>.summary.json).", rich_help_panel=OUT)] = None,
    progress: Annotated[str | None, typer.Option(help="rich, plain (periodic lines) or none; default rich on "
                        "a terminal, plain otherwise.", rich_help_panel=OUT)] = None,
) -> None:
    """Run every row of INPUT through the server and append one result line per row to --output.

    Exit codes: 0 every row ok; 1 some rows failed or the run stopped early; 2 bad usage, config or input;
    74 the output could not be written; 75 another run holds the output; 130/143 interrupted by SIGINT/SIGTERM.
    """
    console = err_console()
    flags = {
        "base_url": base_url, "model": model, "api_key": api_key, "header": header or None, "route": route,
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "param": param or None,
        "stream": stream, "concurrency": concurrency, "min_concurrency": min_concurrency,
        "max_concurrency": max_concurrency, "metrics_url": metrics_url, "server_metrics": server_metrics,
        "log_controller": log_controller, "rpm": rpm, "tpm": tpm, "max_attempts": max_attempts,
        "backoff_initial": backoff_initial, "backoff_max": backoff_max, "max_retry_after": max_retry_after,
        "unavailable_after": unavailable_after, "connect_timeout": connect_timeout, "read_timeout": read_timeout,
        "request_timeout": request_timeout, "deadline": deadline, "max_error_rate": max_error_rate,
        "min_error_sample": min_error_sample, "slo": slo or None, "overwrite": overwrite,
        "retry_failed": retry_failed, "force_resume": force_resume, "fsync": fsync,
        "drain_timeout": drain_timeout, "progress": progress, "ordered": ordered,
    }
    with _exit_on_run_errors(console):
        if concurrency_from is not None:
            from gptoss_batch.sweep import concurrency_from_sweep

            flags["concurrency"], note = concurrency_from_sweep(concurrency_from, concurrency)
            console.print(note, highlight=False, soft_wrap=True)
        cfg, file_values = load_run_config(config, flags)
        options = _input_options(file_values, input_format, prompt_column, template, id_column,
                                 on_invalid if on_invalid != "error" else file_values.get("on_invalid", "error"))
        spec = JobSpec(input, output, options, summary)
        if hasattr(signal, "SIGXFSZ"):
            # Past a file-size limit, get EFBIG from write() (handled) instead of being killed.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        result = run_async(run_job, cfg, spec, console)
    if result.outcome is not None and result.outcome.output_error is not None:
        message = escape(output_error_message(result.outcome.output_error))
        console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(result.exit_code)


@app.command()
def verify(
    input: Annotated[str, typer.Argument(help="The prompt file the results were produced from.",
                                         show_default=False)],
    output: Annotated[str, typer.Argument(help="The results JSONL written by run.", show_default=False)],
    input_format: Annotated[str, typer.Option(help="auto, jsonl, batch or csv (as given to run).",
                            rich_help_panel=INP)] = "auto",
    prompt_column: Annotated[str | None, typer.Option(help="CSV prompt column (as given to run).",
                             rich_help_panel=INP)] = None,
    template: Annotated[str | None, typer.Option(help="CSV prompt template (as given to run).",
                        rich_help_panel=INP)] = None,
    id_column: Annotated[str | None, typer.Option(help="CSV id column (as given to run).",
                         rich_help_panel=INP)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Check that every row of INPUT has exactly one final ok line in OUTPUT.

    A row's final line is the latest line carrying its id (what a resumed run goes by). Each row is ok
    (final line ok, and the only ok line for its id), missing (no line), duplicated (more than one ok
    line: exactly-once failed) or errored (final line is an error). Lines whose id is not in INPUT (extra)
    and lines that are not result lines (corrupt) are reported too. Read-only: safe while a run is going.

    Exit codes: 0 every row has exactly one final ok; 1 some row does not; 2 bad usage or input; 74 the
    output cannot be read.
    """
    import orjson

    from gptoss_batch.verify import format_verify
    from gptoss_batch.verify import verify as verify_output

    console = err_console()
    try:
        options = InputOptions(format=input_format, prompt_column=prompt_column,  # type: ignore[arg-type]
                               template=template, id_column=id_column)
        report = verify_output(input, output, options)
    except (ConfigError, InputError) as exc:
        fail(console, str(exc), EXIT_USAGE)
    except OutputError as exc:
        fail(console, str(exc), EXIT_OUTPUT)
    if json_out:
        typer.echo(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(format_verify(report, output))
    raise typer.Exit(0 if report.passed else 1)


@app.command("summary")
def summary_command(
    output: Annotated[str, typer.Argument(help="The results JSONL written by run.", show_default=False)],
    slo: Annotated[list[str] | None, typer.Option("--slo", help="Service-level objective name=seconds (ttft, "
                   "tpot, itl, latency) for the goodput figures (repeatable).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Recompute the summary of OUTPUT from the results file alone: every row once, from its final line.

    Row counts, tokens, latency/TTFT/TPOT percentiles and errors come from the lines; the number of runs,
    the total row count and the wall time (summed over runs that ended normally or by a signal) come from
    <output>.meta.json when it exists. Exit codes: 0 printed; 2 bad usage; 74 the output cannot be read.
    """
    import orjson

    from gptoss_batch.report import print_summary
    from gptoss_batch.verify import summarize_output

    console = err_console()
    try:
        slos = build_config({"slo": slo or None}, environ={}).slos
        if not Path(output).is_file():
            raise OutputError(f"{output}: no such results file")
        result = summarize_output(output, slos=slos)
    except ConfigError as exc:
        fail(console, str(exc), EXIT_USAGE)
    except OutputError as exc:
        fail(console, str(exc), EXIT_OUTPUT)
    if json_out:
        typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        runs = result.get("runs_total")
        took = f" ({runs} run{'s' if runs != 1 else ''})" if runs else ""
        print_summary(Console(), result, title=f"Summary of {output}{took}")


SWEEP = "Sweep"


@app.command()
def sweep(
    input: Annotated[str, typer.Argument(help="Prompt file (JSONL, OpenAI Batch JSONL or CSV). Its rows are used "
                                         "in order at every level, cycling when a level needs more.",
                                         show_default=False)],
    levels: Annotated[str | None, typer.Option(help="Concurrency levels, e.g. 1,2,4,6,8,12,16,32,64, or 'auto': "
                      "double from 1 until throughput rises by 5% or less, errors appear or --max-concurrency "
                      "is reached (default auto).", rich_help_panel=SWEEP)] = None,
    rates: Annotated[str | None, typer.Option(help="Request-rate mode instead: arrival rates in requests/s, e.g. "
                     "0.5,1,2,4. Poisson arrivals, open loop (arrivals do not wait for answers), at most "
                     "--max-concurrency in flight.", rich_help_panel=SWEEP)] = None,
    requests_per_level: Annotated[int | None, typer.Option(help="Rows measured per level (default 4x the level, "
                                  "at least 16).", rich_help_panel=SWEEP)] = None,
    duration: Annotated[float | None, typer.Option(help="Measure each level for this many seconds instead "
                        "(in-flight requests then finish and count).", rich_help_panel=SWEEP)] = None,
    warmup: Annotated[int | None, typer.Option(help="Rows sent before each level's measurement and not counted "
                      "(default: one per slot, i.e. the level; 0 for none).", rich_help_panel=SWEEP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals (--rates).", rich_help_panel=SWEEP)] = 0,
    max_concurrency: Annotated[int | None, typer.Option(help="Ceiling of --levels auto; requests in flight at "
                               "most with --rates (default 256).", rich_help_panel=SWEEP)] = None,
    slo: Annotated[list[str] | None, typer.Option("--slo", help="name=seconds (ttft, tpot, itl, latency): a level "
                   "is recommended only if its p90 meets every SLO (repeatable).", rich_help_panel=SWEEP)] = None,
    report_dir: Annotated[str | None, typer.Option(help="Write sweep.json, sweep.csv, sweep.md, sweep.png and "
                          "levels.jsonl (every result line, with its level) here. Rerunning with the same "
                          "directory resumes: levels already in sweep.json are not measured again.",
                          rich_help_panel=OUT, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the report directory afresh (old files "
                         "are moved aside, never deleted).", rich_help_panel=OUT)] = False,
    base_url: BaseUrlOption = None,
    model: Annotated[str | None, typer.Option(help="Model name sent with every request.", rich_help_panel=REQ)] = None,
    api_key: ApiKeyOption = None,
    header: HeaderOption = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with run's keys (flags win).",
                      show_default=False)] = None,
    metrics_url: Annotated[str | None, typer.Option(help="The server's Prometheus page, polled every 0.5 s during "
                           "each level for its running/waiting requests and KV-cache use (default: the base URL "
                           "without /v1, plus /metrics).", rich_help_panel=CONN, show_default=False)] = None,
    server_metrics: Annotated[bool | None, typer.Option("--server-metrics/--no-server-metrics", help="Poll "
                              "the server's /metrics (default on; skipped quietly when it has none).",
                              rich_help_panel=CONN)] = None,
    route: Annotated[str | None, typer.Option(help="chat or completions (default: the row's own, else chat).",
                     rich_help_panel=REQ)] = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Extra body field key=value (repeatable).",
                     rich_help_panel=REQ)] = None,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Stream responses, to measure TTFT "
                      "and TPOT per level.", rich_help_panel=REQ)] = None,
    no_retries: Annotated[bool, typer.Option("--no-retries", help="One attempt per row (--max-attempts 1): the "
                          "raw success rate of each level, as the tutorial measured it.",
                          rich_help_panel=LOAD)] = False,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts per row, the first included (default 6).",
                            rich_help_panel=LOAD)] = None,
    backoff_initial: BackoffInitialOption = None,
    backoff_max: BackoffMaxOption = None,
    max_retry_after: MaxRetryAfterOption = None,
    connect_timeout: ConnectTimeoutOption = None,
    read_timeout: Annotated[float | None, typer.Option(help="Seconds without a byte before an attempt fails.",
                            rich_help_panel=CONN)] = None,
    request_timeout: RequestTimeoutOption = None,
    input_format: Annotated[str, typer.Option(help="auto, jsonl, batch or csv.", rich_help_panel=INP)] = "auto",
    prompt_column: Annotated[str | None, typer.Option(help="CSV column holding the prompt.",
                             rich_help_panel=INP)] = None,
    template: TemplateOption = None,
    id_column: IdColumnOption = None,
    progress: Annotated[str | None, typer.Option(help="rich, plain or none (default rich on a terminal).",
                        rich_help_panel=OUT)] = None,
) -> None:
    """Measure the server at rising concurrency (or arrival rates) and recommend a concurrency.

    Each level warms up, then runs the same rows: success rate, errors by kind, latency mean/p50/p95/p99,
    requests/s, output tokens/s, TTFT/TPOT with --stream, and the server's own gauges from /metrics. The
    recommendation is the knee: the lowest level reaching 95% of the best throughput with every request ok
    and every --slo met; `run --concurrency-from DIR/sweep.json` uses it.

    Exit codes: 0 done, with a recommendation; 1 no level qualified, or the server became unreachable;
    2 bad usage, config or input; 74 a report could not be written; 75 another sweep holds the directory;
    130/143 interrupted (rerun the same command to resume).
    """
    from gptoss_batch.sweep import SweepSpec, make_plan, run_sweep

    console = err_console()
    flags = {
        "base_url": base_url, "model": model, "api_key": api_key, "header": header or None, "route": route,
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "param": param or None,
        "stream": stream, "max_attempts": 1 if no_retries else max_attempts, "backoff_initial": backoff_initial,
        "backoff_max": backoff_max, "max_retry_after": max_retry_after, "connect_timeout": connect_timeout,
        "read_timeout": read_timeout, "request_timeout": request_timeout, "slo": slo or None,
        "progress": progress, "metrics_url": metrics_url, "server_metrics": server_metrics,
        "max_concurrency": max_concurrency,
    }
    with _exit_on_run_errors(console):
        if no_retries and max_attempts is not None:
            raise ConfigError("give --no-retries or --max-attempts, not both")
        cfg, file_values = load_run_config(config, flags)
        plan = make_plan(levels=levels, rates=rates, requests_per_level=requests_per_level, duration_s=duration,
                         warmup=warmup, seed=seed, max_concurrency=cfg.max_concurrency)
        options = _input_options(file_values, input_format, prompt_column, template, id_column)
        result = run_async(run_sweep, cfg, plan, SweepSpec(input, options, report_dir, overwrite), console)
    raise typer.Exit(result.exit_code)


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.", show_default=False)],
    base_url: BaseUrlOption = None,
    model: Annotated[str | None, typer.Option(help="Model name sent with the request.", rich_help_panel=REQ)] = None,
    api_key: ApiKeyOption = None,
    header: HeaderOption = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with run's keys (flags win); "
                      "the connection and request keys apply, the others are ignored.", show_default=False)] = None,
    system: Annotated[str | None, typer.Option(help="System message sent before the prompt.",
                      rich_help_panel=REQ)] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens for the answer.", rich_help_panel=REQ)] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.", rich_help_panel=REQ)] = None,
    top_p: Annotated[float | None, typer.Option(help="top_p.", rich_help_panel=REQ)] = None,
    param: ParamOption = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive (default), "
                      "or the whole answer at the end.", rich_help_panel=REQ)] = True,
    connect_timeout: ConnectTimeoutOption = None,
    read_timeout: Annotated[float | None, typer.Option(help="Seconds without a byte before the request fails "
                            "(default: 60 when streaming, else the request timeout).", rich_help_panel=CONN)] = None,
    request_timeout: Annotated[float | None, typer.Option(help="Seconds for the whole request (default 300).",
                               rich_help_panel=CONN)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Timing on stderr at the end (TTFT, output "
                       "tokens, TPOT, tokens/s), and reasoning text on stderr as it arrives.")] = False,
) -> None:
    """Send one PROMPT and print the answer on stdout, token by token as it is generated.

    Uses the same connection options, config file and environment as run, and one request (no retries:
    text already printed cannot be taken back). Exit codes: 0 answered; 1 the request failed (the
    reason on stderr); 2 bad usage or config; 130 interrupted.
    """
    import functools
    import sys

    from gptoss_batch.chat import chat_once, format_timing, read_prompt

    console = err_console()
    flags = {"base_url": base_url, "model": model, "api_key": api_key, "header": header or None,
             "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "param": param or None,
             "stream": stream, "connect_timeout": connect_timeout, "read_timeout": read_timeout,
             "request_timeout": request_timeout}
    try:
        cfg, _ = load_run_config(config, flags)
        text = read_prompt(prompt, sys.stdin)
    except ConfigError as exc:
        fail(console, str(exc), EXIT_USAGE)
    out = _StdoutWriter()

    def on_text(piece: str, reasoning: bool) -> None:
        if not reasoning:
            out.write(piece)
        elif verbose:
            console.print(piece, end="", style="dim", markup=False, highlight=False, soft_wrap=True)

    try:
        outcome = run_async(functools.partial(chat_once, cfg, text, system=system,
                                              on_text=on_text if stream else None))
    except KeyboardInterrupt:
        out.end_line()
        raise typer.Exit(EXIT_SIGINT) from None
    if outcome.completion is not None and not out.wrote:
        out.write(outcome.completion.text)  # --no-stream, or a server that answered a stream with plain JSON
    out.end_line()
    if outcome.error is not None:
        fail(console, outcome.error.message, 1)
    if verbose:
        console.print(format_timing(outcome), style="dim", markup=False, highlight=False, soft_wrap=True)


class _StdoutWriter:
    """Text to stdout, flushed per piece so it shows as it arrives; a closed pipe (``| head``) ends output
    quietly instead of failing the request."""

    def __init__(self) -> None:
        import sys

        self._stdout = sys.stdout
        self._closed = False
        self._last = "\n"
        self.wrote = False

    def write(self, text: str) -> None:
        if self._closed or not text:
            return
        self.wrote = True
        try:
            self._stdout.write(text)
            self._stdout.flush()
            self._last = text[-1]
        except BrokenPipeError:
            self._closed = True
            # Point stdout at /dev/null so the interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stdout.fileno())

    def end_line(self) -> None:
        if self._last != "\n":
            self.write("\n")


def _register_sim() -> None:
    from gptoss_batch.sim.cli import register

    register(app)


_register_sim()


def main() -> None:
    # Results may go to stdout ('-o -'); a closed pipe downstream is not an error worth a traceback.
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()
