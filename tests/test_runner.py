"""The runner against a fake transport and an in-memory sink: concurrency, retries, stopping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gptoss_batch.config import RetryPolicy, RunConfig
from gptoss_batch.errors import ConnectError, HTTPStatusError, ProtocolError
from gptoss_batch.records import Row
from gptoss_batch.runner import Runner
from tests.fakes import FakeClock, FakeTransport, MemorySink, rows

pytestmark = pytest.mark.anyio


def make(cfg: RunConfig, transport: FakeTransport, sink: MemorySink, clock: FakeClock | None = None) -> Runner:
    clock = clock or FakeClock()
    return Runner(cfg, transport, sink, clock=clock, wall_clock=clock, rand=lambda: 1.0, sleep=clock.sleep)


async def test_every_row_gets_exactly_one_result() -> None:
    sink, transport = MemorySink(), FakeTransport()
    outcome = await make(RunConfig(concurrency=4), transport, sink).run(rows(50))
    assert sorted(r.id for r in sink.results) == sorted(f"r{i}" for i in range(50))
    assert all(r.status == "ok" and r.text == f"echo p{r.index}" for r in sink.results)
    assert outcome.state.ok == 50 and outcome.stop_reason is None


async def test_concurrency_bound_holds_and_is_reached() -> None:
    transport = FakeTransport(delay=lambda: 0.001)
    await Runner(RunConfig(concurrency=7), transport, MemorySink()).run(rows(100))
    assert transport.max_in_flight == 7


async def test_rows_are_read_only_as_workers_free_up() -> None:
    """Backpressure: the producer never runs more than about N rows ahead of the requests."""
    read = 0
    transport = FakeTransport(delay=lambda: 0.001)
    runner = Runner(RunConfig(concurrency=4), transport, MemorySink())
    ahead: list[int] = []

    def source() -> Iterator[Row]:
        nonlocal read
        for row in rows(200):
            read += 1
            ahead.append(read - len(transport.calls))
            yield row

    await runner.run(source())
    assert max(ahead) <= 4 + 1


async def test_request_body_merges_defaults_and_row_overrides() -> None:
    transport = FakeTransport()
    cfg = RunConfig(model="m", max_tokens=10, temperature=0.7, params={"seed": 1})
    row = Row(id="a", index=0, line=1, payload={"prompt": "hi", "max_tokens": 99})
    await make(cfg, transport, MemorySink()).run([row])
    route, body = transport.calls[0]
    assert route == "chat"
    assert body == {"model": "m", "max_tokens": 99, "temperature": 0.7, "seed": 1,
                    "messages": [{"role": "user", "content": "hi"}]}


async def test_retryable_errors_are_retried_with_capped_backoff() -> None:
    clock = FakeClock()
    transport = FakeTransport(script={"p0": [HTTPStatusError("boom", status=500), ConnectError("reset"),
                                             ProtocolError("bad json")]})
    sink = MemorySink()
    cfg = RunConfig(concurrency=1, retry=RetryPolicy(max_attempts=5, backoff_initial_s=1, backoff_max_s=3))
    await make(cfg, transport, sink, clock).run(rows(1))
    (r,) = sink.results
    assert r.status == "ok" and r.attempts == 4
    assert [a.kind for a in r.attempt_log] == ["http", "connect", "protocol"]
    assert clock.sleeps == [1, 2, 3]  # rand()=1: the full cap, doubling, capped at backoff_max


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_written_at_once_without_retry(status: int) -> None:
    transport = FakeTransport(script={"p0": [HTTPStatusError(f"HTTP {status}: nope", status=status)]})
    sink = MemorySink()
    await make(RunConfig(), transport, sink).run(rows(1))
    (r,) = sink.results
    assert r.status == "error" and r.attempts == 1 and r.error is not None
    assert r.error.status == status and "nope" in r.error.message


async def test_attempts_are_bounded_by_max_attempts() -> None:
    transport = FakeTransport(script={"p0": [HTTPStatusError("x", status=503) for _ in range(10)]})
    sink = MemorySink()
    await make(RunConfig(retry=RetryPolicy(max_attempts=3)), transport, sink).run(rows(1))
    assert sink.results[0].attempts == 3 and len(transport.calls) == 3


async def test_a_429_with_retry_after_trips_the_shared_cooldown_for_the_hinted_time() -> None:
    # That every worker waits in it: test_limits.test_a_429_pauses_every_worker_for_the_hinted_time.
    clock = FakeClock()
    transport = FakeTransport(script={"p0": [HTTPStatusError("slow down", status=429, headers={"Retry-After": "7"})]})
    runner = make(RunConfig(concurrency=4), transport, MemorySink(), clock)
    await runner.run(rows(1))
    assert runner.cooldown.trips == 1
    assert 7 in clock.sleeps


async def test_max_error_rate_stops_the_run_early() -> None:
    transport = FakeTransport(script={f"p{i}": [HTTPStatusError("bad", status=400)] for i in range(1000)})
    sink = MemorySink()
    cfg = RunConfig(concurrency=2, max_error_rate=0.5, min_error_sample=10)
    outcome = await make(cfg, transport, sink).run(rows(1000))
    assert outcome.stop_reason is not None and "error rate" in outcome.stop_reason
    assert 10 <= len(sink.results) < 20


async def test_output_error_stops_the_run_and_is_reported() -> None:
    sink = MemorySink(fail_after=5)
    outcome = await make(RunConfig(concurrency=2), FakeTransport(), sink).run(rows(100))
    assert outcome.output_error is not None
    assert len(sink.results) == 5
    assert len(sink.results) + 2 >= outcome.state.started  # no more rows were started after the failure


async def test_invalid_rows_become_error_lines() -> None:
    sink = MemorySink()
    bad = Row(id="row0-x", index=0, line=1, payload={}, invalid="neither prompt nor messages")
    await make(RunConfig(), FakeTransport(), sink).run([bad])
    (r,) = sink.results
    assert r.status == "error" and r.error is not None and r.error.kind == "invalid_input"


async def test_a_server_that_stays_down_ends_the_run() -> None:
    clock = FakeClock()
    transport = FakeTransport(script={f"p{i}": [ConnectError("refused")] * 100 for i in range(100)})
    cfg = RunConfig(concurrency=2, retry=RetryPolicy(max_attempts=100, unavailable_after_s=30, backoff_max_s=4))
    outcome = await make(cfg, transport, MemorySink(), clock).run(rows(100))
    assert outcome.unavailable and outcome.stop_reason and "unreachable" in outcome.stop_reason
    assert len(transport.calls) < 40
