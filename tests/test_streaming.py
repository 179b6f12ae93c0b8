"""`run --stream` end to end: timing truth against serve-sim's fixed schedule, errors inside a stream, and
servers that ignore or refuse ``stream_options``."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

from gptoss_batch.config import RunConfig, Timeouts
from gptoss_batch.errors import TimeoutError_
from gptoss_batch.records import Row
from gptoss_batch.runner import Runner
from gptoss_batch.sim.testing import SimHandle, start_sim
from gptoss_batch.stats import SummaryBuilder
from gptoss_batch.transport import AiohttpTransport
from tests.cli_helpers import gptoss, read_jsonl, write_jsonl
from tests.fakes import MemorySink

TTFT_S = 0.2
ITL_S = 0.02
TOKENS = 20  # every answer: first token at 200 ms, then one every 20 ms, so the stream lasts 0.58 s
SCHEDULE = ("--ttft-s", str(TTFT_S), "--itl-s", str(ITL_S), "--min-tokens", str(TOKENS))


@pytest.fixture(scope="module")
def scheduled() -> Iterator[SimHandle]:
    with start_sim(*SCHEDULE) as handle:
        yield handle


def stream_run(sim: SimHandle, tmp_path: Path, rows: int, *extra: str, name: str = "out") -> tuple[
        list[dict[str, Any]], dict[str, Any], str]:
    """Run ``rows`` prompts with --stream; (result lines, summary JSON, stderr)."""
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", ({"id": f"r{i}", "prompt": f"count {i}"} for i in range(rows)))
    out = tmp_path / f"{name}.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--base-url", sim.base_url, "--stream", "--max-tokens",
                  str(TOKENS), "--progress", "none", *extra)
    summary = orjson.loads((tmp_path / f"{name}.jsonl.summary.json").read_bytes())
    return read_jsonl(out), summary, proc.stderr.decode()


def medians(lines: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Median TTFT, TPOT and per-row median ITL over the rows: the machine is shared, so no single row."""
    return (statistics.median(r["ttft_s"] for r in lines), statistics.median(r["tpot_s"] for r in lines),
            statistics.median(r["itl_s"]["p50"] for r in lines))


def test_ttft_and_tpot_match_the_servers_schedule_within_5_ms_at_concurrency_1(
        scheduled: SimHandle, tmp_path: Path) -> None:
    lines, summary, stderr = stream_run(scheduled, tmp_path, 5, "--concurrency", "1",
                                        "--slo", "ttft=0.5", "--slo", "tpot=0.05")
    assert all(r["status"] == "ok" for r in lines), lines
    assert all(r["usage"]["completion_tokens"] == TOKENS and r["output_tokens_source"] == "usage" for r in lines)
    ttft, tpot, itl = medians(lines)
    assert ttft == pytest.approx(TTFT_S, abs=0.005)
    assert tpot == pytest.approx(ITL_S, abs=0.005)
    assert itl == pytest.approx(ITL_S, abs=0.005)  # chunks are stamped as they arrive, not when buffered
    for key in ("ttft_s", "tpot_s", "itl_s"):
        assert set(summary[key]) >= {"mean", "p50", "p90", "p95", "p99"}
    assert summary["ttft_s"]["p50"] == pytest.approx(TTFT_S, abs=0.005)
    assert summary["goodput"]["share"] == 1.0 and summary["slos"] == {"ttft": 0.5, "tpot": 0.05}
    assert summary["output_tokens"] == 5 * TOKENS and summary["output_tokens_per_s"] > 0
    for label in ("TTFT", "TPOT", "ITL", "p99", "goodput", "5 rows met the SLOs (100.0%)", "output tok/s"):
        assert label in stderr, (label, stderr)


