"""serve-sim's HTTP side: an aiohttp app that answers like vLLM's OpenAI server, with faults on demand.

Routes: POST /v1/chat/completions and /v1/completions (plain and SSE), GET /v1/models, /health, /metrics,
and /sim/stats (the simulator's own counters, for tests). ``serve`` runs it inside a caller's event loop;
``run_server`` owns the loop, the signals and the port file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from gptoss_batch.sim.config import SimConfig
from gptoss_batch.sim.engine import Engine, Seq, generate_fixed
from gptoss_batch.sim.faults import FaultPlan, plan_faults
from gptoss_batch.sim.metrics import EngineMetrics, render_metrics
from gptoss_batch.sim.protocol import (
    SSE_DONE,
    ApiRoute,
    Envelope,
    ParsedRequest,
    RequestError,
    error_body,
    parse_request,
    sse,
)
from gptoss_batch.sim.textgen import generate_tokens, keyed_rng, output_length, stable_digest

# On stop, in-flight requests get this long to finish before they are cancelled (aiohttp waits up to twice
# this). A simulator used by tests should exit promptly rather than drain.
SHUTDOWN_GRACE_S = 0.25
# Requests carry whole prompts; vLLM accepts large bodies, aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# A burst of 1000+ connections must not overflow the accept queue (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 4096
# The status logged for a request whose client went away first (nginx's convention).
CLIENT_CLOSED = 499
JSON = "application/json"


def _abort_connection(request: web.BaseRequest) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), the way a crashing proxy would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _seconds_header(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(slots=True)
class _Outcome:
    """What the request log and /sim/stats record about one completion request."""

    status: int | None = None
    fault: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    t_first_token: float | None = None
    # The Retry-After this answer carried, so a test can check that no request came during the pause.
    retry_after_s: float | None = None


class SimServer:
    """The simulator's state and handlers. One per served app."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.metrics = EngineMetrics()
        self.crashed = False
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests_total = 0
        self.by_status: Counter[str] = Counter()
        self.by_fault: Counter[str] = Counter()
        # How often each (seed, prompt) was asked, so a retry draws fresh faults yet stays reproducible.
        self._asked: Counter[bytes] = Counter()
        self._fixed_running = 0
        self._fixed_max_running = 0
        self._fixed_prompt_tokens = 0
        self._fixed_generation_tokens = 0
        self._log: BinaryIO | None = None

    # --- the app

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.prometheus),
            web.get("/sim/stats", self.sim_stats),
        ])
        app.cleanup_ctx.append(self._lifespan)
        return app

    async def _lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        self._open_log()
        engine_task = asyncio.get_running_loop().create_task(self.engine.run(), name="serve-sim engine")
        try:
            yield
        finally:
            engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await engine_task
            if self._log is not None:
                self._log.close()

    def _open_log(self) -> None:
        if self.config.request_log is not None:
            self._log = open(self.config.request_log, "ab", buffering=0)  # noqa: SIM115 - closed in _lifespan

    # --- live numbers

    @property
    def running(self) -> int:
        return self.engine.running + self._fixed_running

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    def stats(self) -> dict[str, Any]:
        sched = self.engine.scheduler
        return {
            "requests_total": self.requests_total,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "running": self.running,
            "waiting": self.waiting,
            "max_running": max(sched.max_running_seen, self._fixed_max_running),
            "max_waiting": sched.max_waiting_seen,
            "max_num_seqs": sched.max_num_seqs,
            "kv_cache_usage": sched.kv_usage,
            "crashed": self.crashed,
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
            "prompt_tokens_total": sched.prompt_tokens_total + self._fixed_prompt_tokens,
            "generation_tokens_total": sched.generation_tokens_total + self._fixed_generation_tokens,
        }

    # --- small routes

    async def models(self, _request: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                 "root": self.config.model, "parent": None, "max_model_len": self.config.max_model_len}
        return web.Response(body=orjson.dumps({"object": "list", "data": [model]}), content_type=JSON)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=503 if self.crashed else 200)

    async def prometheus(self, _request: web.Request) -> web.Response:
        if not self.config.metrics_enabled:
            raise web.HTTPNotFound()
        sched = self.engine.scheduler
        text = render_metrics(
            self.config.model, running=self.running, waiting=self.waiting, kv_usage=sched.kv_usage,
            prompt_tokens=sched.prompt_tokens_total + self._fixed_prompt_tokens,
            generation_tokens=sched.generation_tokens_total + self._fixed_generation_tokens,
            metrics=self.metrics)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def sim_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type=JSON)

    # --- completions

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "completions")

    async def _completion(self, request: web.Request, route: ApiRoute) -> web.StreamResponse:
        """Bookkeeping around one request: counters, the in-flight gauge and the request log."""
        arrival_s = self.engine.now()
        entry: dict[str, Any] = {"t_arrival": time.time()}
        self.requests_total += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        entry.update(in_flight=self.in_flight, running=self.running, waiting=self.waiting)
        out = _Outcome()
        try:
            return await self._serve(request, route, arrival_s, out)
        except ConnectionResetError:
            # The client went away while we read or wrote. Returning (not raising) keeps aiohttp from
            # logging it as a handler error; it finds the transport closed and drops the response.
            out.status = CLIENT_CLOSED
            return web.Response()
        except asyncio.CancelledError:
            # The client went away while we waited (aiohttp cancels the handler), or the server stops.
            out.status = CLIENT_CLOSED
            raise
        finally:
            self.in_flight -= 1
            self.by_status["none" if out.status is None else str(out.status)] += 1
            if out.fault is not None:
                self.by_fault[out.fault] += 1
            if self._log is not None:
                entry.update(t_done=time.time(), status=out.status, fault=out.fault, stream=out.stream,
                             path=request.path, prompt_tokens=out.prompt_tokens,
                             completion_tokens=out.completion_tokens, t_first_token=out.t_first_token,
                             retry_after_s=out.retry_after_s)
                self._log.write(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))

    def _error(self, out: _Outcome, status: int, message: str, err_type: str,
               headers: dict[str, str] | None = None) -> web.Response:
        out.status = status
        return web.Response(status=status, body=orjson.dumps(error_body(status, message, err_type)),
                            content_type=JSON, headers=headers)

    def _crash(self) -> None:
        self.crashed = True
        self.engine.fail_all()

    def _crashed_error(self, out: _Outcome) -> web.Response:
        out.fault = "crashed"
        return self._error(out, 503, "The engine has crashed (simulated); restart serve-sim.",
                           "ServiceUnavailableError")

    async def _serve(self, request: web.Request, route: ApiRoute, arrival_s: float,
                     out: _Outcome) -> web.StreamResponse:
        cfg = self.config
        if self.crashed:
            return self._crashed_error(out)
        try:
            req = parse_request(route, await request.read(), cfg)
        except RequestError as exc:
            return self._error(out, exc.status, exc.message, exc.err_type)
        out.stream, out.prompt_tokens = req.stream, req.prompt_tokens

        key = (cfg.seed, req.seed, req.prompt_key)
        digest = stable_digest(*key)
        attempt = self._asked[digest]
        self._asked[digest] += 1
        plan = plan_faults(cfg, keyed_rng("faults", *key, attempt))
        out.fault = plan.fault
        refusal = await self._refuse(request, plan, out)
        if refusal is not None:
            return refusal
        if plan.slow_first_byte:
            await asyncio.sleep(cfg.slow_first_byte_s)
            out.fault = out.fault or "slow_first_byte"

        n_tokens, finish = output_length(keyed_rng("length", *key), min_tokens=cfg.min_tokens,
                                         natural_max_tokens=cfg.natural_max_tokens, max_tokens=req.max_tokens)
        tokens = generate_tokens(keyed_rng("text", *key), n_tokens)
        prefix = "chatcmpl" if route == "chat" else "cmpl"
        rid = uuid.UUID(int=keyed_rng("id", *key, attempt).getrandbits(128)).hex
        envelope = Envelope(route, f"{prefix}-{rid}", int(time.time()), req.model)
        seq = Seq(prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens, output_tokens=n_tokens,
                  arrival_s=arrival_s, stream=req.stream)
        if req.stream:
            return await self._stream(request, req, seq, tokens, finish, envelope, out)
        return await self._unary(request, req, seq, tokens, finish, envelope, out)

    async def _refuse(self, request: web.Request, plan: FaultPlan, out: _Outcome) -> web.StreamResponse | None:
        """The answer for a request that never reaches the engine (a fault, overload, a crash), or None."""
        cfg = self.config
        if plan.fault in ("reset", "stall"):
            if plan.fault == "stall":
                await asyncio.sleep(cfg.stall_s)
            _abort_connection(request)
            return web.Response()  # never sent: aiohttp finds the transport closed and drops it
        if plan.fault == "http_500":
            return self._error(out, 500, "Internal server error (simulated).", "InternalServerError")
        if plan.fault == "http_503":
            return self._error(out, 503, "Service unavailable (simulated).", "ServiceUnavailableError")
        if plan.fault == "http_429":
            headers = {"Retry-After": _seconds_header(cfg.retry_after_s)} if plan.retry_after else None
            out.retry_after_s = cfg.retry_after_s if plan.retry_after else None
            return self._error(out, 429, "Rate limit exceeded (simulated).", "RateLimitError", headers)
        if cfg.overload_queue_limit is not None and self.waiting >= cfg.overload_queue_limit:
            out.fault = "overload"
            headers = {"Retry-After": _seconds_header(cfg.retry_after_s)} if cfg.retry_after_s > 0 else None
            out.retry_after_s = cfg.retry_after_s if cfg.retry_after_s > 0 else None
            err_type = "RateLimitError" if cfg.overload_status == 429 else "ServiceUnavailableError"
            return self._error(out, cfg.overload_status,
                               f"Server overloaded: {self.waiting} requests waiting (simulated).", err_type, headers)
        if cfg.crash_above_running is not None and self.running + self.waiting + 1 > cfg.crash_above_running:
            self._crash()
            return self._crashed_error(out)
        return None

    @contextlib.asynccontextmanager
    async def _generation(self, seq: Seq) -> AsyncIterator[AsyncGenerator[int, None]]:
        """The token counts of ``seq`` as they are produced, by the engine or the fixed schedule."""
        cfg = self.config
        if not cfg.fixed_schedule:
            async with contextlib.aclosing(self.engine.generate(seq)) as counts:
                yield counts
            return
        self._fixed_running += 1
        self._fixed_max_running = max(self._fixed_max_running, self._fixed_running)
        self._fixed_prompt_tokens += seq.prompt_tokens
        try:
            async with contextlib.aclosing(generate_fixed(seq, ttft_s=cfg.ttft_s or 0.0,
                                                          itl_s=cfg.itl_s or 0.0)) as counts:
                yield counts
        finally:
            self._fixed_running -= 1
            self._fixed_generation_tokens += seq.generated

    def _record_success(self, seq: Seq, finish: str, out: _Outcome) -> None:
        out.completion_tokens = seq.generated
        self.metrics.success_by_reason[finish] += 1
        if seq.first_token_s is not None:
            self.metrics.ttft_s.observe(seq.first_token_s - seq.arrival_s)
        if seq.finished_s is not None:
            self.metrics.e2e_s.observe(seq.finished_s - seq.arrival_s)

    async def _unary(self, request: web.Request, req: ParsedRequest, seq: Seq, tokens: list[str], finish: str,
                     envelope: Envelope, out: _Outcome) -> web.StreamResponse:
        async with self._generation(seq) as counts:
            async for _ in counts:
                pass
        if seq.state == "failed" or self.crashed:
            return self._crashed_error(out)
        self._record_success(seq, finish, out)
        body = orjson.dumps(envelope.body("".join(tokens), finish, req.prompt_tokens, seq.generated))
        out.status = 200
        if out.fault == "malformed":
            return web.Response(body=body[: len(body) // 2], content_type=JSON)
        if out.fault == "stream_cut":
            resp = web.StreamResponse(headers={"Content-Type": JSON, "Content-Length": str(len(body))})
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            _abort_connection(request)
            return resp
        return web.Response(body=body, content_type=JSON)

    async def _stream(self, request: web.Request, req: ParsedRequest, seq: Seq, tokens: list[str], finish: str,
                      envelope: Envelope, out: _Outcome) -> web.StreamResponse:
        cfg = self.config
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        out.status = 200
        # stream_cut: the connection drops once half the tokens went out (before any, for one-token replies).
        cut_after = seq.output_tokens // 2 if out.fault == "stream_cut" else None
        sent = 0
        async with self._generation(seq) as counts:
            async for n in counts:
                if cut_after is not None and n > cut_after:
                    _abort_connection(request)
                    return resp
                payload = b""
                if sent == 0:
                    out.t_first_token = time.time()
                    if req.route == "chat":
                        payload += sse(envelope.chunk("", role=True))
                    if out.fault == "malformed":
                        payload += b'data: {"id": "' + envelope.id.encode() + b'", "choices": [{"ind\n\n'
                text = "".join(tokens[sent:n])
                sent = n
                last = n >= seq.output_tokens
                if last and cfg.separate_finish_chunk:
                    payload += sse(envelope.chunk(text)) + sse(envelope.chunk("", finish))
                else:
                    payload += sse(envelope.chunk(text, finish if last else None))
                await resp.write(payload)
        if seq.state == "failed" or self.crashed:
            _abort_connection(request)
            return resp
        self._record_success(seq, finish, out)
        tail = b""
        if req.include_usage:
            tail += sse(envelope.usage_chunk(req.prompt_tokens, seq.generated))
        if not cfg.omit_done:
            tail += SSE_DONE
        if tail:
            await resp.write(tail)
        await resp.write_eof()
        return resp


@dataclass(frozen=True, slots=True)
class RunningSim:
    """A listening serve-sim: where it is and its live state."""

    sim: SimServer
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@contextlib.asynccontextmanager
async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[RunningSim]:
    """Listen on ``host:port`` (0: a free port) inside the running event loop until the block exits."""
    sim = SimServer(config)
    runner = web.AppRunner(sim.build_app(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound = runner.addresses[0]
        yield RunningSim(sim, host, int(bound[1]))
    finally:
        await runner.cleanup()


def _raise_fd_limit() -> None:
    """1000+ concurrent connections need more descriptors than the usual soft limit of 1024."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a reader polling for the file never sees it half written.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


async def _serve_until_signalled(config: SimConfig, host: str, port: int, port_file: Path | None,
                                 on_listening: Callable[[str], None] | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config, host, port) as running:
        if port_file is not None:
            _write_port_file(port_file, running.port)
        if on_listening is not None:
            on_listening(running.base_url)
        await stop.wait()


def run_server(config: SimConfig, *, host: str = "127.0.0.1", port: int = 8000, port_file: Path | None = None,
               on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, on uvloop when it is installed. ``on_listening`` gets the base URL."""
    _raise_fd_limit()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_until_signalled(config, host, port, port_file, on_listening))
