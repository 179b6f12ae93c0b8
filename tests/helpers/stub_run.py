"""Run the whole `run` pipeline (input, body, runner, sink, summary) with a transport that answers
instantly, and print peak RSS and CPU time as JSON. Used by the flat-memory test and benchmarks.

    python -m tests.helpers.stub_run INPUT OUTPUT [--concurrency N]
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import time
from pathlib import Path
from types import TracebackType

import anyio
import orjson
from rich.console import Console

from gptoss_batch.config import RunConfig, build_config
from gptoss_batch.inputs import InputOptions
from gptoss_batch.job import JobSpec, run_job
from gptoss_batch.records import Completion, Route, Usage

_DONE = Completion(text="ok", finish_reason="stop", usage=Usage(10, 2, 12), model="stub")


class InstantTransport:
    """Answers every request at once, after one trip through the event loop."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    async def __aenter__(self) -> InstantTransport:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        await anyio.lowlevel.checkpoint()
        return _DONE


def own_peak_rss_kib() -> int:
    """This process's own peak RSS. ``ru_maxrss`` also counts the parent's peak at the moment it started this
    process (Linux keeps the pre-exec high-water mark), so under pytest it reported pytest's peak, whatever
    the run did; VmHWM starts afresh at exec."""
    try:
        found = re.search(rb"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_bytes())
    except OSError:
        found = None
    return int(found[1]) if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    cfg = build_config({"concurrency": args.concurrency, "progress": "none", "model": "m", "fsync": "never"})
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    result = anyio.run(run_job, cfg, JobSpec(args.input, args.output, InputOptions()),
                       Console(stderr=True, quiet=True), InstantTransport,
                       backend_options={"use_uvloop": True})
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    rows = result.summary["rows"]["done"]
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    sys.stdout.write(orjson.dumps({
        "rows": rows, "ok": result.summary["rows"]["ok"], "exit_code": result.exit_code,
        "peak_rss_kib": own_peak_rss_kib(), "cpu_s": cpu, "cpu_us_per_row": cpu / max(rows, 1) * 1e6,
        "wall_s": time.perf_counter() - t0,
    }).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