def test_ttft_and_tpot_stay_within_10_percent_at_concurrency_64(scheduled: SimHandle, tmp_path: Path) -> None:
    # Three waves of 64: the first also pays 64 connects at once (10-35 ms more on a busy machine), the
    # median row is in the later ones, on warm keep-alive connections.
    lines, summary, _ = stream_run(scheduled, tmp_path, 192, "--concurrency", "64", "--slo", "ttft=0.1")
    assert len(lines) == 192 and all(r["status"] == "ok" for r in lines)
    assert scheduled.stats()["max_in_flight"] >= 48
    ttft, tpot, itl = medians(lines)
    assert ttft == pytest.approx(TTFT_S, rel=0.10)
    assert tpot == pytest.approx(ITL_S, rel=0.10)
    assert itl == pytest.approx(ITL_S, rel=0.10)
    assert summary["goodput"]["share"] == 0.0  # a 100 ms TTFT objective against a 200 ms server


def test_a_server_that_never_sends_done_still_gives_complete_rows(tmp_path: Path) -> None:
    with start_sim("--ttft-s", "0.01", "--itl-s", "0.001", "--omit-done") as sim:
        lines, summary, _ = stream_run(sim, tmp_path, 4)
    assert all(r["status"] == "ok" and r["finish_reason"] and r["text"] for r in lines)
    assert summary["rows"]["ok"] == 4


FAST_FAULTY = ("--ttft-s", "0.01", "--itl-s", "0.002", "--min-tokens", "12", "--seed", "5")


def test_a_cut_stream_is_retried_from_the_start_and_its_partial_text_is_never_written(tmp_path: Path) -> None:
    with start_sim(*FAST_FAULTY) as clean:
        truth, _, _ = stream_run(clean, tmp_path, 24, name="truth")
    with start_sim(*FAST_FAULTY, "--stream-cut-rate", "0.5") as faulty:
        once, _, _ = stream_run(faulty, tmp_path, 24, "--max-attempts", "1", name="once")
        retried, summary, _ = stream_run(faulty, tmp_path, 24, "--max-attempts", "10", "--backoff-initial",
                                         "0.01", "--backoff-max", "0.02", name="retried")
        assert faulty.stats()["by_fault"]["stream_cut"] >= 6
    text = {r["id"]: r["text"] for r in truth}
    # One attempt each: the cut rows are error lines without any text; the others are whole.
    cut = [r for r in once if r["status"] == "error"]
    assert cut and all(r["error"]["kind"] == "stream" and "text" not in r for r in cut)
    assert all(r["text"] == text[r["id"]] for r in once if r["status"] == "ok")
    # With retries every row ends ok, with exactly the text of an uncut stream: nothing from a cut attempt.
    assert len(truth) == len(once) == len(retried) == 24
    assert all(r["status"] == "ok" and r["text"] == text[r["id"]] for r in retried)
    assert any(a["kind"] == "stream" for r in retried for a in r.get("attempt_log", []))
    assert summary["retries_by_cause"].get("stream", 0) >= 1


def test_a_stall_mid_stream_fails_the_attempt_at_the_read_timeout_without_text(tmp_path: Path) -> None:
    with start_sim("--ttft-s", "0.02", "--itl-s", "30", "--min-tokens", "3") as stalling:
        lines, _, _ = stream_run(stalling, tmp_path, 2, "--read-timeout", "0.3", "--max-attempts", "1")
    assert len(lines) == 2
    for r in lines:
        assert r["status"] == "error" and r["error"]["kind"] == "timeout" and "text" not in r
        assert 0.3 <= r["latency_s"] < 5


# -- the read timeout of a stream -------------------------------------------------------------------------


