"""The shared gates: the 429 cool-down, the rpm/tpm token buckets and the circuit breaker, alone and
inside the runner, on virtual time (no test here sleeps for real)."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import orjson
import pytest

from gptoss_batch.config import RetryPolicy, RunConfig
from gptoss_batch.errors import ConnectError, HTTPStatusError, TransportError
from gptoss_batch.limits import BREAKER_OPEN_AFTER_FAILURES, CircuitBreaker, CoolDown, TokenBucket
from gptoss_batch.records import Completion, Route, Usage
from gptoss_batch.runner import Runner
from tests.fakes import FakeClock, MemorySink, rows
from tests.virtual_time import VirtualTime


def max_in_window(times: list[float], window_s: float) -> int:
    """The most events that fall in any half-open window [t, t + window_s)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- CoolDown ------------------------------------------------------------------------------------


def test_cooldown_trip_extends_but_never_shortens_the_pause() -> None:
    clock = FakeClock(now=0.0)
    cd = CoolDown(clock=clock)
    cd.trip(5)
    cd.trip(2)  # a shorter hint arriving later does not cut the pause short
    assert cd.remaining_s() == 5 and cd.trips == 1
    clock.now = 4
    cd.trip(3)
    assert cd.remaining_s() == 3 and cd.trips == 2
    cd.trip(-1)
    assert cd.remaining_s() == 3


@pytest.mark.anyio
async def test_cooldown_wait_rechecks_after_an_extension() -> None:
    clock = FakeClock(now=0.0)
    cd = CoolDown(clock=clock, sleep=clock.sleep, spread=0.0)
    cd.trip(2)
    real_sleep = clock.sleep

    async def sleep_and_extend(s: float) -> None:
        await real_sleep(s)
        if clock.now == 2:
            cd.trip(3)  # another 429 arrived meanwhile

    cd._sleep = sleep_and_extend
    await cd.wait()
    assert clock.now == 5 and clock.sleeps == [2, 3]


@pytest.mark.anyio
async def test_cooldown_lets_its_waiters_go_spread_over_half_the_pause_after_it() -> None:
    vt = VirtualTime(start=0.0)
    cd = CoolDown(clock=vt, sleep=vt.sleep, rand=random.Random(3).random)
    released: list[float] = []

    async def main() -> None:
        async def waiter() -> None:
            await cd.wait()
            released.append(vt.now)

        cd.trip(4)
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(waiter)

    await vt.run(main)
    assert all(4.0 <= t <= 6.0 for t in released)
    assert max(released) - min(released) > 1.5  # spread out, not one burst
    await cd.wait()  # no pause in force: no wait at all
    assert vt.now == max(released)


# -- TokenBucket ---------------------------------------------------------------------------------


def test_bucket_allows_its_burst_then_spaces_requests_by_the_rate() -> None:
    clock = FakeClock(now=0.0)
    bucket = TokenBucket(600, clock=clock)  # 10 per second, burst of 10
    assert [bucket.take(1) for _ in range(10)] == [0.0] * 10
    waits = [bucket.take(1) for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])  # reservations queue one behind another


def test_bucket_burst_is_at_least_one_unit_for_slow_rates() -> None:
    bucket = TokenBucket(6, clock=FakeClock(now=0.0))  # one request per 10 s
    assert bucket.take(1) == 0.0
    assert bucket.take(1) == pytest.approx(10.0)


def test_bucket_corrects_an_estimate_both_ways_and_never_overfills() -> None:
    clock = FakeClock(now=0.0)
    bucket = TokenBucket(6000, clock=clock, burst=1000)  # 100 tokens/s
    bucket.take(500)
    bucket.correct(500, 200)  # overestimated: 300 come back
    assert bucket.level == pytest.approx(800)
    bucket.correct(100, 1000)  # underestimated by 900: whoever comes next pays
    assert bucket.level == pytest.approx(-100)
    assert bucket.take(0) == pytest.approx(1.0)
    clock.now = 1000
    bucket.correct(0, -5000)  # nonsense usage cannot push it above its burst
    bucket.give_back(10_000)
    assert bucket.level == pytest.approx(1000)


