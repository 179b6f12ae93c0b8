"""`gptoss-batch sweep`: levels, arrivals, the knee, server gauges, the reports and resuming.

Pure parts are tested directly; the sweep itself runs as the real CLI against serve-sim with a known knee:
8 decode slots and a flat step time, so throughput doubles with concurrency up to 8 and stays flat after.
"""

from __future__ import annotations

import csv
import io
import itertools
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gptoss_batch.config import RunConfig
from gptoss_batch.errors import ConfigError, ConnectError
from gptoss_batch.metrics import GaugeStats, MetricsPoller, iter_samples, metrics_url_for, parse_gauges
from gptoss_batch.records import Completion, Result, Route, Usage
from gptoss_batch.runner import Runner
from gptoss_batch.sim.metrics import EngineMetrics, render_metrics
from gptoss_batch.sim.testing import SimHandle, start_sim
from gptoss_batch.stats import SummaryBuilder
from gptoss_batch.sweep import (
    FIGURE_COLUMNS,
    ArrivalPacer,
    SweepPlan,
    SweepStore,
    concurrency_from_sweep,
    cycle_rows,
    figures,
    find_knee,
    make_plan,
    next_auto_level,
    parse_levels,
    parse_rates,
    poisson_offsets,
    recommended_concurrency,
    sweep_settings,
    to_markdown,
)
from tests.cli_helpers import gptoss, read_jsonl, wait_for_line, write_jsonl
from tests.fakes import FakeClock, MemorySink, rows

# 8 slots, 5 ms per token whatever the batch size, 40 tokens per request: 0.2 s a request, so throughput is
# 5 req/s per slot up to 8 slots (40 req/s) and flat beyond. One token a step keeps the idle gap between a
# finished request and its successor's admission small, so concurrency 8 gets close to the queue-fed 16.
KNEE = 8
KNEE_SIM = ("--max-num-seqs", str(KNEE), "--decode-base-s", "0.005", "--decode-slope", "0",
            "--tokens-per-step", "1", "--min-tokens", "40")
SIX_LEVELS = (1, 2, 4, 8, 16, 32)
TUTORIAL_COLUMNS = ("concurrency", "success rate", "mean latency (s)", "req/s")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_TIMEOUT_S = 120


# -- plan and levels -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("1,2,4,6,8,12,16,32,64", (1, 2, 4, 6, 8, 12, 16, 32, 64)),
    ("8, 4,4 ,1", (1, 4, 8)),
    ("auto", None),
    (" AUTO ", None),
])
def test_levels_are_parsed_sorted_and_deduplicated(text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_levels(text) == expected


@pytest.mark.parametrize("text", ["", "0,1", "1,x", "2.5", "-1"])
def test_bad_levels_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--levels"):
        parse_levels(text)


def test_rates_are_positive_floats_sorted() -> None:
    assert parse_rates("4,0.5,1,2") == (0.5, 1.0, 2.0, 4.0)
    for bad in ("0", "-1", "x", "inf"):
        with pytest.raises(ConfigError, match="--rates"):
            parse_rates(bad)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"levels": "1,2", "rates": "1"}, "not both"),
    ({"levels": "1", "rates": None, "requests_per_level": 10, "duration_s": 5.0}, "not both"),
    ({"levels": "1", "rates": None, "duration_s": 0.0}, "--duration"),
    ({"levels": "1", "rates": None, "warmup": -1}, "--warmup"),
])
def test_contradictory_plans_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_plan(**kwargs)


@pytest.mark.parametrize(("level", "requests"), [(1, 16), (4, 16), (5, 20), (8, 32), (64, 256)])
def test_default_requests_per_level_is_four_per_slot_and_at_least_16(level: int, requests: int) -> None:
    assert SweepPlan().requests_for(level) == requests
    assert SweepPlan(requests_per_level=7).requests_for(level) == 7
    assert SweepPlan(duration_s=3.0).requests_for(level) is None


def test_warmup_defaults_to_one_round_of_the_level() -> None:
    assert [SweepPlan().warmup_for(n) for n in (1, 8, 64)] == [1, 8, 64]
    assert SweepPlan(warmup=0).warmup_for(8) == 0
    assert SweepPlan(mode="rate", max_concurrency=4).warmup_for(10.0) == 4


def test_default_plan_is_auto_concurrency() -> None:
    plan = make_plan(levels=None, rates=None)
    assert plan.mode == "concurrency" and plan.levels is None


