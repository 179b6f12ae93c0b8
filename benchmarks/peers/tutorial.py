"""The approach most asyncio/aiohttp tutorials teach for "send many prompts concurrently", kept faithful:
read every prompt into a list, create one coroutine per prompt up front, each taking an
``asyncio.Semaphore(max_concurrent)`` around ``session.post(json=...)``, ``asyncio.gather`` them all, keep
the results in a list and write them out at the end. Plain ``asyncio.run`` (tutorials do not add uvloop);
the connector's limit is raised to ``max_concurrent`` (aiohttp's default of 100 would cap it otherwise).

It holds every row, coroutine and result in memory at once, so its memory grows with the input.
``--stub`` swaps the aiohttp session for one that answers at once (after one trip through the event loop),
keeping everything else: the memory benchmark measures the approach without a server.

    python -m benchmarks.peers.tutorial INPUT OUTPUT --base-url URL --concurrency N [--stub]
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp

from benchmarks.peers.common import LoopMeter, chat_body, parse_args

_ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok."}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}}


class _StubResponse:
    status = 200

    async def __aenter__(self) -> _StubResponse:
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def json(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(json.dumps(_ANSWER))  # a fresh object, as a parsed body is
        return answer

    async def text(self) -> str:
        return json.dumps(_ANSWER)


class _StubSession:
    """Stands in for aiohttp.ClientSession: ``post`` answers at once."""

    async def __aenter__(self) -> _StubSession:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def post(self, url: str, json: Any = None) -> _StubResponse:
        return _StubResponse()


async def process(session: Any, sem: asyncio.Semaphore, url: str, row: dict[str, Any]) -> dict[str, Any]:
    async with sem, session.post(url, json=chat_body(row["prompt"])) as resp:
        if resp.status != 200:
            return {"id": row.get("id"), "status": resp.status, "error": await resp.text()}
        data = await resp.json()
        return {"id": row.get("id"), "status": resp.status, "text": data["choices"][0]["message"]["content"]}


async def run(input_path: str, output_path: str, base_url: str, max_concurrent: int,
              stub: bool = False) -> tuple[int, int]:
    with open(input_path) as f:  # noqa: ASYNC230 - as the tutorials write it
        rows = [json.loads(line) for line in f if line.strip()]
    sem = asyncio.Semaphore(max_concurrent)
    url = f"{base_url}/chat/completions"
    session = _StubSession() if stub else aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_concurrent))
    async with session:
        tasks = [process(session, sem, url, row) for row in rows]
        results = await asyncio.gather(*tasks)
    with open(output_path, "w") as out:  # noqa: ASYNC230 - as the tutorials write it
        for result in results:
            out.write(json.dumps(result) + "\n")
    return len(results), sum(1 for r in results if r["status"] == 200)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m benchmarks.peers.tutorial", "The tutorial's gather-everything approach.", argv)
    meter = LoopMeter()
    requests, ok = asyncio.run(run(args.input, args.output, args.base_url, args.concurrency, args.stub))
    meter.report(requests, ok).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
