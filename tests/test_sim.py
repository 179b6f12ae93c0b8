"""serve-sim: the OpenAI wire format, the continuous-batching model, faults, overload, crash and the CLI.

Most tests run the server in-process on a loopback port and talk real HTTP to it with httpx; the engine's
scheduler is tested as the pure state machine it is.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import typer
from typer.testing import CliRunner

from gptoss_batch.errors import ConfigError
from gptoss_batch.sim import RunningSim, SimConfig, serve
from gptoss_batch.sim.cli import register
from gptoss_batch.sim.config import ENGINE
from gptoss_batch.sim.engine import Scheduler, Seq
from gptoss_batch.sim.testing import start_sim

pytestmark = pytest.mark.anyio

CHAT = "/chat/completions"
TEXT = "/completions"
# Fast engine settings so a test's requests finish in tens of milliseconds.
FAST: dict[str, Any] = {"decode_base_s": 0.001, "decode_slope": 0.01}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # serve-sim is built on aiohttp, so asyncio only


@contextlib.asynccontextmanager
async def running(timeout_s: float = 10.0, **knobs: Any) -> AsyncIterator[tuple[RunningSim, httpx.AsyncClient]]:
    async with serve(SimConfig(**knobs)) as srv, httpx.AsyncClient(base_url=srv.base_url,
                                                                     timeout=timeout_s) as client:
        yield srv, client


def chat_body(content: str = "Say something.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": content}], **extra}


def text_body(prompt: str = "Once upon a time", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-oss-20b", "prompt": prompt, **extra}


async def post(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> httpx.Response:
    return await client.post(route, json=body)


def sse_data(raw: str) -> list[str]:
    """The data fields of an SSE body, in order."""
    assert raw.endswith("\n\n"), raw[-80:]
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def stream_text(events: list[dict[str, Any]], route: str) -> str:
    if route == CHAT:
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


# --- the wire format


@pytest.mark.parametrize("route", [CHAT, TEXT])
async def test_non_streaming_response_has_openai_shape(route: str) -> None:
    async with running(**FAST) as (_, client):
        body = chat_body(max_tokens=20) if route == CHAT else text_body(max_tokens=20)
        r = await client.post(route, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    data = r.json()
    choice = data["choices"][0]
    if route == CHAT:
        assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
        assert choice["message"]["role"] == "assistant"
        text = choice["message"]["content"]
    else:
        assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
        text = choice["text"]
    assert isinstance(data["created"], int) and data["model"] == "gpt-oss-20b"
    assert text and choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert 1 <= usage["completion_tokens"] <= 20 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(text.split()) == usage["completion_tokens"]  # one pseudo-word per token


@pytest.mark.parametrize("route", [CHAT, TEXT])
async def test_stream_is_vllm_sse_and_matches_the_plain_answer(route: str) -> None:
    """Role chunk (chat), content chunks, finish_reason on the last, usage chunk, then [DONE]."""
    make = chat_body if route == CHAT else text_body
    async with running(**FAST) as (_, client):
        plain = (await client.post(route, json=make(max_tokens=30))).json()
        r = await client.post(route, json=make(max_tokens=30, stream=True,
                                                stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    events = [orjson.loads(d) for d in data[:-1]]
    assert all(e["id"] == events[0]["id"] for e in events)
    usage_event, content_events = events[-1], events[:-1]
    assert usage_event["choices"] == [] and usage_event["usage"] == plain["usage"]
    if route == CHAT:
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert content_events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [e["choices"][0]["finish_reason"] for e in content_events]
    assert finishes[-1] == plain["choices"][0]["finish_reason"] and set(finishes[:-1]) == {None}
    expected = plain["choices"][0]["message"]["content"] if route == CHAT else plain["choices"][0]["text"]
    assert stream_text(content_events, route) == expected


@pytest.mark.parametrize("omit_done", [False, True])
async def test_done_line_can_be_omitted(omit_done: bool) -> None:
    async with running(omit_done=omit_done, **FAST) as (_, client):
        r = await client.post(TEXT, json=text_body(max_tokens=5, stream=True))
    data = sse_data(r.text)
    assert (data[-1] == "[DONE]") is not omit_done
    assert "usage" not in orjson.loads(data[-2] if not omit_done else data[-1])  # not asked for


async def test_separate_finish_chunk_puts_finish_reason_on_an_empty_chunk() -> None:
    async with running(separate_finish_chunk=True, **FAST) as (_, client):
        r = await client.post(CHAT, json=chat_body(max_tokens=5, stream=True))
    last = orjson.loads(sse_data(r.text)[-2])["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")


async def test_max_tokens_truncates_with_finish_reason_length() -> None:
    async with running(min_tokens=10, **FAST) as (_, client):
        a = (await client.post(CHAT, json=chat_body(max_tokens=3))).json()
        b = (await client.post(CHAT, json=chat_body(max_completion_tokens=2))).json()
    assert a["usage"]["completion_tokens"] == 3 and a["choices"][0]["finish_reason"] == "length"
    assert b["usage"]["completion_tokens"] == 2


async def test_same_seed_and_prompt_give_the_same_text() -> None:
    async def answer(seed: int, prompt: str, request_seed: int | None = None) -> str:
        async with running(seed=seed, **FAST) as (_, client):
            extra = {} if request_seed is None else {"seed": request_seed}
            r = await client.post(TEXT, json=text_body(prompt, max_tokens=40, **extra))
            text: str = r.json()["choices"][0]["text"]
            return text

    first = await answer(7, "alpha")
    assert await answer(7, "alpha") == first  # a fresh server, same answer
    assert await answer(8, "alpha") != first
    assert await answer(7, "beta") != first
    assert await answer(7, "alpha", request_seed=1) != first


@pytest.mark.parametrize(("knobs", "route", "raw", "status", "err_type"), [
    ({}, CHAT, b"{not json", 400, "BadRequestError"),
    ({}, CHAT, b'["a list"]', 400, "BadRequestError"),
    ({}, CHAT, b'{"model": "m"}', 400, "BadRequestError"),
    ({}, TEXT, b'{"model": "m", "messages": []}', 400, "BadRequestError"),
    ({}, TEXT, b'{"prompt": "hi", "max_tokens": "ten"}', 400, "BadRequestError"),
    ({"max_model_len": 100}, TEXT, b'{"prompt": "hi", "max_tokens": 200}', 400, "BadRequestError"),
    ({"strict_model": True}, TEXT, b'{"model": "other", "prompt": "hi"}', 404, "NotFoundError"),
])
async def test_bad_requests_get_openai_error_bodies(knobs: dict[str, Any], route: str, raw: bytes, status: int,
                                                    err_type: str) -> None:
    async with running(**knobs) as (_, client):
        r = await client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == err_type and error["code"] == status and error["message"]


async def test_any_model_name_is_accepted_unless_strict() -> None:
    async with running(**FAST) as (_, client):
        r = await client.post(TEXT, json={"model": "whatever", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "whatever"


async def test_models_and_health() -> None:
    async with running(model="my-model") as (srv, client):
        models = (await client.get("/models")).json()
        health = await client.get(f"http://127.0.0.1:{srv.port}/health")
    assert [m["id"] for m in models["data"]] == ["my-model"]
    assert health.status_code == 200 and health.content == b""


# --- metrics

VLLM_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_count",
                "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, rest = series.partition("{")
        labels = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",")) if rest else {}
        out.setdefault(name, []).append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


async def test_metrics_use_vllm_names_and_count_requests() -> None:
    async with running(**FAST) as (srv, client):
        for i in range(3):
            await client.post(TEXT, json=text_body(f"p{i}", max_tokens=4))
        r = await client.get(f"http://127.0.0.1:{srv.port}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    metrics = parse_prometheus(r.text)
    for name in VLLM_METRICS:
        assert name in metrics, name
        assert all(labels["model_name"] == "gpt-oss-20b" for labels, _ in metrics[name])
    assert sum(v for _, v in metrics["vllm:request_success_total"]) == 3
    assert metrics["vllm:time_to_first_token_seconds_count"][0][1] == 3
    inf_bucket = [v for labels, v in metrics["vllm:e2e_request_latency_seconds_bucket"] if labels["le"] == "+Inf"]
    assert inf_bucket == [3.0]
    assert metrics["vllm:generation_tokens_total"][0][1] == srv.sim.stats()["generation_tokens_total"] > 0
    assert 0.0 <= metrics["vllm:kv_cache_usage_perc"][0][1] <= 1.0


async def test_metrics_can_be_turned_off() -> None:
    async with running(metrics_enabled=False) as (srv, client):
        r = await client.get(f"http://127.0.0.1:{srv.port}/metrics")
    assert r.status_code == 404


# --- the engine model


def make_seq(prompt: int = 10, max_tokens: int = 10, output: int = 5) -> Seq:
    return Seq(prompt_tokens=prompt, max_tokens=max_tokens, output_tokens=output, arrival_s=0.0)


def scheduler(**overrides: Any) -> Scheduler:
    knobs: dict[str, Any] = {"max_num_seqs": 2, "kv_tokens": 10_000, "prefill_s_per_token": 0.0,
                             "decode_base_s": 0.01, "decode_slope": 0.1, "tokens_per_step": 1}
    return Scheduler(**(knobs | overrides))


def test_scheduler_runs_at_most_max_num_seqs_in_arrival_order() -> None:
    sched = scheduler()
    seqs = [make_seq() for _ in range(5)]
    for s in seqs:
        sched.submit(s)
    sched.plan_step(0.0)
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]


def test_scheduler_waits_for_kv_budget_but_runs_an_oversized_request_alone() -> None:
    sched = scheduler(max_num_seqs=8, kv_tokens=100)
    small = [make_seq(prompt=20, max_tokens=20) for _ in range(3)]  # 40 tokens each: two fit
    for s in small:
        sched.submit(s)
    sched.plan_step(0.0)
    assert len(sched.running) == 2 and sched.kv_usage == pytest.approx(0.8)
    huge = scheduler(kv_tokens=100)
    big = make_seq(prompt=200, max_tokens=10)
    huge.submit(big)
    huge.plan_step(0.0)
    assert huge.running == [big]


def test_step_time_grows_with_batch_and_throughput_saturates() -> None:
    sched = scheduler()
    rates = [n / sched.decode_step_s(n) for n in (1, 2, 4, 8, 16, 64, 256)]
    assert rates == sorted(rates)  # more sequences, more tokens/s ...
    ceiling = 1 / (sched.decode_base_s * sched.decode_slope)
    assert rates[-1] < ceiling and rates[-1] > 0.9 * ceiling  # ... flattening towards the ceiling
    assert sched.decode_step_s(16) > sched.decode_step_s(1)  # while each sequence gets slower


def test_a_step_prices_prefill_and_finishes_sequences() -> None:
    sched = scheduler(prefill_s_per_token=0.001, tokens_per_step=2)
    a, b = make_seq(prompt=100, output=2), make_seq(prompt=50, output=5)
    sched.submit(a)
    sched.submit(b)
    assert sched.plan_step(0.0) == pytest.approx(2 * 0.01 * 1.2 + 0.150)
    progressed = sched.complete_step(1.0)
    assert progressed == [a, b] and a.state == "finished" and a.finished_s == 1.0
    assert b.generated == 2 and b.first_token_s == 1.0 and sched.running == [b]
    assert sched.kv_used == b.kv_need and sched.generation_tokens_total == 4
    assert sched.plan_step(1.0) == pytest.approx(2 * 0.01 * 1.1)  # no new prefill


def test_capacity_change_takes_effect_after_its_time() -> None:
    config = SimConfig(max_num_seqs=8, capacity_change_after_s=5.0, capacity_change_slots=2)
    assert [config.slots_at(t) for t in (0.0, 4.9, 5.0, 60.0)] == [8, 8, 2, 2]


async def test_running_never_exceeds_max_num_seqs_and_the_rest_queue(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    async with running(max_num_seqs=4, request_log=log, min_tokens=8, **FAST) as (srv, client):
        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(post, client, TEXT, text_body(f"row {i}", max_tokens=8))
        stats = srv.sim.stats()
    assert stats["max_running"] == 4 and stats["max_waiting"] >= 10
    assert stats["by_status"] == {"200": 24} and stats["max_in_flight"] >= 20
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert len(lines) == 24
    assert {"t_arrival", "t_done", "status", "fault", "stream", "in_flight", "running", "waiting"} <= set(lines[0])
    assert max(line["running"] for line in lines) <= 4
    assert max(line["in_flight"] for line in lines) == stats["max_in_flight"]
    assert all(line["t_done"] >= line["t_arrival"] and line["fault"] is None for line in lines)


async def test_capacity_change_lowers_the_running_limit() -> None:
    async with running(max_num_seqs=16, capacity_change_after_s=0.0, capacity_change_slots=3,
                       **FAST) as (srv, client):
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(post, client, TEXT, text_body(f"row {i}", max_tokens=8))
        assert srv.sim.stats()["max_running"] == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_frees_its_slot_quietly(stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp cancels the handler on disconnect; the engine then drops the sequence."""
    async with running(max_num_seqs=1, min_tokens=500, decode_base_s=0.05) as (srv, client):
        long = text_body("long", max_tokens=500, stream=stream)
        if stream:
            async with client.stream("POST", TEXT, json=long) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(TEXT, json=long, timeout=0.3)
        started = time.perf_counter()
        r = await client.post(TEXT, json=text_body("short", max_tokens=1))  # would wait 25 s behind it
        assert r.status_code == 200 and time.perf_counter() - started < 3.0
        assert srv.sim.stats()["by_status"].get("499") == 1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