# -- rows and arrivals ---------------------------------------------------------------------------------------

def test_rows_cycle_when_the_input_is_shorter_with_distinct_ids() -> None:
    got = list(cycle_rows(rows(3), 7))
    assert [r.id for r in got] == ["r0", "r1", "r2", "r0#2", "r1#2", "r2#2", "r0#3"]
    assert [r.payload["prompt"] for r in got] == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert [r.index for r in got] == list(range(7))
    assert [r.id for r in cycle_rows(rows(3), 2, start=3)] == ["r0#2", "r1#2"]


def test_poisson_offsets_are_seeded_and_average_the_rate() -> None:
    a = poisson_offsets(4.0, random.Random(7), 4000)
    assert a == poisson_offsets(4.0, random.Random(7), 4000)
    assert a != poisson_offsets(4.0, random.Random(8), 4000)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    assert 4000 / a[-1] == pytest.approx(4.0, rel=0.05)


class _ClockTransport:
    """Records when each request was sent; takes ``duration_s`` of fake time to answer."""

    def __init__(self, clock: FakeClock, duration_s: float = 0.0) -> None:
        self.clock = clock
        self.duration_s = duration_s
        self.sent_at: list[float] = []

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        self.sent_at.append(self.clock())
        if self.duration_s:
            await self.clock.sleep(self.duration_s)
        return Completion(text="x", finish_reason="stop", usage=Usage(1, 1, 2), model="m")


@pytest.mark.anyio
async def test_rate_mode_sends_on_the_poisson_schedule() -> None:
    clock = FakeClock()
    transport = _ClockTransport(clock)
    runner = Runner(RunConfig(concurrency=64), transport, MemorySink(), clock=clock, sleep=clock.sleep)
    pacer = ArrivalPacer(2.0, random.Random(3), clock=clock, sleep=clock.sleep)
    released: list[float] = []

    async def pace() -> None:
        await pacer()
        released.append(clock())

    runner.pace = pace
    t0 = clock()
    await runner.run(rows(30))
    expected = poisson_offsets(2.0, random.Random(3), 30)
    assert [t - t0 for t in released] == pytest.approx(expected)
    assert len(transport.sent_at) == 30 and pacer.arrivals == 30 and pacer.late == 0


@pytest.mark.anyio
async def test_arrivals_do_not_wait_for_answers_until_every_slot_is_busy() -> None:
    """Open loop: with one slot and 1-second answers at 10 arrivals/s, rows queue and are counted late."""
    clock = FakeClock()
    transport = _ClockTransport(clock, duration_s=1.0)
    runner = Runner(RunConfig(concurrency=1), transport, MemorySink(), clock=clock, sleep=clock.sleep)
    pacer = ArrivalPacer(10.0, random.Random(1), clock=clock, sleep=clock.sleep)
    runner.pace = pacer
    await runner.run(rows(10))
    assert pacer.arrivals == 10
    assert pacer.late >= 8


# -- figures, knee, auto -------------------------------------------------------------------------------------

def record(level: float, ok_per_s: float, *, failed: int = 0, done: int = 32, p90: float = 0.2,
           ttft_p90: float | None = None, mode: str = "concurrency") -> dict[str, Any]:
    """A level record as sweep.json holds it, from a few figures."""
    ok = done - failed
    summary: dict[str, Any] = {
        "rows": {"total": done, "done": done, "ok": ok, "failed": failed}, "wall_s": done / max(ok_per_s, 1e-9),
        "requests_per_s": ok_per_s * done / max(ok, 1), "ok_per_s": ok_per_s, "output_tokens_per_s": ok_per_s * 40,
        "success_rate": ok / done,
        "latency_s": {"mean": p90 * 0.8, "p50": p90 * 0.7, "p90": p90, "p95": p90 * 1.1, "p99": p90 * 1.2},
    }
    if ttft_p90 is not None:
        summary["ttft_s"] = {"mean": ttft_p90 / 2, "p50": ttft_p90 / 2, "p90": ttft_p90, "p95": ttft_p90,
                             "p99": ttft_p90}
        summary["tpot_s"] = {"mean": 0.005, "p50": 0.005, "p90": 0.006, "p95": 0.007, "p99": 0.008}
    return {"level": level, "concurrency": int(level) if mode == "concurrency" else 64,
            "rate_per_s": level if mode == "rate" else None, "run": 1, "summary": summary,
            "errors": {"http 429": failed} if failed else {}, "server": None}