def test_bucket_rejects_a_rate_of_zero() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.parametrize("rpm", [60, 600, 6000])
def test_rpm_bucket_holds_the_rate_within_5_percent_over_any_30s_window(rpm: float) -> None:
    """32 simulated workers with random latencies hammer one bucket for 5 minutes of fake time."""
    clock = FakeClock(now=0.0)
    bucket = TokenBucket(rpm, clock=clock)
    rng = random.Random(7)
    ready = [(0.0, w) for w in range(32)]  # (time the worker asks, worker)
    sends: list[float] = []
    while ready:
        t, w = heapq.heappop(ready)
        clock.now = t
        send_at = t + bucket.take(1)
        if send_at > 300:
            continue
        sends.append(send_at)
        heapq.heappush(ready, (send_at + rng.uniform(0.01, 0.2), w))
    assert max_in_window(sends, 30.0) <= 1.05 * rpm / 2
    assert len(sends) >= 0.95 * rpm * 5  # and the rate is reached, not just respected


# -- CircuitBreaker ------------------------------------------------------------------------------


def delays(n: int) -> float:
    return float(2 ** (n - 1))  # 1, 2, 4, ... s: easy to read in assertions


def test_breaker_lets_everything_through_until_failures_in_a_row() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(delays, open_after=3, clock=clock)
    for _ in range(2):
        assert br.poll() == (None, 0.0)
        br.failure(started_at=clock.now)
    br.answered()  # any answer resets the count
    br.failure(0.0)
    br.failure(0.0)
    assert not br.is_open and br.poll() == (None, 0.0)
    br.failure(0.0)
    assert br.is_open


def test_open_breaker_lets_one_probe_at_a_time_on_the_backoff_schedule() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(delays, open_after=3, clock=clock)
    for _ in range(3):
        br.failure(0.0)
    assert br.poll() == (None, 1.0)  # the first probe one delay after it opened
    clock.now = 1.0
    ticket, wait = br.poll()
    assert ticket is not None and wait == 0.0
    assert br.poll() == (None, math.inf)  # the others wait on the probe
    clock.now = 1.5
    br.failure(1.0, ticket)
    assert br.poll() == (None, 2.0)  # the second probe waits twice as long
    clock.now = 3.5
    second, _ = br.poll()
    assert second is not None and second != ticket
    br.answered()
    assert not br.is_open and br.poll() == (None, 0.0) and br.probe is None


def test_failures_of_attempts_sent_before_it_opened_do_not_reschedule_the_probe() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(delays, open_after=3, clock=clock)
    for _ in range(3):
        br.failure(0.0)
    clock.now = 0.5
    for _ in range(29):  # the rest of the first wave comes back
        br.failure(0.0)
    assert br.next_probe_at == 1.0


def test_a_probe_that_was_never_sent_frees_the_slot_and_stale_tickets_are_ignored() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(lambda n: 0.0, open_after=1, clock=clock)
    br.failure(0.0)
    first, _ = br.poll()
    br.release(first)
    second, _ = br.poll()
    assert second is not None and second != first
    br.release(first)  # stale: the second probe is still out
    assert br.probe == second
    br.failure(0.0, first)  # a stale ticket's failure does not end the live probe
    assert br.probe == second


def test_down_since_is_the_earliest_failed_attempt_but_never_before_the_last_answer() -> None:
    clock = FakeClock(now=10.0)
    br = CircuitBreaker(delays, clock=clock)
    br.answered()  # at 10
    clock.now = 20.0
    br.failure(started_at=5.0)  # began before the answer at 10: the server was up then
    assert br.down_since == 10.0
    br.answered()
    clock.now = 30.0
    br.failure(started_at=25.0)
    br.failure(started_at=22.0)
    assert br.down_since == 22.0


def test_the_last_probe_is_moved_up_to_the_end_of_the_window() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(lambda n: 100.0, open_after=1, window_s=30.0, clock=clock)
    br.failure(started_at=0.0)
    assert br.next_probe_at == 30.0


@pytest.mark.anyio
async def test_waiters_wake_when_the_breaker_closes() -> None:
    vt = VirtualTime(start=0.0)
    br = CircuitBreaker(lambda n: 50.0, open_after=1, clock=vt, sleep=vt.sleep)
    br.failure(0.0)
    woke: list[float] = []

    async def main() -> None:
        async def waiter() -> None:
            await br.enter()
            woke.append(vt.now)

        async def answer_at_5() -> None:
            await vt.sleep(5)
            br.answered()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            tg.start_soon(answer_at_5)

    await vt.run(main)
    assert woke == [5.0, 5.0, 5.0]  # closed at 5: nobody waited for the probe time of 50


# -- inside the runner, on virtual time ------------------------------------------------------------


