"""Shared gates every attempt passes before it is sent: the circuit breaker, the rpm/tpm buckets and the
429 cool-down.

They are shared by all workers because the thing they protect, the server, is shared: a 429 pauses every
worker, and a server that stopped answering gets one probe at a time, not one per worker. The clock (and,
for the waits, the sleep) are parameters, so the rules are testable without sleeping.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable

import anyio

# Consecutive "server is not serving" failures (no answer in between) that open the breaker. Small, because
# the first wave after an outage already brings one failure per worker; an occasional flaky failure among
# answers never reaches it (any answer resets the count).
BREAKER_OPEN_AFTER_FAILURES = 3
# Workers held back by a 429 pause go again spread over this share of the pause after it ends.
COOLDOWN_SPREAD = 0.5


class CoolDown:
    """A shared pause. ``trip(s)`` extends it; ``wait()`` returns once it has passed.

    Whoever had to wait is let go at a random moment within ``spread`` times the pause after its end,
    not all at the same instant: the workers a pause held back, released together, would be the very
    burst an overloaded server has just refused (and would refuse again, pausing everyone again).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
                 rand: Callable[[], float] = random.random, spread: float = COOLDOWN_SPREAD) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self.spread = spread
        self.until = 0.0
        self.length_s = 0.0  # the hint that set the pause in force
        self.trips = 0

    def trip(self, seconds: float) -> None:
        now = self._clock()
        until = now + max(0.0, seconds)
        if until > self.until:
            self.length_s = until - now
            self.until = until
            self.trips += 1

    def remaining_s(self) -> float:
        return max(0.0, self.until - self._clock())

    async def wait(self) -> None:
        # Re-check after each sleep: another 429 may have extended the pause meanwhile.
        while (left := self.until - self._clock()) > 0:
            await self._sleep(left)
            if self.until <= self._clock() and self.spread > 0:
                await self._sleep(self._rand() * self.spread * self.length_s)


class TokenBucket:
    """A bucket of ``rate_per_min`` units refilled continuously, holding at most ``burst`` units
    (default: one second's worth, at least 1).

    ``take(n)`` returns the seconds to wait before ``n`` units are available and reserves them (the level
    may go negative: later callers queue behind earlier ones, so no caller starves). ``correct(estimate,
    actual)`` settles a reservation once the real cost is known: an overestimate is given back (never above
    ``burst``), an underestimate is charged to whoever comes next.
    """

    def __init__(self, rate_per_min: float, clock: Callable[[], float] = time.monotonic,
                 burst: float | None = None) -> None:
        if rate_per_min <= 0:
            raise ValueError("rate_per_min must be positive")
        self.rate_per_s = rate_per_min / 60.0
        self.capacity = burst if burst is not None else max(1.0, rate_per_min / 60.0)
        self._clock = clock
        self.level = self.capacity
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate_per_s)
        self._t = now

    def take(self, n: float) -> float:
        self._refill()
        self.level -= max(0.0, n)
        return 0.0 if self.level >= 0 else -self.level / self.rate_per_s

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + max(0.0, n))

    def correct(self, estimate: float, actual: float) -> None:
        if actual >= estimate:
            self._refill()
            self.level -= actual - estimate
        else:
            self.give_back(estimate - actual)


class CircuitBreaker:
    """Keeps a server that stopped answering from being hammered by every worker at once.

    Closed (the normal state): every attempt goes. After ``open_after`` consecutive unavailability failures
    (no connection, timeouts, 5xx: see ``retry.is_unavailability``) with no answer in between, it opens:
    then one attempt at a time, the probe, is let through, the n-th probe ``delay_s(n)`` after the previous
    one failed, while every other attempt waits. Any answer closes it again, a 429 or a 400 included: they
    show a live server. So while the server is down, attempts follow the backoff, not the number of workers
    or rows.

    ``down_since`` is when the current run of failures began (the start of its earliest attempt, but never
    before the last answer); with ``window_s``, the last probe is moved up to ``down_since + window_s`` so
    the caller learns right at the end of the window whether the server is still down.
    """

    def __init__(self, delay_s: Callable[[int], float], *, open_after: int = BREAKER_OPEN_AFTER_FAILURES,
                 window_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self._delay_s = delay_s
        self.open_after = max(1, open_after)
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self.failures = 0  # consecutive, since the last answer
        self.failed_probes = 0
        self.down_since: float | None = None
        self.next_probe_at = 0.0
        self.probe: int | None = None  # the ticket of the probe in flight
        self._tickets = 0
        self._last_answer_at = clock()
        self._changed: anyio.Event | None = None  # made on first wait: an Event needs a running loop

    @property
    def is_open(self) -> bool:
        return self.failures >= self.open_after

    def poll(self) -> tuple[int | None, float]:
        """One decision, without waiting: ``(ticket, 0)`` go now (ticket None: closed, no report needed;
        else: go as the probe), or ``(None, s)``: ask again within ``s`` seconds (inf: once something
        changes)."""
        if not self.is_open:
            return None, 0.0
        if self.probe is not None:
            return None, math.inf
        left = self.next_probe_at - self._clock()
        if left > 0:
            return None, left
        self._tickets += 1
        self.probe = self._tickets
        return self.probe, 0.0

    async def enter(self) -> int | None:
        """Wait until an attempt may go; a ticket when it goes as the probe, for ``failure``/``release``."""
        while True:
            ticket, wait = self.poll()
            if wait <= 0:
                return ticket
            await self._wait_for_change(wait)

    async def _wait_for_change(self, seconds: float) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        if math.isinf(seconds):
            await changed.wait()
            return
        async with anyio.create_task_group() as tg:
            async def timer() -> None:
                await self._sleep(seconds)
                tg.cancel_scope.cancel()

            async def event() -> None:
                await changed.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            tg.start_soon(event)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def answered(self) -> None:
        """The server answered (whatever it said): close."""
        was_open = self.is_open or self.probe is not None
        self.failures = 0
        self.failed_probes = 0
        self.down_since = None
        self.probe = None
        self._last_answer_at = self._clock()
        if was_open:
            self._notify()

    def failure(self, started_at: float, ticket: int | None = None) -> None:
        """An attempt begun at ``started_at`` found the server not serving."""
        now = self._clock()
        since = max(started_at, self._last_answer_at)
        self.down_since = since if self.down_since is None else min(self.down_since, since)
        self.failures += 1
        opened = self.failures == self.open_after
        if ticket is not None and ticket == self.probe:
            self.probe = None
            self.failed_probes += 1
            self._schedule(now, self.failed_probes + 1)
        elif opened:
            self._schedule(now, 1)

    def release(self, ticket: int | None) -> None:
        """The probe was never sent (the run stopped first): let another attempt probe."""
        if ticket is not None and ticket == self.probe:
            self.probe = None
            self._notify()

    def _schedule(self, now: float, probe_number: int) -> None:
        at = now + max(0.0, self._delay_s(probe_number))
        if self.window_s is not None and self.down_since is not None:
            at = max(now, min(at, self.down_since + self.window_s))
        self.next_probe_at = at
        self._notify()