@pytest.mark.parametrize(("points", "slos", "knee"), [
    # (level, ok req/s, failed, latency p90, ttft p90)
    ([(1, 5, 0, .2, None), (2, 10, 0, .2, None), (4, 20, 0, .2, None), (8, 39, 0, .2, None),
      (16, 40, 0, .4, None), (32, 40, 0, .8, None)], {}, 8),
    ([(4, 20, 0, .2, None), (6, 30, 0, .2, None), (8, 36.5, 0, .2, None), (12, 38, 0, .3, None)], {}, 8),
    ([(4, 20, 0, .2, None), (8, 36, 0, .2, None), (12, 38, 0, .3, None)], {}, 12),
    # a failed request disqualifies a level, even the fastest
    ([(4, 20, 0, .2, None), (8, 30, 1, .2, None), (12, 31, 0, .3, None), (16, 45, 3, .4, None)], {}, 12),
    # the SLO cuts the high levels; the knee is taken among the qualifying ones
    ([(4, 20, 0, .2, None), (8, 39, 0, .3, None), (16, 40, 0, .6, None)], {"latency": 0.5}, 8),
    ([(4, 20, 0, .2, .1), (8, 39, 0, .3, .4), (16, 40, 0, .6, .9)], {"ttft": 0.2}, 4),
    # an SLO on a metric that was not measured (no --stream) disqualifies every level
    ([(4, 20, 0, .2, None), (8, 39, 0, .3, None)], {"ttft": 1.0}, None),
    ([(4, 20, 2, .2, None), (8, 39, 1, .3, None)], {}, None),
    ([(1, 5, 0, .2, None)], {}, 1),
])
def test_knee_is_the_lowest_qualifying_level_within_5_percent_of_the_best(
        points: list[tuple[int, float, int, float, float | None]], slos: dict[str, float], knee: int | None) -> None:
    recs = [record(lv, tp, failed=f, p90=p90, ttft_p90=ttft) for lv, tp, f, p90, ttft in points]
    random.Random(0).shuffle(recs)
    rec = find_knee(recs, slos, "concurrency")
    assert (rec["level"] if rec else None) == knee
    if rec is not None:
        assert rec["concurrency"] == knee
        assert f"Recommended concurrency: {knee}," in rec["sentence"]


def test_the_sentence_says_when_a_failing_level_was_faster() -> None:
    rec = find_knee([record(4, 20.0), record(8, 39.0), record(16, 45.0, failed=3)], {}, "concurrency")
    assert rec is not None and "the best among the levels with every request ok" in rec["sentence"]
    rec = find_knee([record(4, 20.0), record(8, 39.0), record(16, 40.0)], {}, "concurrency")
    assert rec is not None and "98% of the best measured, 40.00 req/s at 16" in rec["sentence"]


def test_rate_mode_recommends_a_rate_and_a_concurrency_by_littles_law() -> None:
    recs = [record(r, r, p90=0.5, mode="rate") for r in (1.0, 2.0, 4.0)] + [record(8.0, 4.1, p90=3, mode="rate")]
    rec = find_knee(recs, {}, "rate")
    assert rec is not None and rec["level"] == 4.0
    # 4 req/s x 0.4 s mean latency = 1.6 requests in flight
    assert rec["concurrency"] == 2
    assert "Recommended rate: 4 requests/s" in rec["sentence"]


@pytest.mark.parametrize(("measured", "expected"), [
    ([], 1),
    ([(1, 5.0, 0)], 2),
    ([(1, 5.0, 0), (2, 10.0, 0), (4, 20.0, 0)], 8),
    ([(1, 5.0, 0), (2, 10.0, 0), (4, 20.0, 0), (8, 21.0, 0)], None),   # +5%: flat
    ([(1, 5.0, 0), (2, 10.0, 0), (4, 20.0, 0), (8, 21.1, 0)], 16),     # just above 5%
    ([(1, 5.0, 0), (2, 10.0, 2)], None),                               # errors appeared
    ([(1, 5.0, 0), (2, 10.0, 0), (4, 20.0, 0), (8, 40.0, 0), (16, 80.0, 0)], 20),  # the ceiling
    ([(1, 5.0, 0), (2, 10.0, 0), (4, 20.0, 0), (8, 40.0, 0), (16, 80.0, 0), (20, 100.0, 0)], None),
])
def test_auto_levels_double_until_throughput_flattens_errors_appear_or_the_ceiling(
        measured: list[tuple[int, float, int]], expected: int | None) -> None:
    recs = [record(lv, tp, failed=f) for lv, tp, f in measured]
    assert next_auto_level(recs, 20) == expected