async def test_fixed_schedule_emits_first_token_at_ttft_then_every_itl() -> None:
    async with running(ttft_s=0.15, itl_s=0.03, min_tokens=6) as (_, client):
        started = time.perf_counter()
        times: list[float] = []
        async with client.stream("POST", TEXT, json=text_body(max_tokens=6, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter() - started)
    assert len(times) == 6
    assert 0.14 <= times[0] < 0.6
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.03, abs=0.02)


# --- faults, overload and crash

STATUS_FAULTS = [("fail_500_rate", 500, "http_500"), ("fail_503_rate", 503, "http_503"),
                 ("fail_429_rate", 429, "http_429")]


@pytest.mark.parametrize(("knob", "status", "fault"), STATUS_FAULTS)
async def test_status_faults_at_rate_one_answer_every_request(knob: str, status: int, fault: str) -> None:
    async with running(**{knob: 1.0}) as (srv, client):
        replies = [await client.post(CHAT, json=chat_body(f"p{i}")) for i in range(4)]
    assert [r.status_code for r in replies] == [status] * 4
    assert all(r.json()["error"]["code"] == status for r in replies)
    assert srv.sim.stats()["by_fault"] == {fault: 4}


@pytest.mark.parametrize(("share", "expect_header"), [(1.0, True), (0.0, False)])
async def test_retry_after_share_decides_which_429s_carry_it(share: float, expect_header: bool) -> None:
    async with running(fail_429_rate=1.0, retry_after_share=share, retry_after_s=2.0) as (_, client):
        r = await client.post(CHAT, json=chat_body())
    assert r.headers.get("retry-after") == ("2" if expect_header else None)


