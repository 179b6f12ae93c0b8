"""Client CPU per request: aiohttp vs httpx's own pool vs httpx over an aiohttp transport.

Why transport.py uses aiohttp: httpx 0.28's connection pool was reported to cost 13-60x aiohttp's CPU at
64-256 concurrent requests (encode/httpx#3215, encode/httpcore#1035). This reproduces the comparison
against an instant loopback server (benchmarks/instant_server.py), so the figures are the client's own cost.

Method: the server is pinned to one CPU and this process to another. Each cell opens a fresh client, warms
it with one request per connection, then runs ``concurrency`` worker coroutines that loop over
POST /v1/chat/completions (orjson body, full read, orjson parse) until the cell's request count or time
budget is used up. CPU is the user+sys time of this process over the measured part
(``time.process_time()``); per-request figures divide by the requests that completed. Clients are run
side by side (a, b, c at each concurrency in each repeat) so a noisy neighbour hurts all three alike; the
ratio shown is the median of the per-repeat ratios.

    python -m benchmarks.transport [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import anyio
import httpx
import orjson

from benchmarks.instant_server import ServerChoice, ServerInfo, instant_server
from benchmarks.measure import loadavg, loop_name, spread, stderr_line, version

ClientName = Literal["aiohttp", "httpx", "httpx-over-aiohttp"]
CLIENTS: tuple[ClientName, ...] = ("aiohttp", "httpx", "httpx-over-aiohttp")
CONCURRENCIES = (1, 64, 256)
REQUEST_TIMEOUT_S = 60.0
WARMUP_BUDGET_S = 10.0

REQUEST_BODY = orjson.dumps(
    {
        "model": "instant",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say ok."},
        ],
        "max_tokens": 16,
        "temperature": 0.0,
    }
)
REQUEST_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}


@dataclass(frozen=True, slots=True)
class Plan:
    requests_per_cell: int
    cell_budget_s: float  # stop issuing requests after this long; httpx at 256 cannot do 2000 in time
    repeats: int
    concurrencies: tuple[int, ...] = CONCURRENCIES


FULL = Plan(requests_per_cell=2000, cell_budget_s=20.0, repeats=3)
# 256 left out: httpx's pool takes seconds to start that many requests even for a handful of them.
QUICK = Plan(requests_per_cell=100, cell_budget_s=1.0, repeats=1, concurrencies=(1, 64))


@dataclass(frozen=True, slots=True)
class Sample:
    client: ClientName
    concurrency: int
    repeat: int
    requests: int
    cpu_s: float
    wall_s: float
    first_round_cpu_s: float | None  # CPU until the first ``concurrency`` requests completed

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6

    @property
    def steady_cpu_us_per_request(self) -> float | None:
        """CPU per request after the first round: without the burst of ``concurrency`` simultaneous starts."""
        if self.first_round_cpu_s is None or self.requests <= self.concurrency:
            return None
        return (self.cpu_s - self.first_round_cpu_s) / (self.requests - self.concurrency) * 1e6

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s


@dataclass(slots=True)
class Report:
    environment: dict[str, str]
    plan: Plan
    samples: list[Sample] = field(default_factory=list)


# -- httpx over aiohttp ---------------------------------------------------------------------------------


class _AiohttpStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """The httpx API on aiohttp's connection pool: what an httpx-based SDK gets from a swapped transport.

    The body is streamed back (httpx reads and decodes it), as a general-purpose adapter must.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_AiohttpStream(response),
            request=request,
        )

    async def aclose(self) -> None:
        await self._session.close()


# -- one measured cell ----------------------------------------------------------------------------------

Post = Callable[[], Awaitable[None]]


def _aiohttp_session(concurrency: int, *, decompress: bool = True) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        auto_decompress=decompress,
    )


