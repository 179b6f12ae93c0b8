"""The run loop: rows in, results out, at most N requests in flight.

An anyio task group of workers takes rows only as fast as they free up (backpressure): straight from the
shared row iterator for a file, through a zero-buffer stream when a pacer, a reorder buffer or a blocking
reader (stdin) sits in between. Each attempt holds the shared ``CapacityLimiter`` that the adaptive
controller resizes. The runner owns the interfaces it needs (``Transport``, ``Sink``) and knows nothing
of aiohttp, files or terminals.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from gptoss_batch.body import BodyBuilder
from gptoss_batch.config import RunConfig
from gptoss_batch.errors import InputError, OutputError, TransportError
from gptoss_batch.limits import CircuitBreaker, CoolDown, TokenBucket
from gptoss_batch.records import Attempt, Completion, ErrorInfo, Result, Route, Row
from gptoss_batch.retry import backoff_delay_s, is_retryable, is_unavailability, retry_wait_s
from gptoss_batch.stats import stream_timings


class Transport(Protocol):
    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion: ...


class Sink(Protocol):
    def write(self, result: Result) -> None:
        """Persist one result line; raise OutputError when that is impossible."""


@dataclass
class RunState:
    """Live counters, read by progress displays on their own timer (never per row)."""

    total: int | None = None
    skipped: int = 0
    started: int = 0
    in_flight: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    attempts: int = 0  # requests actually sent
    retries: int = 0
    limit: int = 0
    limit_reason: str = ""
    stop_reason: str | None = None
    started_at: float = field(default_factory=time.perf_counter)


@dataclass
class RunOutcome:
    state: RunState
    wall_s: float
    interrupted: bool = False
    input_error: InputError | None = None
    output_error: OutputError | None = None
    unavailable: bool = False

    @property
    def stop_reason(self) -> str | None:
        return self.state.stop_reason


class Runner:
    """One batch run. ``run(rows)`` returns when every row has a result or the run was stopped."""

    def __init__(
        self,
        cfg: RunConfig,
        transport: Transport,
        sink: Sink,
        *,
        on_result: Callable[[Result], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        run_number: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.sink = sink
        self.on_result = on_result
        self.clock = clock
        self.wall_clock = wall_clock
        self.rand = rand
        self.sleep = sleep
        self.run_number = run_number
        self.builder = BodyBuilder(cfg)
        self.limiter = anyio.CapacityLimiter(cfg.concurrency)
        self.cooldown = CoolDown(clock=clock, sleep=sleep, rand=rand)
        self.rpm = TokenBucket(cfg.rpm, clock=clock) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm, clock=clock, burst=cfg.tpm / 6) if cfg.tpm else None
        self.state = RunState(limit=cfg.concurrency, started_at=clock())
        self._stop = anyio.Event()
        self._work_scope = anyio.CancelScope()
        self._produce_scope = anyio.CancelScope()
        self._outcome = RunOutcome(self.state, 0.0)
        # While the server seems down, one probe at a time, spaced by the backoff with equal jitter (half
        # fixed, half random): a bounded, predictable number of attempts however many workers there are.
        self.breaker = CircuitBreaker(
            lambda n: backoff_delay_s(n, cfg.retry, lambda: 0.5 + 0.5 * self.rand()),
            window_s=cfg.retry.unavailable_after_s, clock=clock, sleep=sleep)
        self._waits: set[anyio.CancelScope] = set()  # waits that a stop cuts short (see _stoppable)
        self.on_limit_change: Callable[[int, str], None] | None = None
        # Open-loop arrivals (sweep --rates): awaited before each row is handed to a worker, so rows
        # arrive on the pacer's schedule rather than as workers free up.
        self.pace: Callable[[], Awaitable[None]] | None = None
        # Ordered output (sink.OrderedSink.admit): awaited before a row starts, so a bounded reorder
        # buffer can hold reading back instead of growing.
        self.admit: Callable[[Row], Awaitable[None]] | None = None
        # Adaptive concurrency (adaptive.py): told of every attempt as (sent, answered, completion, error,
        # stream timings), before its result is written.
        self.on_attempt: Callable[[float, float, Completion | None, TransportError | None, dict[str, Any]],
                                  None] | None = None

    # -- control ---------------------------------------------------------------------------------

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """Stop reading rows; in-flight requests finish (bounded by the drain timeout)."""
        if self.state.stop_reason is None:
            self.state.stop_reason = reason
        self._outcome.interrupted = self._outcome.interrupted or interrupted
        self._stop.set()
        for scope in list(self._waits):
            scope.cancel()

    def abort(self) -> None:
        """Cancel in-flight requests at once (second Ctrl-C, drain timeout, deadline)."""
        self._work_scope.cancel()

    def set_limit(self, limit: int, reason: str) -> None:
        limit = max(1, min(limit, self.cfg.worker_count))
        if limit != self.limiter.total_tokens:
            self.limiter.total_tokens = limit
            self.state.limit = limit
            self.state.limit_reason = reason
            if self.on_limit_change is not None:
                self.on_limit_change(limit, reason)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- the run ---------------------------------------------------------------------------------

    async def run(self, rows: Iterable[Row], *, threaded_reads: bool = False) -> RunOutcome:
        """Process ``rows``. ``threaded_reads`` reads each row in a worker thread (for stdin/pipes,
        where a read may block for a long time and must not freeze the event loop)."""
        t0 = self.clock()
        # A file's rows come without blocking, so with nothing to await between rows (no pacer, no reorder
        # buffer) each free worker takes the next row itself: the same backpressure as the stream, without
        # its two event-loop hand-offs per row (about a third of the runner's own CPU per row).
        direct = not threaded_reads and self.pace is None and self.admit is None
        async with anyio.create_task_group() as guards:
            guards.start_soon(self._drain_guard)
            if self.cfg.deadline_s is not None:
                guards.start_soon(self._deadline, self.cfg.deadline_s)
            with self._work_scope:
                async with anyio.create_task_group() as tg:
                    if direct:
                        shared = iter(rows)
                        for _ in range(self.cfg.worker_count):
                            tg.start_soon(self._pull_worker, shared)
                    else:
                        send, recv = anyio.create_memory_object_stream[Row](0)
                        for _ in range(self.cfg.worker_count):
                            tg.start_soon(self._worker, recv.clone())
                        recv.close()
                        await self._produce(iter(rows), send, threaded_reads)
            guards.cancel_scope.cancel()  # the work is over: the guards have nothing left to guard
        self._outcome.wall_s = self.clock() - t0
        return self._outcome

    async def _produce(self, rows: Iterator[Row], send: anyio.abc.ObjectSendStream[Row], threaded: bool) -> None:
        async with send:
            with self._produce_scope:
                while not self._stop.is_set():
                    try:
                        row = await anyio.to_thread.run_sync(next, rows, None) if threaded else next(rows, None)
                    except InputError as exc:
                        self._outcome.input_error = exc
                        self.stop(f"input error: {exc}")
                        break
                    if row is None:
                        break
                    if self.pace is not None:
                        await self.pace()
                    if self.admit is not None:
                        await self.admit(row)
                    await send.send(row)
                    self.state.started += 1

    async def _drain_guard(self) -> None:
        """Once a stop is requested, stop feeding rows; past the drain timeout, cancel what is left."""
        await self._stop.wait()
        self._produce_scope.cancel()
        await self.sleep(self.cfg.drain_timeout_s)
        self.abort()

    async def _deadline(self, seconds: float) -> None:
        await self.sleep(seconds)
        self.stop(f"deadline of {seconds:g}s reached")
        self.abort()

    async def _pull_worker(self, rows: Iterator[Row]) -> None:
        """A worker that reads its next row itself from the iterator all workers share."""
        while not self._stop.is_set():
            try:
                row = next(rows, None)
            except InputError as exc:
                self._outcome.input_error = exc
                self.stop(f"input error: {exc}")
                return
            if row is None:
                return
            self.state.started += 1
            result = await self._process(row)
            if result is not None:
                self._finish(result)

    async def _worker(self, recv: MemoryObjectReceiveStream[Row]) -> None:
        async with recv:
            while True:
                # The nowait fast path skips two event-loop round trips per row when a row is ready.
                try:
                    row = recv.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        row = await recv.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                result = await self._process(row)
                if result is not None:
                    self._finish(result)

    def _finish(self, result: Result) -> None:
        try:
            self.sink.write(result)
        except OutputError as exc:
            self._outcome.output_error = exc
            self.stop(f"output error: {exc}")
            self.abort()
            return
        st = self.state
        st.done += 1
        if result.status == "ok":
            st.ok += 1
            st.output_tokens += result.output_tokens
        else:
            st.failed += 1
        if self.on_result is not None:
            self.on_result(result)
        rate = self.cfg.max_error_rate
        if (rate is not None and st.done >= self.cfg.min_error_sample and st.failed / st.done > rate
                and not self.stopping):
            self.stop(f"error rate {st.failed / st.done:.1%} is above --max-error-rate {rate:.1%} "
                      f"after {st.done} rows")

    # -- one row ---------------------------------------------------------------------------------

    @contextmanager
    def _stoppable(self) -> Iterator[None]:
        """A wait (backoff, breaker, rate buckets, cool-down) that ends at once when the run stops."""
        with anyio.CancelScope() as scope:
            if self.stopping:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield
            finally:
                self._waits.discard(scope)

    async def _gate(self, tokens_estimate: float) -> int | None:
        """The shared waits before an attempt, cut short by a stop: the circuit breaker (one probe at a
        time to a server that seems down), then the rpm and tpm buckets. Returns the breaker's ticket when
        this attempt is its probe. The 429 cool-down comes last, in ``_process``, right before the send."""
        if self.rpm is None and self.tpm is None and not self.breaker.is_open:
            return None  # nothing to wait for: skip the cancel scope, the costliest step of a row otherwise
        probe: int | None = None
        with self._stoppable():
            try:
                probe = await self.breaker.enter()
                if self.rpm is not None and (wait := self.rpm.take(1)) > 0:
                    await self.sleep(wait)
                if self.tpm is not None and (wait := self.tpm.take(tokens_estimate)) > 0:
                    await self.sleep(wait)
            except BaseException:
                self.breaker.release(probe)
                raise
        return probe

    def _error_result(self, row: Row, kind: str, message: str, *, status: int | None = None,
                      attempts: int = 0, latency_s: float = 0.0, log: tuple[Attempt, ...] = ()) -> Result:
        return Result(id=row.id, index=row.index, status="error", latency_s=latency_s, attempts=attempts,
                      error=ErrorInfo(kind, message, status), attempt_log=log, run=self.run_number,
                      concurrency=self.state.limit)

    async def _acquire_slot(self) -> None:
        """Take a limiter token; the nowait fast path avoids the two checkpoints of ``acquire()``."""
        try:
            self.limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self.limiter.acquire()

    async def _process(self, row: Row) -> Result | None:
        if row.invalid is not None:
            return self._error_result(row, "invalid_input", row.invalid)
        route, body = self.builder.build(row)
        policy = self.cfg.retry
        log: list[Attempt] = []
        # Only the tpm bucket needs it (charged before the send, settled after).
        estimate = _estimate_tokens(body, row, self.cfg.max_tokens) if self.tpm is not None else 0.0
        for attempt in range(1, policy.max_attempts + 1):
            if self.stopping:
                return None  # not written: a resumed run does the row
            probe = await self._gate(estimate)
            await self._acquire_slot()
            if self.cooldown.remaining_s() > 0:  # no cancel scope unless there is a pause to wait out
                with self._stoppable():
                    await self.cooldown.wait()
            if self.stopping:  # it stopped while this attempt waited: it is not sent
                self.limiter.release()
                self.breaker.release(probe)
                return None
            # Nothing awaits between the cool-down check and the send, so a 429 that trips the cool-down
            # from here on finds this request already on its way.
            self.state.attempts += 1
            self.state.in_flight += 1
            t0 = self.clock()
            try:
                completion = await self.transport.send(route, body, stream=self.cfg.stream)
                error: TransportError | None = None
            except TransportError as exc:
                completion, error = None, exc
            except BaseException:
                self.breaker.release(probe)  # cancelled: the probe will never report
                raise
            finally:
                self.state.in_flight -= 1
                self.limiter.release()
            t1 = self.clock()
            timing = _timing(completion, t1)
            if self.on_attempt is not None:
                self.on_attempt(t0, t1, completion, error, timing)
            if completion is not None:
                self._on_success(completion, estimate)
                return self._ok_result(row, completion, timing, t0, t1, attempt, tuple(log))
            assert error is not None
            retryable = is_retryable(error)
            self._on_failure(error, t0, t1, probe)
            if not retryable or attempt == policy.max_attempts or self.stopping:
                return self._error_result(row, error.kind, error.message, status=error.status,
                                          attempts=attempt, latency_s=t1 - t0, log=tuple(log))
            wait, hint = retry_wait_s(error, attempt, policy, rand=self.rand, now=self.wall_clock())
            log.append(Attempt(error.kind, error.status, wait, error.message))
            self.state.retries += 1
            if error.status == 429 or (hint is not None and error.status == 503):
                # The server asked everyone to slow down: pause all workers, not just this one. This row
                # waits in the pause too (in _process, before the send), released with the others.
                self.cooldown.trip(hint if hint is not None else wait)
                continue
            with self._stoppable():
                await self.sleep(wait)
        return None  # unreachable: the loop returns on the last attempt

    def _on_success(self, completion: Completion, estimate: float) -> None:
        self.breaker.answered()
        if self.tpm is not None and completion.usage is not None:
            # Settle the estimate with what the server actually counted.
            self.tpm.correct(estimate, completion.usage.total_tokens)

    def _on_failure(self, error: TransportError, started: float, now: float, probe: int | None) -> None:
        if not is_unavailability(error):
            self.breaker.answered()  # a 429, a 400 or a broken body: the server is up
            return
        self.breaker.failure(started, probe)
        down = self.breaker.down_since
        window = self.cfg.retry.unavailable_after_s
        if down is not None and now - down >= window and not self.stopping:
            since = time.strftime("%H:%M:%S", time.localtime(self.wall_clock() - (now - down)))
            self._outcome.unavailable = True
            self.stop(f"server unreachable since {since}: no answer for {now - down:.0f}s "
                      f"({self.state.attempts} attempts sent); last error: {error.message}")

    def _ok_result(self, row: Row, c: Completion, timing: dict[str, Any], t0: float, t1: float, attempts: int,
                   log: tuple[Attempt, ...]) -> Result:
        if not timing:  # not streamed: no timings
            return Result(
                id=row.id, index=row.index, status="ok", text=c.text, finish_reason=c.finish_reason,
                usage=c.usage, model=c.model, latency_s=t1 - t0, attempts=attempts,
                concurrency=self.state.limit, attempt_log=log, run=self.run_number, reasoning=c.reasoning)
        source = timing.get("output_tokens_source")
        return Result(
            id=row.id, index=row.index, status="ok", text=c.text, finish_reason=c.finish_reason,
            usage=c.usage, model=c.model, latency_s=t1 - t0, attempts=attempts,
            ttft_s=timing.get("ttft_s"), tpot_s=timing.get("tpot_s"), itl_s=timing.get("itl_s"),
            output_tokens_source=source,
            concurrency=self.state.limit, attempt_log=log, run=self.run_number, reasoning=c.reasoning,
            # No usage: the line still says how many output tokens were counted (chunks).
            extra={"output_tokens": timing["output_tokens"]} if source == "chunks" else {},
        )


def _timing(c: Completion | None, end: float) -> dict[str, Any]:
    """A streamed answer's TTFT, TPOT and ITL (stats.stream_timings); empty when there is nothing to time."""
    if c is None or c.started_at is None or not c.chunk_times:
        return {}
    # The transport's perf_counter() times; ``end`` (the runner's clock, the same one in a real run) ends it.
    return stream_timings(c.started_at, c.chunk_times, end, c.usage.completion_tokens if c.usage else None)


def _estimate_tokens(body: bytes, row: Row, default_max_tokens: int | None) -> float:
    """Prompt tokens by the 4-bytes-per-token rule of thumb, plus the requested output budget.

    Only --tpm uses it, and the bucket is settled with the server's own ``usage`` after each answer, so a
    rough guess costs nothing but a little early slack. (tiktoken would guess closer, but it downloads its
    vocabulary on first use: a surprise for a batch job on a closed network, so it is not used.)
    """
    max_tokens = row.payload.get("max_tokens", row.payload.get("max_completion_tokens", default_max_tokens))
    out = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 256
    return math.ceil(len(body) / 4) + out