async def test_fault_decisions_are_reproducible_and_fresh_on_retry() -> None:
    async def statuses() -> list[int]:
        async with running(fail_500_rate=0.5, seed=3, **FAST) as (_, client):
            return [(await client.post(TEXT, json=text_body(f"p{i % 5}", max_tokens=2))).status_code
                    for i in range(20)]

    first = await statuses()
    assert first == await statuses() and {200, 500} == set(first)
    # The same prompt asked again draws again, so a retry can succeed.
    assert any(len({first[i + 5 * k] for k in range(4)}) == 2 for i in range(5))


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_drops_the_connection_before_any_response(stream: bool) -> None:
    async with running(reset_rate=1.0) as (srv, client):
        with pytest.raises(httpx.TransportError):
            await client.post(CHAT, json=chat_body(stream=stream))
    assert srv.sim.stats()["by_fault"] == {"reset": 1}


async def test_stall_sends_nothing_without_blocking_the_server() -> None:
    async with running(stall_rate=1.0, stall_s=3600.0) as (srv, client):
        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(expect_read_timeout, client)
            health = await client.get(f"http://127.0.0.1:{srv.port}/health")
    assert health.status_code == 200


async def expect_read_timeout(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post(CHAT, json=chat_body(), timeout=0.3)


async def test_malformed_answers_200_with_invalid_json() -> None:
    async with running(malformed_rate=1.0, **FAST) as (_, client):
        plain = await client.post(CHAT, json=chat_body())
        streamed = await client.post(CHAT, json=chat_body(stream=True))
    assert plain.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(plain.content)
    assert streamed.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        [orjson.loads(d) for d in sse_data(streamed.text)[:-1]]


async def test_stream_cut_aborts_mid_stream_and_mid_body() -> None:
    async with running(stream_cut_rate=1.0, min_tokens=20, **FAST) as (_, client):
        received: list[str] = []
        with pytest.raises(httpx.TransportError):
            async with client.stream("POST", CHAT, json=chat_body(max_tokens=20, stream=True)) as r:
                async for line in r.aiter_lines():
                    received.append(line)
        assert any(line.startswith("data: {") for line in received) and "data: [DONE]" not in received
        with pytest.raises(httpx.TransportError):
            await client.post(CHAT, json=chat_body(max_tokens=20))


async def test_slow_first_byte_delays_the_answer() -> None:
    async with running(slow_first_byte_s=0.3, **FAST) as (srv, client):
        started = time.perf_counter()
        r = await client.post(CHAT, json=chat_body(max_tokens=2))
    assert r.status_code == 200 and time.perf_counter() - started >= 0.29
    assert srv.sim.stats()["by_fault"] == {"slow_first_byte": 1}


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_answers_at_once_while_the_queue_is_full(status: int) -> None:
    knobs: dict[str, Any] = {"max_num_seqs": 1, "overload_queue_limit": 2, "overload_status": status,
                             "min_tokens": 10, "decode_base_s": 0.01}
    replies: list[tuple[int, float]] = []

    async def call(i: int) -> None:
        started = time.perf_counter()
        r = await client.post(TEXT, json=text_body(f"p{i}", max_tokens=10))
        replies.append((r.status_code, time.perf_counter() - started))

    async with running(**knobs) as (srv, client):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(call, i)
        stats = srv.sim.stats()
    rejected = [t for s, t in replies if s == status]
    assert rejected and stats["by_fault"]["overload"] == len(rejected)
    assert max(t for s, t in replies if s == 200) > max(rejected)  # refused at once, before the work
    assert stats["max_waiting"] <= 2


async def test_crash_answers_503_to_everything_until_restarted() -> None:
    async with running(crash_above_running=3, max_num_seqs=2, min_tokens=20, decode_base_s=0.01) as (srv, client):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(post, client, TEXT, text_body(f"p{i}", max_tokens=20))
        after = await client.post(TEXT, json=text_body("later", max_tokens=2))
        health = await client.get(f"http://127.0.0.1:{srv.port}/health")
        stats = srv.sim.stats()
    assert after.status_code == 503 and health.status_code == 503 and stats["crashed"]
    assert stats["by_status"].get("200", 0) < 6 and stats["by_fault"]["crashed"] >= 2


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match="fail_429_rate"):
        SimConfig(fail_429_rate=1.5)
    with pytest.raises(ConfigError, match="overload_status"):
        SimConfig(overload_status=500)
    with pytest.raises(ConfigError, match="go together"):
        SimConfig(capacity_change_after_s=1.0)