async def _paced(request: web.Request) -> web.StreamResponse:
    """Chunks after the gaps (seconds) the X-Gaps header gives: "0.1,0.1,0.5"."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for gap in map(float, request.headers["X-Gaps"].split(",")):
        await anyio.sleep(gap)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
    await resp.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    return resp


@pytest.mark.anyio
@pytest.mark.parametrize(("gaps", "timed_out"), [
    ("0.05,0.15,0.15,0.15,0.15", False),  # 0.65 s in all, no gap of 0.25 s: the deadline keeps moving
    ("0.05,0.15,0.45", True),  # one gap of 0.45 s
    ("0.45", True),  # nothing after the headers
])
async def test_a_stream_fails_only_when_one_gap_exceeds_the_read_timeout(gaps: str, timed_out: bool) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _paced)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with AiohttpTransport(base_url, headers=(("X-Gaps", gaps),),
                                    timeouts=Timeouts(read_s=0.25)) as transport:
            t0 = time.perf_counter()
            try:
                c = await transport.send("chat", b'{"messages": []}', stream=True)
            except TimeoutError_ as exc:
                assert timed_out, exc
                assert "read timeout" in exc.message and "0.25s" in exc.message
                assert time.perf_counter() - t0 < 0.25 + 0.05 + sum(map(float, gaps.split(",")))
            else:
                assert not timed_out and c.text == "x" * len(gaps.split(","))
    finally:
        await runner.cleanup()


# -- stream_options: servers that ignore it or refuse it -------------------------------------------------


class OldServer:
    """A tiny OpenAI-style streamer that never sends usage; ``reject`` answers 400 to stream_options."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        if self.mode == "reject" and "stream_options" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument supplied: "
                                                "stream_options", "type": "invalid_request_error"}}, status=400)
        if self.mode == "refuse-all":
            return web.json_response({"error": {"message": "max_tokens is too large"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("one", " two", " three"):
            await resp.write(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})
                             + b"\n\n")
        await resp.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp


@asynccontextmanager
async def old_server(mode: str) -> AsyncIterator[tuple[str, OldServer]]:
    server = OldServer(mode)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", server
    finally:
        await runner.cleanup()


async def run_rows(base_url: str, n: int) -> tuple[MemorySink, SummaryBuilder]:
    cfg = RunConfig(base_url=base_url, stream=True, concurrency=1, max_tokens=3)
    sink, summary = MemorySink(), SummaryBuilder()
    rows = [Row(id=f"r{i}", index=i, line=i + 1, payload={"prompt": f"p{i}"}) for i in range(n)]
    async with AiohttpTransport(base_url) as transport:
        await Runner(cfg, transport, sink, on_result=summary.add).run(rows)
    return sink, summary


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["ignore", "reject"])
async def test_without_usage_the_output_tokens_are_the_counted_chunks(mode: str) -> None:
    async with old_server(mode) as (base_url, server):
        sink, summary = await run_rows(base_url, 4)
    assert all(r.status == "ok" and r.text == "one two three" for r in sink.results)
    assert all(r.output_tokens_source == "chunks" and r.extra == {"output_tokens": 3} for r in sink.results)
    assert all(b'"output_tokens":3' in r.to_line() for r in sink.results)
    assert summary.output_tokens == 12
    asked = [("stream_options" in b) for b in server.bodies]
    # Asked for usage every time when it is silently ignored; refused once, then never asked again.
    assert asked == ([True] * 4 if mode == "ignore" else [True, False, False, False, False])
    assert all(r.attempts == 1 for r in sink.results)  # the resend is not a retry


@pytest.mark.anyio
async def test_a_400_about_something_else_is_not_resent_without_stream_options() -> None:
    async with old_server("refuse-all") as (base_url, server):
        sink, _ = await run_rows(base_url, 1)
    (r,) = sink.results
    assert r.status == "error" and r.error is not None and r.error.status == 400
    assert len(server.bodies) == 1


def test_chunk_counted_tokens_survive_the_jsonl_round_trip() -> None:
    """A resumed run or `gptoss-batch summary` counts tokens of streams that came without usage."""
    from gptoss_batch.records import Result

    r = Result(id="a", index=0, status="ok", text="x", output_tokens_source="chunks", extra={"output_tokens": 7})
    back = Result.from_line(r.to_line())
    assert back.output_tokens == 7 and back.output_tokens_source == "chunks"
