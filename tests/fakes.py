"""Fakes for unit tests of pure logic: a scripted transport, an in-memory sink, a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import orjson

from gptoss_batch.errors import OutputError, TransportError
from gptoss_batch.records import Completion, Result, Route, Row, Usage


@dataclass
class FakeClock:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await anyio.sleep(0)


@dataclass
class FakeTransport:
    """Answers at once (after yielding); ``script`` maps a prompt to a list of errors to raise first."""

    script: dict[str, list[TransportError]] = field(default_factory=dict)
    delay: Callable[[], float] | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    calls: list[tuple[Route, dict[str, object]]] = field(default_factory=list)

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        data = orjson.loads(body)
        self.calls.append((route, data))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await anyio.sleep(self.delay() if self.delay else 0)
            key = data.get("prompt") or data["messages"][-1]["content"]
            errors = self.script.get(key)
            if errors:
                raise errors.pop(0)
            return Completion(text=f"echo {key}", finish_reason="stop", usage=Usage(3, 5, 8), model="fake")
        finally:
            self.in_flight -= 1


@dataclass
class MemorySink:
    results: list[Result] = field(default_factory=list)
    fail_after: int | None = None

    def write(self, result: Result) -> None:
        if self.fail_after is not None and len(self.results) >= self.fail_after:
            raise OutputError("disk full (fake)")
        self.results.append(result)


def rows(n: int, *, prefix: str = "p") -> list[Row]:
    return [Row(id=f"r{i}", index=i, line=i + 1, payload={"prompt": f"{prefix}{i}"}) for i in range(n)]