async def _open_client(stack: AsyncExitStack, client: ClientName, url: str, concurrency: int) -> Post:
    """Enter the client into ``stack`` and return a coroutine function doing one full request."""
    if client == "aiohttp":
        session = await stack.enter_async_context(_aiohttp_session(concurrency))

        async def post_aiohttp() -> None:
            async with session.post(url, data=REQUEST_BODY, headers=REQUEST_HEADERS) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"aiohttp: HTTP {r.status}")
            orjson.loads(raw)

        return post_aiohttp

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    if client == "httpx":
        http = httpx.AsyncClient(limits=limits, timeout=timeout)
    else:
        # httpx decodes Content-Encoding itself, so aiohttp must hand over the raw bytes.
        transport = AiohttpTransport(_aiohttp_session(concurrency, decompress=False))
        http = httpx.AsyncClient(transport=transport, timeout=timeout)
    await stack.enter_async_context(http)

    async def post_httpx() -> None:
        r = await http.post(url, content=REQUEST_BODY, headers=REQUEST_HEADERS)
        if r.status_code != 200:
            raise RuntimeError(f"{client}: HTTP {r.status_code}")
        orjson.loads(r.content)

    return post_httpx


@dataclass(frozen=True, slots=True)
class _Drive:
    done: int
    first_round_cpu_s: float | None  # process CPU time when the first ``concurrency`` requests had completed


async def _drive(post: Post, concurrency: int, requests: int, budget_s: float) -> _Drive:
    """Run ``concurrency`` workers until ``requests`` were issued or ``budget_s`` passed."""
    issued = 0
    done = 0
    first_round_cpu_s: float | None = None
    deadline = time.perf_counter() + budget_s

    async def worker() -> None:
        nonlocal issued, done, first_round_cpu_s
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            await post()
            done += 1
            if done == concurrency:
                first_round_cpu_s = time.process_time()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return _Drive(done, first_round_cpu_s)


async def _measure(client: ClientName, url: str, concurrency: int, repeat: int, plan: Plan) -> Sample:
    async with AsyncExitStack() as stack:
        post = await _open_client(stack, client, url, concurrency)
        # One request per connection first, so the cell measures keep-alive traffic, not connects.
        await _drive(post, concurrency, concurrency, WARMUP_BUDGET_S)
        gc.collect()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        drive = await _drive(post, concurrency, plan.requests_per_cell, plan.cell_budget_s)
        wall_s = time.perf_counter() - wall0
        cpu_s = time.process_time() - cpu0
    first_round = None if drive.first_round_cpu_s is None else drive.first_round_cpu_s - cpu0
    return Sample(client, concurrency, repeat, drive.done, cpu_s, wall_s, first_round)



def _environment(server: ServerInfo, client_cpu: int | None) -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "loop": loop_name(),
        "aiohttp": version("aiohttp"),
        "httpx": version("httpx"),
        "httpcore": version("httpcore"),
        "server": server.kind,
        "server_cpu": str(server.cpu),
        "client_cpu": str(client_cpu),
        "cpus": str(os.cpu_count()),
        "loadavg_1m_at_start": loadavg(),
    }


def run(
    plan: Plan, progress: Callable[[str], None] | None = None, server_kind: ServerChoice = "auto"
) -> Report:
    """Start the instant server, pin this process away from it, measure each (repeat, concurrency, client)."""
    with instant_server(kind=server_kind) as server:
        client_cpu = server.pin_client()
        report = Report(_environment(server, client_cpu), plan)
        url = f"{server.base_url}/chat/completions"

        async def measure_all() -> None:
            for repeat in range(plan.repeats):
                for concurrency in plan.concurrencies:
                    for client in CLIENTS:
                        sample = await _measure(client, url, concurrency, repeat, plan)
                        report.samples.append(sample)
                        if progress is not None:
                            progress(
                                f"repeat {repeat + 1}/{plan.repeats} c={concurrency:<3} {client:<18} "
                                f"{sample.requests:>5} req  {sample.cpu_us_per_request:>8.0f} µs/req  "
                                f"{sample.requests_per_s:>7.0f} req/s"
                            )

        backend_options: dict[str, object] = {}
        if loop_name() != "asyncio":
            backend_options["use_uvloop"] = True
        anyio.run(measure_all, backend="asyncio", backend_options=backend_options)
        report.environment["loadavg_1m_at_end"] = loadavg()
    return report


