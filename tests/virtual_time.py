"""Virtual time for runner tests: concurrent sleepers wake in order of their deadlines, instantly.

``FakeClock`` in fakes.py advances time by each sleep as it happens, which is right for one task but not
for many sleeping at once. Here a driver task waits until every other task is blocked, then moves the
clock to the earliest deadline and wakes that sleeper: 32 workers over "60 seconds" take milliseconds, and
what each saw at which time is exact. asyncio only (the conftest's anyio backend).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def _all_others_blocked() -> None:
    """Like ``anyio.wait_all_tasks_blocked``, without its 0.1 s real sleeps between checks, and also waiting
    for the loop's pending callbacks (anyio delivers a cancellation through one)."""
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0)
        if loop._ready:  # type: ignore[attr-defined]
            continue
        if all(t is me or (t._fut_waiter is not None and not t._fut_waiter.done())  # type: ignore[attr-defined]
               for t in asyncio.all_tasks()):
            return


class VirtualTime:
    """A clock (call it) and a ``sleep`` for the runner, driven by ``run(main)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.sleep(0)
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), event))
        await event.wait()

    async def run(self, main: Callable[[], Awaitable[T]]) -> T:
        """Run ``main()`` to completion, advancing time whenever everything else waits."""
        result: list[T] = []
        done = anyio.Event()

        async def body() -> None:
            result.append(await main())
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            while not done.is_set():
                await _all_others_blocked()
                if done.is_set():
                    break
                if not self._sleepers:
                    raise RuntimeError("deadlock: every task waits and nobody sleeps")
                at, _, event = heapq.heappop(self._sleepers)
                self.now = max(self.now, at)
                event.set()
        return result[0]
