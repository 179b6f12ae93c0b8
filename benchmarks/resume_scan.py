"""Resume start-up cost: scanning an existing 1,000,000-line output before the first request is sent.

Goal (issue #3): ``scan_output`` on a 1M-line results file (lines of 300-600 bytes, ~450 MB) in under 2 s.

Method: the output is generated once (ids ``req-0000000``..., 2% error lines, a torn last line as a crash
leaves it). Each measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``, minus the
child's RSS after imports) is its own; the page cache is warmed first, so the figures are CPU-bound (a cold
cache adds the disk's read time for ~450 MB). Measurements alternate within each repeat so a noisy
neighbour hurts all alike:

- ``scan``: ``sink.scan_output`` as a resumed run calls it (torn tail set aside and cut included);
- ``per-line``: the previous per-line fast path (a copy kept here), for the side-by-side ratio;
- ``input check``: ``InputSource.check()`` on a matching 1,001,000-row input (another module's cost, shown
  because a run pays it before the scan);
- ``start-up``: ``run_job`` from call to the first ``send`` of a stub transport, resuming with
  ``--no-retry-failed`` so every one of the 1M rows is skipped and the first request is row 1,000,000:
  input check + lock + scan + skipping 1M rows, the whole wait a user sees.

    python -m benchmarks.resume_scan [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from tests.helpers.stub_run import own_peak_rss_kib

FULL_LINES = 1_000_000
QUICK_LINES = 100_000
EXTRA_INPUT_ROWS = 1_000  # rows after the output's: the first request is the first of them
GOAL_S = 2.0
TORN_TAIL = b'{"id":"req-x","index":7,"status":"ok","text":"cut off he'
MODES = ("scan", "per-line", "input check", "start-up")

_LINE = (b'{"id":"req-%07d","index":%d,"status":"%s","text":"%s","finish_reason":"stop","usage":{"prompt_tokens":'
         b'%d,"completion_tokens":%d,"total_tokens":%d},"model":"gpt-oss-20b","latency_s":%.6f,"attempts":%d,'
         b'"concurrency":64,"run":1}\n')
_WORDS = (b"the model answers each question with a short paragraph about batch inference latency tokens "
          b"throughput servers queues retries resume crash safe append only results files").split()


def generate(out: Path, inp: Path, lines: int) -> None:
    """A results file of ``lines`` result lines (300-600 bytes) and the input it came from (+ extra rows)."""
    rng = random.Random(7)
    texts = [b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(22, 62))) for _ in range(257)]
    with out.open("wb", buffering=1 << 22) as f:
        for i in range(lines):
            text = texts[i % 257]
            status = b"error" if i % 50 == 7 else b"ok"
            f.write(_LINE % (i, i, status, text, 40 + i % 30, len(text) // 5, 40 + i % 30 + len(text) // 5,
                             0.05 + (i % 997) / 1000, 1 + (i % 13 == 0)))
    with inp.open("wb", buffering=1 << 22) as f:
        for i in range(lines + EXTRA_INPUT_ROWS):
            f.write(b'{"id":"req-%07d","prompt":"Question %d: how do batch runners resume?"}\n' % (i, i))


def _scan_per_line(path: str) -> dict[str, bool]:
    """The scan as it was before the block-level fast path: split lines, then a Python loop over each."""
    latest: dict[str, bool] = {}
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(8 << 20):
            data = rest + block if rest else block
            lines = data.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.startswith(b'{"id":'):
                    i = line.find(b',"index":', 6)
                    j = line.find(b',"status":"', i) if i > 0 else -1
                    if j > 0 and line[6:7] == b'"':
                        key = orjson.loads(line[6:i])
                        if isinstance(key, str):
                            latest[key] = line[j + 11:j + 14] == b'ok"'
                            continue
                data = orjson.loads(line)
                latest[str(data["id"])] = data.get("status") == "ok"
    return latest


def _rss_mb() -> float:
    return own_peak_rss_kib() / 1024


def _child(mode: str, out: str, inp: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from gptoss_batch.inputs import open_input
    from gptoss_batch.sink import scan_output

    base_mb = _rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if mode == "scan":
        ids = len(scan_output(out).latest)
    elif mode == "per-line":
        ids = len(_scan_per_line(out))
    elif mode == "input check":
        ids = open_input(inp).check() or 0
    else:
        return _startup(out, inp, base_mb)
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "peak_mb": _rss_mb() - base_mb,
            "ids": ids}


def _startup(out: str, inp: str, base_mb: float) -> dict[str, Any]:
    import anyio
    from rich.console import Console

    from gptoss_batch.config import build_config
    from gptoss_batch.job import JobSpec, run_job
    from gptoss_batch.records import Completion, Route

    t0, cpu0 = time.perf_counter(), time.process_time()

    class FirstSend:
        """Reports the moment the first request would go out, then ends the process at once."""

        async def __aenter__(self) -> FirstSend:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
            seconds = time.perf_counter() - t0
            row = orjson.loads(body)["messages"][0]["content"]
            sys.stdout.write(orjson.dumps({"seconds": seconds, "cpu_s": time.process_time() - cpu0,
                                           "peak_mb": _rss_mb() - base_mb, "first_row": row}).decode() + "\n")
            sys.stdout.flush()
            os._exit(0)

    cfg = build_config({"retry_failed": False, "progress": "none", "concurrency": 1}, environ={})
    anyio.run(run_job, cfg, JobSpec(inp, out), Console(stderr=True, quiet=True), lambda _cfg: FirstSend())
    raise SystemExit("the stub transport was never called")


def _measure(mode: str, out: Path, inp: Path) -> dict[str, Any]:
    if mode in ("scan", "per-line"):
        with out.open("ab") as f:  # as a crash leaves it; the scan sets it aside and cuts it each time
            f.write(TORN_TAIL)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.resume_scan", "--child", mode, str(out), str(inp)],
                          capture_output=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: exit {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.splitlines()[-1])
    return result


def run(lines: int, repeats: int, workdir: Path, progress: bool = True) -> dict[str, Any]:
    out, inp = workdir / "results.jsonl", workdir / "prompts.jsonl"
    t0 = time.perf_counter()
    generate(out, inp, lines)
    if progress:
        print(f"generated {lines:,} lines ({out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
    for p in (out, inp):  # warm the page cache: measure the scan, not the disk
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES:
            s = _measure(mode, out, inp)
            samples[mode].append(s)
            if progress:
                print(f"repeat {r + 1}/{repeats} {mode}: {s['seconds']:.3f}s (cpu {s['cpu_s']:.3f}s), "
                      f"+{s['peak_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
    return {"lines": lines, "bytes": out.stat().st_size, "repeats": repeats, "samples": samples,
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def format_markdown(report: dict[str, Any]) -> str:
    s = report["samples"]
    med = {m: statistics.median(x["seconds"] for x in s[m]) for m in MODES}
    rows = [f"{report['lines']:,} result lines, {report['bytes'] / 1e6:.0f} MB, page cache warm; median of "
            f"{report['repeats']} (min in brackets); each in a fresh process; {report['cpus']} CPUs, "
            f"Python {report['python']}.", "",
            "| measurement | wall seconds | CPU seconds | peak RSS over baseline | lines/s (wall) |",
            "|---|---|---|---|---|"]
    for m in MODES:
        secs = [x["seconds"] for x in s[m]]
        cpu = [x["cpu_s"] for x in s[m]]
        rows.append(f"| {m} | {med[m]:.3f} ({min(secs):.3f}) | {statistics.median(cpu):.3f} ({min(cpu):.3f}) | "
                    f"{max(x['peak_mb'] for x in s[m]):.0f} MB | {report['lines'] / med[m]:,.0f} |")
    ratios = [x["cpu_s"] / y["cpu_s"] for x, y in zip(s["per-line"], s["scan"], strict=True)]
    load = os.getloadavg()[0]
    verdict = "meets" if med["scan"] < GOAL_S else "misses"
    rows += ["", f"scan_output {verdict} the {GOAL_S:g} s goal: {med['scan']:.2f} s wall "
             f"({statistics.median(x['cpu_s'] for x in s['scan']):.2f} s CPU; load average {load:.1f} on "
             f"{report['cpus']} CPUs at the end, so wall time includes waiting for a CPU). The previous per-line "
             f"loop took {statistics.median(ratios):.2f}x its CPU time (median of per-repeat ratios). From run_job's "
             f"call to the first request: {med['start-up']:.2f} s, of which the input's validating pass is "
             f"{med['input check']:.2f} s (run once by check() and again while the resumed run skips rows)."]
    return "\n".join(rows)


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``."""
    with tempfile.TemporaryDirectory(prefix="resume-scan-") as tmp:
        return format_markdown(run(QUICK_LINES if quick else FULL_LINES, 1 if quick else 3, Path(tmp)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resume_scan", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES:,} lines, 1 repeat")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="generate into DIR and keep the files")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "OUTPUT", "INPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, out, inp = args.child
        print(orjson.dumps(_child(mode, out, inp)).decode(), flush=True)
        return 0
    lines, repeats = (QUICK_LINES, 1) if args.quick else (FULL_LINES, 3)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        print(format_markdown(run(lines, repeats, args.keep)))
    else:
        print(markdown(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
