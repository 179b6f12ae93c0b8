"""Client CPU per streamed chunk: our SSE path against a bare aiohttp reader, at 64 and 256 streams.

Three clients read the same streams of ``chunks`` content chunks (plus the role, finish and usage chunks and
``[DONE]``) from a loopback server pinned to another CPU:

* ``bare``: aiohttp ``iter_any()``, split on blank lines, ``orjson.loads`` each event, join the content and
  take ``perf_counter()`` per read: the least a streaming client can do.
* ``transport``: ``AiohttpTransport.send(stream=True)``: ``SSEDecoder`` + ``StreamAccumulator``.
* ``runner``: the whole ``run --stream`` path without files: ``Runner`` (body building, limiter, per-row
  timings) with a sink that serialises each result line, and ``SummaryBuilder``.

Two servers:

* ``burst``: ``benchmarks.instant_server``'s ``stream_base_url``: the whole stream is one prebuilt body, so a
  read usually holds many events. This prices parsing; the per-read costs are amortised.
* ``paced``: a server in a child process (below) that writes one event every ``interval_ms`` per stream
  with chunked transfer encoding, the way an inference server does, so a read usually holds one event.
  This prices what a real run pays per chunk: an event-loop wake-up, aiohttp's read path and our parsing.

CPU is ``time.process_time()`` of this process over the measured part, divided by the content chunks
received. Clients run side by side in each repeat (bare, transport, runner at each concurrency), so a noisy
neighbour hurts all alike; ratios are medians of per-repeat ratios.

    python -m benchmarks.streaming [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, cast

import aiohttp
import anyio
import orjson

from benchmarks.instant_server import HOST, chat_stream_body, instant_server, pin_client
from benchmarks.measure import loadavg, loop_name, spread, stderr_line
from gptoss_batch.config import RunConfig
from gptoss_batch.records import Result, Row
from gptoss_batch.runner import Runner
from gptoss_batch.stats import SummaryBuilder
from gptoss_batch.transport import AiohttpTransport

ClientName = Literal["bare", "transport", "runner"]
CLIENTS: tuple[ClientName, ...] = ("bare", "transport", "runner")
ServerName = Literal["burst", "paced"]
SERVERS: tuple[ServerName, ...] = ("burst", "paced")
CONCURRENCIES = (64, 256)
CHUNKS = 64
PACED_INTERVAL_MS = 5.0
GOAL_US_PER_CHUNK = 15.0
REQUEST_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 10.0

REQUEST_BODY = orjson.dumps({"model": "instant", "messages": [{"role": "user", "content": "Count."}],
                             "max_tokens": CHUNKS, "stream": True, "stream_options": {"include_usage": True}})


@dataclass(frozen=True, slots=True)
class Plan:
    requests_per_cell: int  # per concurrency level: this many times the concurrency
    cell_budget_s: float
    repeats: int


FULL = Plan(requests_per_cell=8, cell_budget_s=15.0, repeats=3)
QUICK = Plan(requests_per_cell=1, cell_budget_s=4.0, repeats=1)


@dataclass(frozen=True, slots=True)
class Sample:
    server: ServerName
    client: ClientName
    concurrency: int
    repeat: int
    requests: int
    chunks: int
    reads: int | None  # socket reads the bare client saw (None for ours: not instrumented)
    cpu_s: float
    wall_s: float

    @property
    def cpu_us_per_chunk(self) -> float:
        return self.cpu_s / max(self.chunks, 1) * 1e6

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s


@dataclass(slots=True)
class Report:
    environment: dict[str, str]
    plan: Plan
    samples: list[Sample] = field(default_factory=list)


# -- the paced server -----------------------------------------------------------------------------------


class _PacedProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive; every request gets the chat stream, one event per chunked write every interval."""

    def __init__(self, events: list[bytes], interval_s: float) -> None:
        self._events = events
        self._interval_s = interval_s
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self._streaming or (end := self._buf.find(b"\r\n\r\n")) < 0:
            return
        length = 0
        for line in bytes(self._buf[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self._buf) < end + 4 + length:
            return
        del self._buf[: end + 4 + length]
        assert self._transport is not None
        self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        self._streaming = True
        self._send(0, self._loop.time())

    def _send(self, i: int, start: float) -> None:
        if self._transport is None:
            return
        event = self._events[i]
        self._transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        if i + 1 == len(self._events):
            # The end of the body in a write of its own, right after [DONE], as inference servers do.
            self._transport.write(b"0\r\n\r\n")
            self._streaming = False
            self._maybe_start()
            return
        # Absolute deadlines, so a late wake-up does not slow the stream down.
        self._loop.call_at(start + (i + 1) * self._interval_s, self._send, i + 1, start)


def paced_events(chunks: int) -> list[bytes]:
    """The instant server's chat stream, one event per write; finish, usage and [DONE] go out together."""
    events = [e + b"\n\n" for e in chat_stream_body(chunks).split(b"\n\n") if e]
    return [*events[: chunks + 1], b"".join(events[chunks + 1:])]


async def _serve_paced(chunks: int, interval_s: float) -> None:
    events = paced_events(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _PacedProtocol(events, interval_s), HOST, 0, backlog=4096)
    sys.stdout.write(f"listening {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def _run_paced_child(chunks: int, interval_s: float, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_paced(chunks, interval_s))
    else:
        uvloop.run(_serve_paced(chunks, interval_s))


@contextlib.contextmanager
def paced_server(chunks: int, interval_ms: float) -> Iterator[tuple[str, int | None]]:
    """(base URL, server CPU) of a paced server in a child process pinned to the first allowed CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0] if len(cpus) >= 2 else None
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--serve-paced", "--chunks", str(chunks),
           "--interval-ms", str(interval_ms)] + (["--cpu", str(cpu)] if cpu is not None else [])
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("listening "):
                raise RuntimeError(f"paced server failed to start: {line!r}")
            yield f"http://{HOST}:{int(line.split()[1])}/v1", cpu
        finally:
            proc.terminate()
            try:
                proc.wait(STARTUP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the clients ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Counts:
    requests: int = 0
    chunks: int = 0
    reads: int = 0


Post = Callable[[], Awaitable[None]]


async def _bare_client(session: aiohttp.ClientSession, url: str, counts: _Counts) -> None:
    perf = time.perf_counter
    async with session.post(url, data=REQUEST_BODY, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"bare: HTTP {resp.status}")
        buf = b""
        parts: list[str] = []
        times: list[float] = []
        # Read to the end of the body (not just to [DONE]), so aiohttp can reuse the connection.
        async for data in resp.content.iter_any():
            now = perf()
            counts.reads += 1
            events = (buf + data).split(b"\n\n")
            buf = events.pop()
            for event in events:
                payload = event[6:]
                if payload == b"[DONE]":
                    break
                obj = orjson.loads(payload)
                choices = obj["choices"]
                if choices and (content := choices[0]["delta"].get("content")):
                    parts.append(content)
                    times.append(now)
    counts.requests += 1
    counts.chunks += len(times)


def _rows(n: int) -> Iterator[Row]:
    for i in range(n):
        yield Row(id=f"r{i}", index=i, line=i + 1, payload={"messages": [{"role": "user", "content": f"Count {i}."}]})


class _LineSink:
    """The runner's sink minus the file: serialise the line, as JsonlSink does, and drop it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, result: Result) -> None:
        self.bytes += len(result.to_line())


async def _run_cell(server: ServerName, client: ClientName, base_url: str, concurrency: int, repeat: int,
                    plan: Plan) -> Sample:
    url = f"{base_url}/chat/completions"
    counts = _Counts()
    requests = plan.requests_per_cell * concurrency
    deadline_box = [0.0]

    async def drive(post: Post, n: int, budget_s: float) -> None:
        issued = 0
        deadline_box[0] = time.perf_counter() + budget_s

        async def worker() -> None:
            nonlocal issued
            while issued < n and time.perf_counter() < deadline_box[0]:
                issued += 1
                await post()

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)

    if client == "bare":
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            warm = _Counts()
            await drive(lambda: _bare_client(session, url, warm), concurrency, REQUEST_TIMEOUT_S)
            gc.collect()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await drive(lambda: _bare_client(session, url, counts), requests, plan.cell_budget_s)
            cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        return Sample(server, client, concurrency, repeat, counts.requests, counts.chunks, counts.reads,
                      cpu_s, wall_s)

    async with AiohttpTransport(base_url, limit=concurrency) as transport:
        async def post_transport() -> None:
            c = await transport.send("chat", REQUEST_BODY, stream=True)
            counts.requests += 1
            counts.chunks += len(c.chunk_times)

        await drive(post_transport, concurrency, REQUEST_TIMEOUT_S)  # warm: one stream per connection
        counts.requests = counts.chunks = 0
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if client == "transport":
            await drive(post_transport, requests, plan.cell_budget_s)
        else:
            cfg = RunConfig(base_url=base_url, model="instant", max_tokens=CHUNKS, stream=True,
                            concurrency=concurrency, progress="none", deadline_s=plan.cell_budget_s)
            summary = SummaryBuilder()

            def on_result(r: Result) -> None:
                summary.add(r)
                if r.ok:
                    counts.requests += 1
                    counts.chunks += r.output_tokens

            await Runner(cfg, transport, _LineSink(), on_result=on_result).run(_rows(requests))
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    return Sample(server, client, concurrency, repeat, counts.requests, counts.chunks, None, cpu_s, wall_s)


# -- the run --------------------------------------------------------------------------------------------



def _measure(report: Report, server: ServerName, base_url: str, plan: Plan,
             progress: Callable[[str], None] | None) -> None:
    async def measure_all() -> None:
        for repeat in range(plan.repeats):
            for concurrency in CONCURRENCIES:
                for client in CLIENTS:
                    s = await _run_cell(server, client, base_url, concurrency, repeat, plan)
                    report.samples.append(s)
                    if progress is not None:
                        progress(f"{server:<5} repeat {repeat + 1}/{plan.repeats} c={concurrency:<3} {client:<9} "
                                 f"{s.requests:>5} streams {s.chunks:>7} chunks {s.cpu_us_per_chunk:>6.1f} µs/chunk "
                                 f"{s.chunks_per_s:>8,.0f} chunks/s")

    options: dict[str, object] = {"use_uvloop": True} if loop_name() != "asyncio" else {}
    anyio.run(measure_all, backend="asyncio", backend_options=options)


def run(plan: Plan, servers: Sequence[ServerName] = SERVERS,
        progress: Callable[[str], None] | None = None) -> Report:
    env = {"python": platform.python_version(), "loop": loop_name(),
           "aiohttp": importlib.metadata.version("aiohttp"), "orjson": importlib.metadata.version("orjson"),
           "cpus": str(os.cpu_count()), "loadavg_1m_at_start": loadavg(),
           "chunks_per_stream": str(CHUNKS), "paced_interval_ms": f"{PACED_INTERVAL_MS:g}"}
    report = Report(env, plan)
    allowed = os.sched_getaffinity(0)  # pinning for one server must not leak into the next
    if "burst" in servers:
        with instant_server(stream_chunks=CHUNKS) as info:
            env["burst_server"] = f"{info.kind} on CPU {info.cpu}"
            env["client_cpu"] = str(info.pin_client())
            _measure(report, "burst", info.stream_base_url, plan, progress)
    if "paced" in servers:
        os.sched_setaffinity(0, allowed)
        with paced_server(CHUNKS, PACED_INTERVAL_MS) as (base_url, cpu):
            env["paced_server"] = f"asyncio on CPU {cpu}"
            env["client_cpu"] = str(pin_client(cpu))
            _measure(report, "paced", base_url, plan, progress)
    os.sched_setaffinity(0, allowed)
    env["loadavg_1m_at_end"] = loadavg()
    return report


# -- rendering ------------------------------------------------------------------------------------------



def format_markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"Client CPU per streamed content chunk (user+sys of the client process), {env['loop']}, Python "
        f"{env['python']}, aiohttp {env['aiohttp']}, orjson {env['orjson']}; {env['chunks_per_stream']} content "
        f"chunks per stream; burst server: {env.get('burst_server', '-')}; paced server: "
        f"{env.get('paced_server', '-')}, one event every {env['paced_interval_ms']} ms per stream; client on "
        f"CPU {env.get('client_cpu')}; load average {env['loadavg_1m_at_start']} → "
        f"{env.get('loadavg_1m_at_end', '?')}.",
        f"{report.plan.requests_per_cell}× concurrency streams or {report.plan.cell_budget_s:g} s per cell, "
        f"{report.plan.repeats} repeat(s); median (min–max). Ratios are to bare aiohttp, medians of per-repeat "
        f"ratios. Goal: transport ≤ {GOAL_US_PER_CHUNK:g} µs per chunk at 64 streams.",
        "",
        "| server | streams | bare µs/chunk | transport µs/chunk (ratio) | runner µs/chunk (ratio) "
        "| events per read (bare) | chunks/s bare / transport / runner |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for server in SERVERS:
        for concurrency in CONCURRENCIES:
            by = {c: sorted((s for s in report.samples if s.server == server and s.client == c
                             and s.concurrency == concurrency), key=lambda s: s.repeat) for c in CLIENTS}
            base = by["bare"]
            if not base:
                continue
            cells = [spread([s.cpu_us_per_chunk for s in base], 1)]
            for client in CLIENTS[1:]:
                ratios = [s.cpu_us_per_chunk / b.cpu_us_per_chunk for s, b in zip(by[client], base, strict=True)]
                cells.append(f"{spread([s.cpu_us_per_chunk for s in by[client]], 1)} "
                             f"(×{statistics.median(ratios):.2f})")
            # Events per read: content chunks plus the role, finish+usage+[DONE] writes, over reads.
            per_read = statistics.median((s.chunks + 2 * s.requests) / max(s.reads or 1, 1) for s in base)
            rates = " / ".join(f"{statistics.median([s.chunks_per_s for s in by[c]]):,.0f}" for c in CLIENTS)
            lines.append(f"| {server} | {concurrency} | {' | '.join(cells)} | {per_read:.1f} | {rates} |")
    return "\n".join(lines)


def to_json(report: Report) -> bytes:
    samples = [{**asdict(s), "cpu_us_per_chunk": s.cpu_us_per_chunk, "chunks_per_s": s.chunks_per_s}
               for s in report.samples]
    return orjson.dumps({"environment": report.environment, "plan": asdict(report.plan), "samples": samples},
                        option=orjson.OPT_INDENT_2)


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``."""
    return format_markdown(run(QUICK if quick else FULL, progress=stderr_line))



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming",
                                     description="Client CPU per streamed chunk: ours against bare aiohttp.")
    parser.add_argument("--quick", action="store_true", help="fewer streams, 1 repeat")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--server", choices=[*SERVERS, "both"], default="both", help="which server(s) to use")
    parser.add_argument("--serve-paced", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--chunks", type=int, default=CHUNKS, help=argparse.SUPPRESS)
    parser.add_argument("--interval-ms", type=float, default=PACED_INTERVAL_MS, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_paced:
        _run_paced_child(args.chunks, args.interval_ms / 1000, args.cpu)
        return 0
    servers: Sequence[ServerName] = SERVERS if args.server == "both" else (args.server,)
    report = run(QUICK if args.quick else FULL, servers, progress=stderr_line)
    print(format_markdown(report))
    if args.json is not None:
        args.json.write_bytes(to_json(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
