"""The floor for any aiohttp client doing gptoss-batch's job: ``concurrency`` worker coroutines share one
iterator over the input file; each reads a row, builds the body with orjson, POSTs it, reads and parses
the answer and appends a result line. Nothing else: no retries, no error typing, no progress, no summary.
Python's default garbage-collector settings unless ``--gc-tuned``.

    python -m benchmarks.peers.bare INPUT OUTPUT --base-url URL --concurrency N
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import IO, Any

import aiohttp
import orjson

from benchmarks.peers.common import LoopMeter, chat_body, parse_args, tune_gc


async def run(input_path: str, output_path: str, base_url: str, concurrency: int) -> tuple[int, int]:
    url = f"{base_url}/chat/completions"
    headers = {"Content-Type": "application/json"}
    counts = [0, 0]  # requests, ok

    async def worker(session: aiohttp.ClientSession, rows: IO[bytes], out: IO[bytes]) -> None:
        for line in rows:  # the file object is one iterator shared by every worker
            row = orjson.loads(line)
            async with session.post(url, data=orjson.dumps(chat_body(row["prompt"])), headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
            counts[0] += 1
            result: dict[str, Any] = {"id": row["id"], "status": status}
            if status == 200:
                data = orjson.loads(raw)
                result["text"] = data["choices"][0]["message"]["content"]
                counts[1] += 1
            out.write(orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE))

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    # Plain blocking file objects, as any such script has them (and as gptoss-batch's own reads are).
    with open(input_path, "rb") as rows, open(output_path, "wb") as out:  # noqa: ASYNC230
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(worker(session, rows, out) for _ in range(concurrency)))
    return counts[0], counts[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m benchmarks.peers.bare", "The bare aiohttp worker loop.", argv)
    import uvloop

    if args.gc_tuned:
        tune_gc()
    meter = LoopMeter()
    requests, ok = uvloop.run(run(args.input, args.output, args.base_url, args.concurrency))
    meter.report(requests, ok).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