def test_figures_flatten_a_record_into_the_csv_columns() -> None:
    fig = figures(record(8, 39.0, failed=2, ttft_p90=0.1))
    assert list(fig) == list(FIGURE_COLUMNS)
    assert fig["level"] == 8 and fig["failed"] == 2 and fig["errors"] == "http 429: 2"
    assert fig["ttft_p90_s"] == 0.1 and fig["server_running_mean"] is None


# -- server gauges -------------------------------------------------------------------------------------------

SGLANG = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="0"} 12.0
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="1"} 4.0
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
sglang:gen_throughput{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1234.5
"""
TGI = """# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_queue_size gauge
tgi_queue_size 2
tgi_request_duration_bucket{le="0.5"} 3
"""
LLAMA_CPP = """# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
llamacpp:kv_cache_usage_ratio 0.125
"""


@pytest.mark.parametrize(("text", "expected"), [
    (render_metrics("gpt-oss-20b", running=7, waiting=3, kv_usage=0.42, prompt_tokens=10, generation_tokens=20,
                    metrics=EngineMetrics()),
     {"requests_running": 7.0, "requests_waiting": 3.0, "kv_cache_usage": 0.42}),
    (SGLANG, {"requests_running": 16.0, "requests_waiting": 3.0, "kv_cache_usage": 0.28}),
    (TGI, {"requests_running": 5.0, "requests_waiting": 2.0}),
    (LLAMA_CPP, {"requests_running": 2.0, "requests_waiting": 1.0, "kv_cache_usage": 0.125}),
    ("", {}),
    ("# just comments\nnot a metric line\nfoo{bar=\"1\"} NaN\n", {}),
])
def test_gauges_are_read_under_each_servers_names(text: str, expected: dict[str, float]) -> None:
    assert parse_gauges(text) == pytest.approx(expected)


def test_prometheus_lines_with_tricky_labels_timestamps_and_nan() -> None:
    text = ('vllm:num_requests_running{model_name="a \\"quoted\\" {model}, here",engine="0"} 3 1700000000000\n'
            'vllm:num_requests_running{model_name="b",engine="1"} 2.5e0\n'
            'vllm:num_requests_waiting{model_name="b"} NaN\n'
            'vllm:kv_cache_usage_perc{model_name="a"} 0.5\n'
            'vllm:kv_cache_usage_perc{model_name="b"} 0.25\n'
            'vllm:gpu_cache_usage_perc{model_name="b"} 0.99\n'
            'broken{model_name="x 1\n')
    samples = list(iter_samples(text))
    assert samples[0] == ("vllm:num_requests_running", {"model_name": 'a "quoted" {model}, here', "engine": "0"}, 3.0)
    # counts add up over engines, fractions average; the V1 KV name wins over the older one; NaN is no value
    assert parse_gauges(text) == {"requests_running": 5.5, "kv_cache_usage": 0.375}


@pytest.mark.parametrize(("base", "url"), [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/metrics"),
    ("http://host:8000/v1/", "http://host:8000/metrics"),
    ("https://proxy.example/llm/v1", "https://proxy.example/llm/metrics"),
    ("http://host:8080", "http://host:8080/metrics"),
])
def test_metrics_url_is_the_base_url_without_v1(base: str, url: str) -> None:
    assert metrics_url_for(base) == url


def test_gauge_stats_keep_mean_and_max() -> None:
    s = GaugeStats()
    for running, kv in ((2, 0.1), (6, 0.3), (7, 0.2)):
        s.add({"requests_running": running, "kv_cache_usage": kv})
    s.add({})
    assert s.summary() == {"polls": 4, "requests_running_mean": 5.0, "requests_running_max": 7.0,
                           "kv_cache_usage_mean": 0.2, "kv_cache_usage_max": 0.3}


class _Pages:
    """A scripted /metrics endpoint: each item is (status, text) or an exception to raise."""

    def __init__(self, *answers: tuple[int, str] | Exception, then: tuple[int, str] | None = None) -> None:
        self.answers = list(answers)
        self.then = then
        self.calls = 0

    async def get_text(self, url: str, timeout_s: float = 5.0) -> tuple[int, str]:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else self.then
        if answer is None:
            raise AssertionError("polled past the script")
        if isinstance(answer, Exception):
            raise answer
        return answer


PAGE = "vllm:num_requests_running 4\nvllm:num_requests_waiting 1\n"


@pytest.mark.anyio
@pytest.mark.parametrize(("answers", "polls", "error"), [
    ([(404, "not found")], 0, "HTTP 404"),
    ([(200, "no known gauges here 1\n")], 0, "none of the known gauges"),
    ([ConnectError("refused")], 0, "refused"),
    ([(200, PAGE), ConnectError("a"), ConnectError("b"), ConnectError("c")], 1, "c"),
    ([(200, PAGE), ConnectError("a"), (200, PAGE), ConnectError("b"), ConnectError("c"), ConnectError("d")], 2, "d"),
])
async def test_poller_gives_up_on_no_metrics_or_repeated_failures(
        answers: list[tuple[int, str] | Exception], polls: int, error: str) -> None:
    clock = FakeClock()
    poller = MetricsPoller(_Pages(*answers), "http://x/metrics", sleep=clock.sleep)
    await poller.run()
    assert poller.stats.polls == polls
    assert poller.error is not None and error in poller.error


@pytest.mark.anyio
async def test_poller_samples_every_interval_until_cancelled() -> None:
    import anyio

    clock = FakeClock()
    pages = _Pages(then=(200, PAGE))
    poller = MetricsPoller(pages, "http://x/metrics", interval_s=0.5, sleep=clock.sleep)
    with anyio.move_on_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poller.run)
            while pages.calls < 5:
                await anyio.sleep(0)
            tg.cancel_scope.cancel()
    assert poller.error is None and poller.stats.polls >= 5
    assert clock.sleeps[:3] == [0.25, 0.5, 0.5]  # first sample half an interval in, then every interval
    assert poller.stats.summary()["requests_running_mean"] == 4.0


# -- reports and the report directory ---------------------------------------------------------------------------

def _doc(recs: list[dict[str, Any]], mode: str = "concurrency") -> dict[str, Any]:
    settings = sweep_settings(RunConfig(base_url="http://127.0.0.1:9/v1"),
                              SweepPlan(mode=mode),  # type: ignore[arg-type]
                              {"rows": 3})
    return {"format": 1, "mode": mode, "settings": settings, "levels": recs,
            "recommendation": find_knee(recs, {}, mode), "updated_at": "now"}  # type: ignore[arg-type]


def test_markdown_has_the_tutorials_columns_and_marks_the_knee() -> None:
    md = to_markdown(_doc([record(4, 20.0), record(8, 39.5), record(16, 40.0, failed=1)]))
    header = next(line for line in md.splitlines() if line.startswith("| "))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert tuple(cells[:4]) == TUTORIAL_COLUMNS
    assert "| **8** (knee) |" in md
    assert "Recommended concurrency: 8," in md
    assert "http 429: 1" in md


def test_markdown_shows_streaming_and_rate_columns_only_when_they_apply() -> None:
    plain = to_markdown(_doc([record(4, 20.0)]))
    assert "TTFT" not in plain and "late arrivals" not in plain
    streamed = to_markdown(_doc([record(4, 20.0, ttft_p90=0.1)]))
    assert "TTFT p50 (s)" in streamed and "TPOT p50 (ms)" in streamed
    rate = to_markdown(_doc([record(2.0, 2.0, mode="rate")], mode="rate"))
    assert rate.splitlines()[4].startswith("| rate (req/s) | success rate |")
    assert "late arrivals" in rate


def test_markdown_says_which_levels_missed_an_slo() -> None:
    doc = _doc([record(4, 20.0, p90=0.2), record(8, 39.5, p90=0.3), record(16, 40.0, p90=0.6)])
    doc["settings"]["slos"] = {"latency": 0.5}
    doc["recommendation"] = find_knee(doc["levels"], {"latency": 0.5}, "concurrency")
    rows_ = _parse_markdown_table(to_markdown(doc))
    assert [r["SLOs"] for r in rows_] == ["met", "met", "latency p90 600 ms is above the SLO of 500 ms"]
    assert "within the SLOs (latency p90 ≤ 500 ms)" in doc["recommendation"]["sentence"]


def test_run_concurrency_from_reads_the_knee_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    path.write_bytes(orjson.dumps(_doc([record(4, 20.0), record(8, 39.5), record(16, 40.0)])))
    assert recommended_concurrency(path)[0] == 8
    assert recommended_concurrency(tmp_path)[0] == 8  # the report directory works too
    n, note = concurrency_from_sweep(path, None)
    assert n == 8 and "http://127.0.0.1:9/v1" in note
    with pytest.raises(ConfigError, match="not both"):
        concurrency_from_sweep(path, "4")
    path.write_bytes(orjson.dumps(_doc([record(4, 20.0, failed=1)])))
    with pytest.raises(ConfigError, match="recommends no concurrency"):
        recommended_concurrency(path)
    with pytest.raises(ConfigError, match="no such sweep file"):
        recommended_concurrency(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"rows": 3}')
    with pytest.raises(ConfigError, match="not a gptoss-batch sweep"):
        recommended_concurrency(tmp_path / "other.json")


def test_a_report_dir_with_other_settings_is_not_mixed_in(tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(stderr=True, quiet=True)
    settings = _doc([])["settings"]
    store = SweepStore(tmp_path)
    doc = store.open(settings, overwrite=False, console=console)
    doc["levels"] = [record(4, 20.0)]
    store.save(doc)
    store.close()
    # same settings (SLOs may change: they change the verdict, not the measurements): resumed
    store = SweepStore(tmp_path)
    assert store.open({**settings, "slos": {"ttft": 1.0}}, overwrite=False, console=console)["levels"]
    store.close()
    with pytest.raises(ConfigError, match=r"other settings .*stream: False -> True"):
        SweepStore(tmp_path).open({**settings, "stream": True}, overwrite=False, console=console)
    # --overwrite keeps the old files aside and starts empty
    store = SweepStore(tmp_path)
    assert store.open({**settings, "stream": True}, overwrite=True, console=console)["levels"] == []
    store.close()
    assert len(list(tmp_path.glob("sweep.json.bak-*"))) == 1


def test_without_matplotlib_the_png_is_skipped_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptoss_batch import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gptoss-batch\[plot\]'"):
        plot.write_sweep_png("x.png", levels=[1], throughput=[1.0], latency_p95_s=[0.1], failed=[False], knee=1,
                             x_label="c", title="t")


# -- the real CLI against serve-sim ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def knee_sim() -> Iterator[SimHandle]:
    with start_sim(*KNEE_SIM) as handle:
        yield handle


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Fewer rows than most levels need: the sweep cycles through them.
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return write_jsonl(path, ({"id": f"q{i}", "prompt": f"question {i} about the weather"} for i in range(10)))


def sweep_args(sim: SimHandle, prompts: Path, report_dir: Path, *extra: str) -> list[str]:
    return ["sweep", str(prompts), "--base-url", sim.base_url, "--max-tokens", "40", "--report-dir",
            str(report_dir), "--progress", "none", *extra]


@pytest.fixture(scope="module")
def six_levels(knee_sim: SimHandle, prompts: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[subprocess.CompletedProcess[bytes], Path, float]:
    report = tmp_path_factory.mktemp("sweep6")
    t0 = time.perf_counter()
    proc = gptoss(*sweep_args(knee_sim, prompts, report, "--levels", ",".join(map(str, SIX_LEVELS)),
                              "--no-retries"), timeout=SWEEP_TIMEOUT_S)
    return proc, report, time.perf_counter() - t0


def test_six_level_sweep_takes_under_a_minute(six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float]
                                              ) -> None:
    proc, report, elapsed = six_levels
    assert proc.returncode == 0, proc.stderr.decode()
    assert elapsed < 60
    doc = orjson.loads((report / "sweep.json").read_bytes())
    assert [r["level"] for r in doc["levels"]] == list(SIX_LEVELS) and doc["complete"]


def test_recommendation_lands_on_the_servers_knee(six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float]
                                                  ) -> None:
    proc, report, _ = six_levels
    doc = orjson.loads((report / "sweep.json").read_bytes())
    i = SIX_LEVELS.index(KNEE)
    assert doc["recommendation"]["concurrency"] in SIX_LEVELS[i - 1:i + 2], doc["recommendation"]["sentence"]
    sentence = doc["recommendation"]["sentence"]
    assert sentence.split(",")[0] in proc.stderr.decode()  # "Recommended concurrency: N" in the terminal too
    # below the knee throughput grows with concurrency; the server never runs more than its 8 slots
    figs = [figures(r) for r in doc["levels"]]
    assert figs[2]["ok_per_s"] > 1.3 * figs[1]["ok_per_s"] > 1.3 ** 2 * figs[0]["ok_per_s"]
    assert all(f["server_running_mean"] is not None and f["server_running_mean"] <= KNEE for f in figs)
    assert figs[-1]["server_waiting_mean"] > 0  # 32 in flight, 8 slots: the rest queue on the server
    assert all(f["success_rate"] == 1.0 and f["requests"] == max(16, 4 * f["level"]) for f in figs)


def _parse_markdown_table(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_json_csv_markdown_and_jsonl_agree(six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float]
                                           ) -> None:
    _, report, _ = six_levels
    doc = orjson.loads((report / "sweep.json").read_bytes())
    table = list(csv.DictReader(io.StringIO((report / "sweep.csv").read_text())))
    md_rows = _parse_markdown_table((report / "sweep.md").read_text())
    lines = read_jsonl(report / "levels.jsonl")
    assert len(table) == len(md_rows) == len(doc["levels"]) == len(SIX_LEVELS)
    for rec, row, md in zip(doc["levels"], table, md_rows, strict=True):
        fig = figures(rec)
        assert row == {k: "" if v is None else str(v) for k, v in fig.items()}
        assert md["concurrency"].replace("**", "").split()[0] == str(rec["level"])
        assert md["success rate"] == f"{fig['success_rate']:.1%}"
        assert md["mean latency (s)"] == f"{fig['latency_mean_s']:.3f}"
        assert md["req/s"] == f"{fig['requests_per_s']:.2f}"
        mine = [line for line in lines if line["level"] == rec["level"] and line["run"] == rec["run"]]
        assert len(mine) == fig["requests"] == rec["planned_requests"]
        again = SummaryBuilder()
        for line in mine:
            again.add(Result.from_json(line))
        assert again.ok == fig["ok"] and again.failed == fig["failed"]
        lat = again.summary(1.0)["latency_s"]
        # result lines keep latency to the microsecond, so percentiles recomputed from them agree to 1 µs
        for p in ("mean", "p50", "p95", "p99"):
            assert lat[p] == pytest.approx(fig[f"latency_{p}_s"], abs=2e-6)
    assert len(lines) == sum(figures(r)["requests"] for r in doc["levels"])  # nothing else, nothing lost


def test_markdown_report_has_the_tutorials_columns(six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float]
                                                   ) -> None:
    _, report, _ = six_levels
    md = (report / "sweep.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| "))
    assert tuple(c.strip() for c in header.strip("|").split("|")[:4]) == TUTORIAL_COLUMNS
    assert "Recommended concurrency:" in md


def test_png_is_a_real_picture_of_sensible_size(six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float]
                                                ) -> None:
    pytest.importorskip("matplotlib")
    _, report, _ = six_levels
    data = (report / "sweep.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 800 <= width <= 2000 and 400 <= height <= 1200
    assert len(data) > 10_000


def test_run_concurrency_from_uses_the_sweeps_knee(
        six_levels: tuple[subprocess.CompletedProcess[bytes], Path, float], knee_sim: SimHandle,
        prompts: Path, tmp_path: Path) -> None:
    _, report, _ = six_levels
    knee = orjson.loads((report / "sweep.json").read_bytes())["recommendation"]["concurrency"]
    out = tmp_path / "out.jsonl"
    proc = gptoss("run", str(prompts), "-o", str(out), "--base-url", knee_sim.base_url, "--max-tokens", "4",
                  "--progress", "none", "--concurrency-from", str(report / "sweep.json"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"Concurrency {knee} from" in proc.stderr.decode()
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["config"]["concurrency"] == knee
    both = gptoss("run", str(prompts), "-o", str(out), "--concurrency", "3", "--concurrency-from", str(report))
    assert both.returncode == 2 and b"not both" in both.stderr


def test_auto_levels_stop_once_throughput_flattens(knee_sim: SimHandle, prompts: Path, tmp_path: Path) -> None:
    proc = gptoss(*sweep_args(knee_sim, prompts, tmp_path, "--levels", "auto", "--requests-per-level", "16",
                              "--warmup", "0"), timeout=SWEEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = orjson.loads((tmp_path / "sweep.json").read_bytes())
    levels = [r["level"] for r in doc["levels"]]
    # doubling from 1; throughput stops rising at the 8 slots, so the sweep ends one or two doublings later
    assert levels[:4] == [1, 2, 4, 8] and len(levels) in (5, 6)
    assert levels == [2 ** i for i in range(len(levels))]
    assert doc["recommendation"]["concurrency"] in (4, 8, 16)


def test_rate_mode_measures_each_arrival_rate(knee_sim: SimHandle, prompts: Path, tmp_path: Path) -> None:
    proc = gptoss(*sweep_args(knee_sim, prompts, tmp_path, "--rates", "10,20", "--requests-per-level", "20",
                              "--seed", "5", "--stream", "--max-concurrency", "32",
                              "--warmup", "0"), timeout=SWEEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = orjson.loads((tmp_path / "sweep.json").read_bytes())
    assert doc["mode"] == "rate" and [r["level"] for r in doc["levels"]] == [10.0, 20.0]
    for rec in doc["levels"]:
        fig = figures(rec)
        assert fig["requests"] == 20 and fig["success_rate"] == 1.0 and rec["concurrency"] == 32
        assert fig["ttft_p50_s"] is not None and fig["tpot_p50_s"] is not None  # streamed
        assert fig["arrivals_late"] is not None
    assert doc["recommendation"]["concurrency"] >= 1
    md = (tmp_path / "sweep.md").read_text()
    assert "| rate (req/s) | success rate | mean latency (s) | req/s |" in md and "TTFT p50 (s)" in md


def test_duration_mode_measures_each_level_for_the_given_time(knee_sim: SimHandle, prompts: Path,
                                                               tmp_path: Path) -> None:
    proc = gptoss(*sweep_args(knee_sim, prompts, tmp_path, "--levels", "2,8", "--duration", "0.6", "--warmup", "0"),
                  timeout=SWEEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = orjson.loads((tmp_path / "sweep.json").read_bytes())
    assert [rec["level"] for rec in doc["levels"]] == [2, 8]
    for rec in doc["levels"]:
        fig = figures(rec)
        assert rec["planned_requests"] is None and rec["stop_reason"] == "--duration 0.6s reached"
        # 0.6 s of sending, then the requests in flight finish (0.2 s each) and count
        assert 0.6 <= fig["wall_s"] < 0.6 + 1.0
        assert fig["requests"] >= 0.6 / 0.2 * rec["level"] * 0.5 and fig["success_rate"] == 1.0
    assert len(read_jsonl(tmp_path / "levels.jsonl")) == sum(figures(r)["requests"] for r in doc["levels"])


def test_an_interrupted_sweep_resumes_at_the_next_level(knee_sim: SimHandle, prompts: Path, tmp_path: Path) -> None:
    args = sweep_args(knee_sim, prompts, tmp_path, "--levels", "2,4,8", "--requests-per-level", "16",
                      "--warmup", "1")
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_batch", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        wait_for_line(proc, b"concurrency 2:", SWEEP_TIMEOUT_S)
        proc.send_signal(signal.SIGINT)  # during level 4, which needs at least 0.8 s
        assert proc.wait(timeout=SWEEP_TIMEOUT_S) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    first = orjson.loads((tmp_path / "sweep.json").read_bytes())
    assert [r["level"] for r in first["levels"]] == [2] and not first["complete"]

    before = knee_sim.stats()["requests_total"]
    again = gptoss(*args, timeout=SWEEP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr.decode()
    assert b"levels 2 already measured" in again.stderr
    # only levels 4 and 8 were sent: 16 rows and one warm-up row each
    assert knee_sim.stats()["requests_total"] - before == 2 * (16 + 1)
    doc = orjson.loads((tmp_path / "sweep.json").read_bytes())
    assert [(r["level"], r["run"]) for r in doc["levels"]] == [(2, 1), (4, 2), (8, 2)] and doc["complete"]
    lines = read_jsonl(tmp_path / "levels.jsonl")
    for rec in doc["levels"]:
        assert sum(1 for x in lines if x["level"] == rec["level"] and x["run"] == rec["run"]) == 16
    # the interrupted level's lines stay, told apart by their run number; nothing else is in the file
    partial = [x for x in lines if x["level"] == 4 and x["run"] == 1]
    assert len(lines) == 3 * 16 + len(partial)
