"""``--concurrency auto`` against serve-sim knees: does the controller find and hold the best fixed setting?

For each knee (serve-sim ``max_num_seqs`` 8, 32 and 128; decode_slope 0.25/knee so throughput grows almost
linearly up to the knee and is flat beyond it, where requests queue): a fixed-concurrency sweep of that server
with the Runner directly (0.5x to 2x the knee; each level warmed up, then measured for a fixed time), then
``auto`` runs against the same engine with /metrics and with ``--no-metrics`` (latency signal alone). An
auto run's *settled* part is its second half: its throughput, p95 latency and time-weighted limit there are
compared with the best fixed level (highest output tokens/s). The whole-run figure (slow start included)
is shown too. Crash mode: serve-sim ``--crash-above-running N`` with N between the knee and
``--max-concurrency``, auto runs with several seeds: did any of them trip it?

Every figure comes from one process driving serve-sim over loopback on this machine; compare the ratios,
which are measured side by side, rather than the absolute rates.

    python -m benchmarks.adaptive [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from benchmarks.measure import stderr_line
from gptoss_batch.adaptive import AdaptiveDriver
from gptoss_batch.config import build_config
from gptoss_batch.records import Result, Row
from gptoss_batch.runner import Runner
from gptoss_batch.sim.testing import start_sim
from gptoss_batch.transport import AiohttpTransport

MAX_TOKENS = 64
PROMPTS = 500  # distinct prompts, cycled: serve-sim's output lengths are keyed on (seed, prompt)
LEVELS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # fixed levels, as multiples of the knee


@dataclass(frozen=True)
class Plan:
    knees: tuple[int, ...]
    fixed_warmup_s: float
    fixed_s: float
    auto_s: float  # per knee: max(auto_s, knee-scaled minimum); see auto_duration
    crash_seeds: int
    crash_s: float
    levels: tuple[float, ...] = LEVELS
    metrics_modes: tuple[bool, ...] = (True, False)  # auto with /metrics, and with the latency signal alone


FULL = Plan(knees=(8, 32, 128), fixed_warmup_s=3.0, fixed_s=8.0, auto_s=45.0, crash_seeds=4, crash_s=15.0)
# A smoke run (make bench-quick, under a minute in all): one knee, three fixed levels, auto with /metrics only.
QUICK = Plan(knees=(8,), fixed_warmup_s=0.3, fixed_s=1.0, auto_s=5.0, crash_seeds=1, crash_s=3.0,
             levels=(0.5, 1.0, 2.0), metrics_modes=(True,))


def decode_base_s(knee: int) -> float:
    """Slower steps for bigger knees, so that the request rate (and this machine's CPU) stays moderate."""
    return {8: 0.006, 32: 0.01}.get(knee, 0.02)


def sim_args(knee: int, *, metrics: bool = True, seed: int = 0, crash_above: int | None = None) -> list[str]:
    args = ["--max-num-seqs", str(knee), "--decode-base-s", str(decode_base_s(knee)),
            "--decode-slope", f"{0.25 / knee:.6f}", "--min-tokens", "16", "--seed", str(seed)]
    if not metrics:
        args.append("--no-metrics")
    if crash_above is not None:
        args += ["--crash-above-running", str(crash_above)]
    return args


def auto_duration(plan: Plan, knee: int) -> float:
    # Slow start needs about six doublings from 4 to 128, each a few latencies of about a second.
    return plan.auto_s * (4 / 3 if knee >= 128 else 1.0)


def crash_duration(plan: Plan, knee: int) -> float:
    # Long enough for slow start and the first probes, where an overshoot would happen.
    return plan.crash_s * (2.0 if knee >= 128 else 1.0)


def rows() -> Iterator[Row]:
    i = 0
    while True:
        yield Row(id=f"r{i}", index=i, line=i + 1,
                  payload={"prompt": f"Describe item {i % PROMPTS} briefly.", "max_tokens": MAX_TOKENS})
        i += 1


@dataclass
class Done:
    t_s: float
    latency_s: float
    tokens: int
    ok: bool


class _Recorder:
    """The run's sink: keeps when each row finished, its latency and tokens (no file)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.done: list[Done] = []

    def write(self, result: Result) -> None:
        self.done.append(Done(time.perf_counter() - self.t0, result.latency_s, result.output_tokens, result.ok))


@dataclass
class RunStats:
    concurrency: str
    duration_s: float
    measured_from_s: float
    output_tokens_per_s: float
    requests_per_s: float
    p95_latency_s: float
    rows: int
    ok_share: float
    whole_output_tokens_per_s: float = 0.0
    limit_mean: float | None = None
    limit_max: int | None = None
    limits: list[tuple[float, int]] = field(default_factory=list)


async def measure(base_url: str, concurrency: int | None, duration_s: float, measured_from_s: float,
                  *, max_concurrency: int = 256, log: Path | None = None) -> RunStats:
    """Run rows for ``duration_s`` at a fixed ``concurrency`` (None: auto); measure from ``measured_from_s``.
    ``log``: where an auto run writes its controller decisions."""
    flags: dict[str, Any] = {"base_url": base_url, "concurrency": "auto" if concurrency is None else concurrency,
                             "max_concurrency": max_concurrency, "progress": "none", "request_timeout": 120,
                             "drain_timeout": 60, "log_controller": str(log) if log is not None else None}
    cfg = build_config(flags, environ={})
    t0 = time.perf_counter()
    sink = _Recorder(t0)
    limits: list[tuple[float, int]] = []
    async with AiohttpTransport(cfg.base_url, timeouts=cfg.timeouts, limit=cfg.worker_count) as transport:
        runner = Runner(cfg, transport, sink)
        runner.on_limit_change = lambda limit, _reason: limits.append((time.perf_counter() - t0, limit))
        driver = AdaptiveDriver(cfg, runner, transport) if cfg.auto_concurrency else None
        if driver is not None:
            driver.attach()
        limits.append((0.0, runner.state.limit))

        async def stop_later() -> None:
            await anyio.sleep(duration_s)
            runner.stop("benchmark time is up")

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_later)
            if driver is not None:
                tg.start_soon(driver.run)
            await runner.run(rows())
            tg.cancel_scope.cancel()
    return _stats("auto" if concurrency is None else str(concurrency), sink.done, limits, duration_s,
                  measured_from_s)


def _stats(name: str, done: list[Done], limits: list[tuple[float, int]], duration_s: float,
           start_s: float) -> RunStats:
    span = duration_s - start_s
    window = [d for d in done if start_s <= d.t_s < duration_s and d.ok]
    lat = sorted(d.latency_s for d in window) or [math.nan]
    ok = sum(d.ok for d in done)
    whole = sum(d.tokens for d in done if d.ok and d.t_s < duration_s) / duration_s
    stats = RunStats(name, duration_s, start_s, sum(d.tokens for d in window) / span, len(window) / span,
                     lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)], len(done),
                     ok / len(done) if done else 0.0, whole, limits=limits)
    if name == "auto":
        stats.limit_mean = _time_weighted(limits, start_s, duration_s)
        stats.limit_max = max(limit for _, limit in limits)
    return stats


def _time_weighted(limits: list[tuple[float, int]], t0: float, t1: float) -> float:
    total = 0.0
    for i, (t, limit) in enumerate(limits):
        end = limits[i + 1][0] if i + 1 < len(limits) else t1
        total += limit * max(0.0, min(end, t1) - max(t, t0))
    return total / (t1 - t0)


@dataclass
class KneeReport:
    knee: int
    fixed: list[RunStats]
    auto: dict[str, RunStats]  # "metrics" / "no metrics"

    @property
    def best(self) -> RunStats:
        return max(self.fixed, key=lambda s: s.output_tokens_per_s)


@dataclass
class CrashRow:
    knee: int
    budget: int
    metrics: bool
    seeds: int
    tripped: int
    max_in_server: int
    ok_share: float


@dataclass
class Report:
    plan: Plan
    knees: list[KneeReport]
    crash: list[CrashRow]
    wall_s: float = 0.0


def run(plan: Plan, progress: Any = None, log_dir: Path | None = None) -> Report:
    say = progress or (lambda _line: None)

    def log(name: str) -> Path | None:
        return log_dir / f"{name}.jsonl" if log_dir is not None else None

    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    knees: list[KneeReport] = []
    for knee in plan.knees:
        fixed: list[RunStats] = []
        with start_sim(*sim_args(knee)) as sim:
            for factor in plan.levels:
                level = max(1, round(knee * factor))
                s = anyio.run(measure, sim.base_url, level, plan.fixed_warmup_s + plan.fixed_s, plan.fixed_warmup_s)
                say(f"knee {knee}: fixed {level}: {s.output_tokens_per_s:.0f} tok/s, p95 {s.p95_latency_s:.3f}s")
                fixed.append(s)
        autos: dict[str, RunStats] = {}
        for metrics in plan.metrics_modes:
            with start_sim(*sim_args(knee, metrics=metrics)) as sim:
                d = auto_duration(plan, knee)
                name = "metrics" if metrics else "no metrics"
                s = await_run(measure(sim.base_url, None, d, d / 2, log=log(f"knee{knee}-{name.replace(' ', '-')}")))
                say(f"knee {knee}: auto ({name}): {s.output_tokens_per_s:.0f} tok/s, limit ~{s.limit_mean:.1f}, "
                    f"p95 {s.p95_latency_s:.3f}s")
                autos[name] = s
        knees.append(KneeReport(knee, fixed, autos))
    crash: list[CrashRow] = []
    for knee in plan.knees:
        budget = 2 * knee
        max_concurrency = max(256, 4 * knee)
        for metrics in plan.metrics_modes:
            tripped, max_in_server, ok_shares = 0, 0, []
            for seed in range(plan.crash_seeds):
                with start_sim(*sim_args(knee, metrics=metrics, seed=seed, crash_above=budget)) as sim:
                    d = crash_duration(plan, knee)
                    s = await_run(measure(sim.base_url, None, d, d / 2, max_concurrency=max_concurrency,
                                          log=log(f"crash-knee{knee}-metrics-{metrics}-seed{seed}")))
                    stats = sim.stats()
                tripped += bool(stats["crashed"])
                max_in_server = max(max_in_server, int(stats["max_in_flight"]))
                ok_shares.append(s.ok_share)
            row = CrashRow(knee, budget, metrics, plan.crash_seeds, tripped, max_in_server, min(ok_shares))
            say(f"crash budget {budget} (knee {knee}, metrics {metrics}): tripped {tripped}/{plan.crash_seeds}")
            crash.append(row)
    return Report(plan, knees, crash, time.perf_counter() - t_start)


def await_run(coro: Coroutine[Any, Any, RunStats]) -> RunStats:
    async def main() -> RunStats:
        return await coro

    return anyio.run(main)


def format_markdown(report: Report) -> str:
    out = ["| knee | /metrics | best fixed | its tok/s | its p95 | auto settled limit (max) | auto tok/s | "
           "ratio | whole-run ratio | p95 ratio | auto ok |",
           "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in report.knees:
        best = k.best
        for name, a in k.auto.items():
            out.append(
                f"| {k.knee} | {'yes' if name == 'metrics' else 'no'} | {best.concurrency} | "
                f"{best.output_tokens_per_s:.0f} | {best.p95_latency_s:.3f}s | {a.limit_mean:.1f} ({a.limit_max}) | "
                f"{a.output_tokens_per_s:.0f} | {a.output_tokens_per_s / best.output_tokens_per_s:.3f} | "
                f"{a.whole_output_tokens_per_s / best.output_tokens_per_s:.3f} | "
                f"{a.p95_latency_s / best.p95_latency_s:.2f} | {a.ok_share:.1%} |")
    out.append("")
    out.append("Fixed sweeps (output tok/s, p95 latency):")
    out.append("")
    for k in report.knees:
        cells = ", ".join(f"{s.concurrency}: {s.output_tokens_per_s:.0f} / {s.p95_latency_s:.2f}s" for s in k.fixed)
        out.append(f"- knee {k.knee}: {cells}")
    out.append("")
    out.append("| knee | crash budget (running + waiting) | /metrics | seeds | tripped | peak requests in the server | "
               "worst ok share |")
    out.append("|---:|---:|:---|---:|---:|---:|---:|")
    for c in report.crash:
        out.append(f"| {c.knee} | {c.budget} | {'yes' if c.metrics else 'no'} | {c.seeds} | {c.tripped} | "
                   f"{c.max_in_server} | {c.ok_share:.1%} |")
    p = report.plan
    out.append("")
    out.append(f"Fixed levels: {p.fixed_warmup_s:g} s warm-up + {p.fixed_s:g} s measured; auto: {p.auto_s:g} s "
               f"({auto_duration(p, 128):.0f} s for knee 128), settled = second half; crash runs: {p.crash_s:g} s each "
               f"({crash_duration(p, 128):g} s for knee 128). "
               f"Wall time {report.wall_s:.0f} s.")
    return "\n".join(out)


def to_json(report: Report) -> bytes:
    return orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``: run and return the tables."""
    return format_markdown(run(QUICK if quick else FULL, progress=stderr_line))



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive",
                                     description="--concurrency auto against serve-sim knees and crash budgets.")
    parser.add_argument("--quick", action="store_true", help="knee 8 only, shorter runs, one crash seed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep each auto run's --log-controller JSONL here")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL, progress=stderr_line, log_dir=args.logs)
    print(format_markdown(report))
    if args.json is not None:
        args.json.write_bytes(to_json(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