# -- rendering ------------------------------------------------------------------------------------------



def format_markdown(report: Report) -> str:
    """The Markdown table: median (min–max) over repeats; ratios are medians of per-repeat ratios."""
    env = report.environment
    lines = [
        f"Client CPU per request (user+sys of the client process), {env['loop']}, Python {env['python']}, "
        f"aiohttp {env['aiohttp']}, httpx {env['httpx']} / httpcore {env['httpcore']}; "
        f"{env['server']} instant server on CPU {env['server_cpu']}, client on CPU {env['client_cpu']}; "
        f"load average {env['loadavg_1m_at_start']} → {env.get('loadavg_1m_at_end', '?')}.",
        f"Up to {report.plan.requests_per_cell} requests or {report.plan.cell_budget_s:g} s per cell, "
        f"{report.plan.repeats} repeat(s); median (min–max). Ratios are to aiohttp, medians of per-repeat "
        "ratios. *After 1st round* leaves out the CPU until the first `concurrency` requests completed "
        "(the burst of simultaneous starts, which costs httpx's pool most), against aiohttp's likewise.",
        "",
        "| concurrency | aiohttp µs/req | httpx µs/req (ratio) | httpx-over-aiohttp µs/req (ratio) "
        "| httpx after 1st round µs/req (ratio) | req/s aiohttp / httpx / httpx-over-aiohttp "
        "| requests per cell (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in report.plan.concurrencies:
        by_client = {
            c: sorted(
                (s for s in report.samples if s.client == c and s.concurrency == concurrency),
                key=lambda s: s.repeat,
            )
            for c in CLIENTS
        }
        base = by_client["aiohttp"]
        cells = [spread([s.cpu_us_per_request for s in base])]
        for client in CLIENTS[1:]:
            ratios = [
                s.cpu_us_per_request / b.cpu_us_per_request
                for s, b in zip(by_client[client], base, strict=True)
            ]
            cpu_us = spread([s.cpu_us_per_request for s in by_client[client]])
            cells.append(f"{cpu_us} (×{statistics.median(ratios):.1f})")
        cells.append(_steady_cell(by_client["httpx"], base))
        rates = " / ".join(
            f"{statistics.median([s.requests_per_s for s in by_client[c]]):,.0f}" for c in CLIENTS
        )
        counts = " / ".join(f"{statistics.median([s.requests for s in by_client[c]]):.0f}" for c in CLIENTS)
        lines.append(f"| {concurrency} | {' | '.join(cells)} | {rates} | {counts} |")
    return "\n".join(lines)


def _steady_cell(samples: Sequence[Sample], base: Sequence[Sample]) -> str:
    pairs = [
        (s.steady_cpu_us_per_request, b.steady_cpu_us_per_request) for s, b in zip(samples, base, strict=True)
    ]
    usable = [(s, b) for s, b in pairs if s is not None and b is not None]
    if not usable:
        return "–"
    ratio = statistics.median(s / b for s, b in usable)
    return f"{spread([s for s, _ in usable])} (×{ratio:.1f})"


def to_json(report: Report) -> bytes:
    samples = [
        {
            **asdict(s),
            "cpu_us_per_request": s.cpu_us_per_request,
            "steady_cpu_us_per_request": s.steady_cpu_us_per_request,
            "requests_per_s": s.requests_per_s,
        }
        for s in report.samples
    ]
    return orjson.dumps(
        {"environment": report.environment, "plan": asdict(report.plan), "samples": samples},
        option=orjson.OPT_INDENT_2,
    )


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``: run and return the table."""
    return format_markdown(run(QUICK if quick else FULL, progress=stderr_line))



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transport",
        description="Client CPU per request: aiohttp vs httpx vs httpx over an aiohttp transport.",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK.requests_per_cell} requests per cell, 1 repeat"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    parser.add_argument(
        "--server",
        choices=["auto", "nginx", "asyncio"],
        default="auto",
        help="instant server to use (auto: nginx if installed)",
    )
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL, progress=stderr_line, server_kind=args.server)
    print(format_markdown(report))
    if args.json is not None:
        args.json.write_bytes(to_json(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