@dataclass
class VirtualServer:
    """A Transport on virtual time: answers after ``latency_s``; ``fail(n, now)`` may raise instead."""

    vt: VirtualTime
    latency_s: float = 0.2
    fail: Callable[[int, float], TransportError | None] = lambda n, now: None
    usage_tokens: int = 100
    sends: list[float] = field(default_factory=list)
    tokens: list[tuple[float, int]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        n = len(self.sends)
        self.sends.append(self.vt.now)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            error = self.fail(n, self.vt.now)
            await self.vt.sleep(self.latency_s)
            if error is not None:
                raise error
            self.tokens.append((self.vt.now, self.usage_tokens))
            prompt = orjson.loads(body)["messages"][-1]["content"]
            return Completion(text=f"echo {prompt}", finish_reason="stop",
                              usage=Usage(self.usage_tokens - 10, 10, self.usage_tokens), model="v")
        finally:
            self.in_flight -= 1


def virtual_runner(cfg: RunConfig, server: VirtualServer, sink: MemorySink, seed: int = 1) -> Runner:
    vt = server.vt
    return Runner(cfg, server, sink, clock=vt, wall_clock=vt, rand=random.Random(seed).random, sleep=vt.sleep)


@pytest.mark.anyio
async def test_runner_holds_rpm_within_5_percent_over_any_30s_window() -> None:
    vt = VirtualTime()
    server = VirtualServer(vt, latency_s=0.5)
    sink = MemorySink()
    runner = virtual_runner(RunConfig(concurrency=32, rpm=600), server, sink)
    await vt.run(lambda: runner.run(rows(1000)))
    assert len(sink.results) == 1000 and all(r.ok for r in sink.results)
    assert max_in_window(server.sends, 30.0) <= 1.05 * 300
    assert vt.now - 1000 == pytest.approx(100, rel=0.05)  # 1000 requests at 10/s: the rate is used, too


@pytest.mark.anyio
async def test_rpm_tpm_and_concurrency_bounds_hold_at_once() -> None:
    vt = VirtualTime()
    server = VirtualServer(vt, latency_s=2.0, usage_tokens=100)
    sink = MemorySink()
    # Each bound alone would allow: concurrency 8 / 2 s = 240 rpm; rpm 180; tpm 12,000 / 100 = 120 rpm.
    cfg = RunConfig(concurrency=8, rpm=180, tpm=12_000, max_tokens=10)
    runner = virtual_runner(cfg, server, sink)
    await vt.run(lambda: runner.run(rows(300)))
    assert all(r.ok for r in sink.results) and len(sink.results) == 300
    assert server.max_in_flight <= 8
    assert max_in_window(server.sends, 30.0) <= 1.05 * 90
    token_times = [t for t, n in server.tokens for _ in range(n // 100)]  # one mark per 100 tokens
    assert max_in_window(token_times, 30.0) * 100 <= 1.05 * 6000 + 2000  # + the tpm burst (10 s worth)
    minutes = (vt.now - 1000) / 60
    assert 300 / minutes == pytest.approx(120, rel=0.1)  # the tightest bound, tpm, sets the pace


@pytest.mark.anyio
async def test_a_429_pauses_every_worker_for_the_hinted_time() -> None:
    vt = VirtualTime(start=0.0)
    hinted: list[float] = []

    def fail(n: int, now: float) -> TransportError | None:
        if n == 40:
            hinted.append(now + 0.2)  # the 429 reaches the client when the latency has passed
            return HTTPStatusError("HTTP 429: slow down", status=429, headers={"Retry-After": "3"})
        return None

    server = VirtualServer(vt, latency_s=0.2, fail=fail)
    sink = MemorySink()
    runner = virtual_runner(RunConfig(concurrency=16), server, sink)
    await vt.run(lambda: runner.run(rows(200)))
    (t429,) = hinted
    # Requests sent at the very instant the 429 arrived went out before it was read; after that, none.
    assert [t for t in server.sends if t429 + 1e-9 < t < t429 + 3.0] == []
    # Then the 16 workers go again, spread over the next 1.5 s rather than in one burst.
    resumed = sorted(t for t in server.sends if t >= t429 + 3.0)[:16]
    assert resumed[-1] <= t429 + 4.5 and resumed[-1] - resumed[0] > 0.5
    (retried,) = [r for r in sink.results if r.attempts == 2]
    assert [(a.kind, a.status, a.wait_s) for a in retried.attempt_log] == [("http", 429, 3.0)]


def probe_bound(policy: RetryPolicy, window_s: float) -> int:
    """Most probes that fit in the window when each waits at least half its backoff cap (equal jitter),
    plus the one moved up to the window's end."""
    n, t = 0, 0.0
    while True:
        cap = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** n)
        if t + cap / 2 > window_s:
            return n + 1
        t += cap / 2
        n += 1


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 32])
async def test_a_dead_server_gets_attempts_on_the_backoff_not_per_worker_or_row(concurrency: int) -> None:
    vt = VirtualTime()
    server = VirtualServer(vt, latency_s=0.001, fail=lambda n, now: ConnectError("connection refused"))
    sink = MemorySink()
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=8, unavailable_after_s=60)
    runner = virtual_runner(RunConfig(concurrency=concurrency, retry=policy), server, sink)
    outcome = await vt.run(lambda: runner.run(rows(1000)))
    assert outcome.unavailable and outcome.stop_reason is not None
    assert "server unreachable since" in outcome.stop_reason and "connection refused" in outcome.stop_reason
    assert vt.now - 1000 == pytest.approx(60, abs=1)  # ends at the window, not at a backoff later
    # The first wave (one per worker, sent before any failure came back) plus the probes.
    assert len(server.sends) <= concurrency + BREAKER_OPEN_AFTER_FAILURES + probe_bound(policy, 60)
    assert outcome.state.attempts == len(server.sends)
    assert f"({len(server.sends)} attempts sent)" in outcome.stop_reason
    # Rows whose attempts ran out were written as errors; no row was started after the stop.
    assert len(sink.results) <= len(server.sends)
    assert outcome.state.started <= len(sink.results) + concurrency


