"""Shared gates every attempt passes before it is sent: the 429 cool-down and the rpm/tpm buckets.

A 429 pauses all workers for the hinted time, not just the one request, so a storm of 429s is not
answered with more requests. The clock is a parameter so the rules are testable without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


class CoolDown:
    """A shared pause. ``trip(s)`` extends it; ``wait()`` returns once it has passed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self.until = 0.0
        self.trips = 0

    def trip(self, seconds: float) -> None:
        until = self._clock() + max(0.0, seconds)
        if until > self.until:
            self.until = until
            self.trips += 1

    def remaining_s(self) -> float:
        return max(0.0, self.until - self._clock())

    async def wait(self) -> None:
        # Re-check after each sleep: another 429 may have extended the pause meanwhile.
        while (left := self.until - self._clock()) > 0:
            await self._sleep(left)


class TokenBucket:
    """A bucket of ``rate_per_min`` units refilled continuously, holding at most one minute's worth.

    ``take(n)`` returns the seconds to wait before ``n`` units are available and reserves them
    (the level may go negative: later callers queue behind earlier ones). ``give_back(n)`` returns
    units when an estimate was too high; ``take(n)`` with a negative n charges an underestimate.
    """

    def __init__(self, rate_per_min: float, clock: Callable[[], float] = time.monotonic,
                 burst: float | None = None) -> None:
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
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate_per_s

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + n)