# --- the command line


def two_command_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def other() -> None:
        """A neighbour command, as in the main CLI."""

    register(app)
    return app


def test_serve_sim_registers_beside_other_commands_with_an_option_per_knob() -> None:
    runner = CliRunner()
    app = two_command_app()
    assert "serve-sim" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["serve-sim", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in SimConfig.__dataclass_fields__:
        flag = "--metrics" if name == "metrics_enabled" else "--" + name.replace("_", "-")
        assert flag in result.output, flag
    assert ENGINE in result.output and "--port-file" in result.output


def test_serve_sim_reports_a_bad_config_with_exit_2() -> None:
    result = CliRunner().invoke(two_command_app(), ["serve-sim", "--fail-429-rate", "2"])
    assert result.exit_code == 2 and "fail_429_rate" in result.output


def test_start_sim_runs_the_server_as_a_process_and_sigterm_stops_it_cleanly() -> None:
    with start_sim("--max-num-seqs", "2") as sim:
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        r = httpx.post(sim.base_url + TEXT, json=text_body(max_tokens=3), timeout=5.0)
        assert r.status_code == 200
        stats = sim.stats()
        assert stats["requests_total"] == 1 and stats["max_num_seqs"] == 2
        assert b"vllm:num_requests_running" in sim.get("/metrics")
        # A request left hanging must not keep the server from stopping.
        with socket.create_connection(("127.0.0.1", sim.port)) as hanging:
            hanging.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            sim.proc.terminate()
            assert sim.proc.wait(timeout=8) == 0