@pytest.mark.anyio
async def test_without_the_breaker_a_dead_server_would_get_one_retry_stream_per_worker() -> None:
    """The comparison that shows the breaker's worth: attempts with it open vs. the per-row schedule."""
    vt = VirtualTime()
    server = VirtualServer(vt, latency_s=0.001, fail=lambda n, now: ConnectError("connection refused"))
    policy = RetryPolicy(max_attempts=6, backoff_initial_s=0.5, backoff_max_s=8, unavailable_after_s=60)
    runner = virtual_runner(RunConfig(concurrency=32, retry=policy), server, MemorySink())
    runner.breaker.open_after = 10**9  # never opens
    await vt.run(lambda: runner.run(rows(1000)))
    assert len(server.sends) > 5 * (32 + BREAKER_OPEN_AFTER_FAILURES + probe_bound(policy, 60))


@pytest.mark.anyio
async def test_a_server_that_comes_back_closes_the_breaker_and_every_row_ends_ok() -> None:
    vt = VirtualTime()
    back_at = 1000 + 20.0
    server = VirtualServer(vt, latency_s=0.1, fail=lambda n, now: ConnectError("refused") if now < back_at else None)
    sink = MemorySink()
    policy = RetryPolicy(max_attempts=100, backoff_initial_s=0.5, backoff_max_s=4, unavailable_after_s=60)
    runner = virtual_runner(RunConfig(concurrency=16, retry=policy), server, sink)
    outcome = await vt.run(lambda: runner.run(rows(300)))
    assert outcome.stop_reason is None and all(r.ok for r in sink.results) and len(sink.results) == 300
    down = [t for t in server.sends if t < back_at]
    assert len(down) <= 16 + BREAKER_OPEN_AFTER_FAILURES + probe_bound(policy, 20)
    assert min(t for t in server.sends if t >= back_at) < back_at + 4.0  # found within one backoff cap


@pytest.mark.anyio
async def test_a_stop_ends_backoff_and_breaker_waits_at_once() -> None:
    vt = VirtualTime()
    server = VirtualServer(vt, latency_s=0.001, fail=lambda n, now: HTTPStatusError("HTTP 503", status=503))
    sink = MemorySink()
    policy = RetryPolicy(max_attempts=10, backoff_initial_s=30, backoff_max_s=30, unavailable_after_s=300)
    runner = virtual_runner(RunConfig(concurrency=4, retry=policy), server, sink)

    async def main() -> None:
        async def stop_at_5() -> None:
            await vt.sleep(5)
            runner.stop("interrupted by SIGINT", interrupted=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_at_5)
            await runner.run(rows(50))

    await vt.run(main)
    assert vt.now - 1000 == pytest.approx(5, abs=0.01)  # nobody slept out a 30 s backoff
    assert sink.results == []  # the rows waiting to retry are left for a resumed run
