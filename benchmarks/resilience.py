"""How the run treats a struggling server: attempts against a dead one, overload, and the fault matrix.

* ``dead server``: 1,000 rows against a server that refuses every connection, for a 60 s
  ``--unavailable-after`` window with the default backoff (0.5 s doubling to 30 s), on virtual time (the
  runner with a fake transport: exact and instant). Attempts sent with the circuit breaker, and without it
  (each worker retrying on its own backoff, as before), at several concurrencies; median of 3 seeds (1 with
  --quick).
* ``overload``: serve-sim's overload mode (10 sequences run, 2 may wait, beyond that 429 + Retry-After 0.2 s)
  at concurrency 12, 300 rows (150 with --quick): the share ok with ``--max-attempts 1``, then with the
  defaults; the real CLI over loopback.
* ``fault matrix``: 1,000 rows (100 with --quick) at concurrency 32 against 20% 429 (half with Retry-After
  0.2 s), 10% 5xx, 5% resets, 5% stalls (0.5 s read timeout), 2% malformed bodies.

    python -m benchmarks --only resilience [--quick]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from gptoss_batch.config import RetryPolicy, RunConfig
from gptoss_batch.errors import ConnectError
from gptoss_batch.records import Completion, Route, Row
from gptoss_batch.runner import Runner
from gptoss_batch.sim.testing import start_sim
from tests.fakes import MemorySink
from tests.virtual_time import VirtualTime

WINDOW_S = 60.0
QUICK = ("--ttft-s", "0.005", "--itl-s", "0.0005")
MATRIX = ("--fail-429-rate", "0.2", "--retry-after-share", "0.5", "--retry-after-s", "0.2", "--fail-500-rate", "0.05",
          "--fail-503-rate", "0.05", "--reset-rate", "0.05", "--stall-rate", "0.05", "--malformed-rate", "0.02")


class _Refused:
    def __init__(self, vt: VirtualTime) -> None:
        self.vt = vt
        self.sent = 0

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        self.sent += 1
        await self.vt.sleep(0.001)
        raise ConnectError("connection refused")


async def _dead_server_attempts(concurrency: int, breaker: bool, seed: int) -> tuple[int, float]:
    vt = VirtualTime()
    transport = _Refused(vt)
    cfg = RunConfig(concurrency=concurrency, retry=RetryPolicy(unavailable_after_s=WINDOW_S))
    runner = Runner(cfg, transport, MemorySink(), clock=vt, wall_clock=vt, rand=random.Random(seed).random,
                    sleep=vt.sleep)
    if not breaker:
        runner.breaker.open_after = 10**9
    rows = [Row(id=f"r{i}", index=i, line=i + 1, payload={"prompt": f"q{i}"}) for i in range(1000)]
    start = vt.now
    await vt.run(lambda: runner.run(rows))
    return transport.sent, vt.now - start


def dead_server(seeds: int = 3) -> str:
    out = ["| concurrency | attempts with the breaker | without | run ended after (s) |", "|---|---|---|---|"]
    for concurrency in (1, 8, 32, 128):
        with_b = [asyncio.run(_dead_server_attempts(concurrency, True, s)) for s in range(seeds)]
        without = [asyncio.run(_dead_server_attempts(concurrency, False, s)) for s in range(seeds)]
        out.append(f"| {concurrency} | {statistics.median(a for a, _ in with_b):.0f} | "
                   f"{statistics.median(a for a, _ in without):.0f} | "
                   f"{statistics.median(t for _, t in with_b):.1f} |")
    return "\n".join(out)


def _run(base_url: str, inp: Path, out: Path, *extra: str) -> tuple[int, float, dict[str, Any]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gptoss_batch", "run", str(inp), "-o", str(out), "--overwrite",
                           "--base-url", base_url, "--model", "m", "--progress", "none", *extra],
                          capture_output=True, timeout=600, check=False)
    summary: dict[str, Any] = orjson.loads(Path(f"{out}.summary.json").read_bytes())
    return proc.returncode, time.perf_counter() - t0, summary


def _prompts(path: Path, n: int) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + b"\n" for i in range(n)))
    return path


def overload(tmp: Path, rows: int) -> str:
    inp = _prompts(tmp / "ov.jsonl", rows)
    out = ["| client | ok | wall (s) | exit |", "|---|---|---|---|"]
    with start_sim("--max-num-seqs", "10", "--overload-queue-limit", "2", "--retry-after-s", "0.2") as sim:
        for label, extra in (("--max-attempts 1", ("--max-attempts", "1")), ("defaults", ())):
            code, wall, s = _run(sim.base_url, inp, tmp / "ov.out.jsonl", "--concurrency", "12", "--max-tokens", "16",
                                 *extra)
            out.append(f"| {label} | {s['rows']['ok']}/{rows} | {wall:.1f} | {code} |")
    return "\n".join(out)


def matrix(tmp: Path, rows: int) -> str:
    inp = _prompts(tmp / "mx.jsonl", rows)
    with start_sim(*QUICK, *MATRIX) as sim:
        code, wall, s = _run(sim.base_url, inp, tmp / "mx.out.jsonl", "--concurrency", "32", "--max-attempts", "15",
                             "--backoff-initial", "0.05", "--backoff-max", "0.5", "--read-timeout", "0.5",
                             "--request-timeout", "2", "--deadline", "60", "--max-tokens", "8")
        sent = sim.stats()["requests_total"]
    failed = sum(s["retries_by_cause"].values())
    return (f"{s['rows']['ok']}/{rows} ok (exit {code}) in {wall:.1f} s; {sent} requests, {failed} of them failed "
            f"({failed / sent:.0%}); retries by cause: {s['retries_by_cause']}")


def markdown(quick: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-resilience-") as d:
        tmp = Path(d)
        return "\n\n".join([
            f"Dead server, 1,000 rows, 60 s window, default backoff (virtual time, median of {1 if quick else 3} "
            "seed(s)):", dead_server(1 if quick else 3),
            f"Overload at concurrency 12, {150 if quick else 300} rows (serve-sim, loopback):",
            overload(tmp, 150 if quick else 300),
            "Fault matrix at concurrency 32:", matrix(tmp, 100 if quick else 1000),
        ])


if __name__ == "__main__":
    print(markdown("--quick" in sys.argv))
