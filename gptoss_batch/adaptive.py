"""``--concurrency auto``, the driver: feeds the runner's attempts, a clock and the server's /metrics into the
pure controller (control.py) and applies its decisions to the runner's limiter and the connection pool.

It also writes the controller's decisions as JSONL (``--log-controller``) and a short account for the summary.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import anyio
import orjson

from gptoss_batch.config import RunConfig
from gptoss_batch.control import Controller, Decision, Failed, Finished, Settings
from gptoss_batch.errors import OutputError, TransportError
from gptoss_batch.metrics import POLL_TIMEOUT_S, TextGetter, metrics_url_for, parse_gauges
from gptoss_batch.records import Completion
from gptoss_batch.runner import Runner

TICK_S = 0.25
# A /metrics page that worked and then fails this many times in a row is read less often.
METRICS_FAILURES_BEFORE_BACKOFF = 3
METRICS_BACKOFF_S = 5.0


@runtime_checkable
class Pool(TextGetter, Protocol):
    """What the driver needs of the transport beyond ``send``: the side GET and the pool size."""

    def resize(self, limit: int) -> None: ...


class AdaptiveDriver:
    """Owns a Controller for one run. ``attach()`` before the run starts, ``run()`` beside it (cancelled when
    the run ends), ``summary()`` after."""

    def __init__(self, cfg: RunConfig, runner: Runner, pool: Pool | None, *,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self.cfg = cfg
        self.runner = runner
        self.pool = pool
        self.clock = clock
        self.sleep = sleep
        self.t0 = clock()
        settings = Settings(min_limit=cfg.min_concurrency, max_limit=cfg.max_concurrency, slos=dict(cfg.slos))
        self.controller = Controller(settings, 0.0)
        self.metrics_url = cfg.metrics_url or metrics_url_for(cfg.base_url)
        self.metrics_status = "off (--no-server-metrics)" if not cfg.server_metrics or pool is None else "not read yet"
        self._log: IO[bytes] | None = None
        self._changes = 0
        self._max_limit = self.controller.limit
        self._limit_since = 0.0
        self._limit_time: dict[int, float] = {}

    def now(self) -> float:
        return self.clock() - self.t0

    # -- wiring ----------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Open the decision log and give the runner the controller's first limit and the attempt hook."""
        if self.cfg.log_controller:
            try:
                self._log = Path(self.cfg.log_controller).open("ab")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise OutputError(f"{self.cfg.log_controller}: cannot write the controller log: "
                                  f"{exc.strerror or exc}") from None
        limit = self.controller.limit
        # unix_time: when t_s was 0, to line the log up with the server's own logs.
        self._write({"t_s": 0.0, "event": "start", "unix_time": round(time.time() - self.now(), 3), "limit": limit,
                     "min": self.cfg.min_concurrency,
                     "max": self.cfg.max_concurrency, "slos": dict(self.cfg.slos),
                     "metrics_url": self.metrics_url if self.cfg.server_metrics else None})
        self.runner.set_limit(limit, f"auto: slow start from {limit}")
        self._resize(limit)
        self.runner.on_attempt = self.on_attempt

    def close(self) -> None:
        self._account(self.now())
        self._write({"t_s": round(self.now(), 3), "event": "end", "limit": self.controller.limit,
                     "metrics": self.metrics_status})
        if self._log is not None:
            self._log.close()
            self._log = None

    async def run(self) -> None:
        """The clock ticks and, unless switched off, the /metrics polls; runs until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tick)
                if self.cfg.server_metrics and self.pool is not None:
                    tg.start_soon(self._poll, self.pool)
        finally:
            self.close()

    # -- observations ----------------------------------------------------------------------------------

    def on_attempt(self, t0: float, t1: float, completion: Completion | None, error: TransportError | None,
                   timing: dict[str, Any]) -> None:
        """The runner's hook, called after every attempt (kept cheap: it runs on the request path). ``timing``
        is the runner's ``stats.stream_timings`` of a streamed answer, else empty; the controller reads only
        the timings that an SLO names."""
        start, end = t0 - self.t0, t1 - self.t0
        if completion is not None:
            tokens = completion.usage.completion_tokens if completion.usage else len(completion.chunk_times)
            itl = timing["itl_s"]["mean"] if "itl_s" in timing else None
            self._apply(self.controller.finished(
                Finished(start, end, tokens, timing.get("ttft_s"), timing.get("tpot_s"), itl)))
        elif error is not None:
            self._apply(self.controller.failed(Failed(start, end, error.kind, error.status)))

    async def _tick(self) -> None:
        while True:
            await self.sleep(TICK_S)
            self._apply(self.controller.tick(self.now(), self.runner.state.in_flight))

    async def _poll(self, pool: Pool) -> None:
        """Read the server's gauges on the controller's schedule. A first answer without any known gauge (404,
        another server's page, garbage) ends polling: the latency signal decides alone."""
        seen = False
        failures = 0
        while True:
            try:
                status, text = await pool.get_text(self.metrics_url, POLL_TIMEOUT_S)
                gauges = parse_gauges(text) if status == 200 else {}
                problem = f"HTTP {status}" if status != 200 else None if gauges else "none of the known gauges"
            except TransportError as exc:
                gauges, problem = {}, exc.message
            self._apply(self.controller.server(self.now(), gauges or None))
            if problem is None:
                if not seen:
                    self._status(f"reading {self.metrics_url}")
                seen, failures = True, 0
            else:
                failures += 1
                if not seen:
                    self._status(f"not used: {self.metrics_url}: {problem}")
                    return
                if failures == METRICS_FAILURES_BEFORE_BACKOFF:
                    self._status(f"failing ({problem}); read every {METRICS_BACKOFF_S:g}s")
            backoff = failures >= METRICS_FAILURES_BEFORE_BACKOFF
            await self.sleep(METRICS_BACKOFF_S if backoff else self.controller.poll_interval_s)

    # -- decisions -------------------------------------------------------------------------------------

    def _apply(self, decision: Decision | None) -> None:
        if decision is None:
            return
        if decision.changed:
            self._account(decision.t_s)
            self._changes += 1
            self._max_limit = max(self._max_limit, decision.limit)
            self.runner.set_limit(decision.limit, decision.reason)
            self._resize(decision.limit)
        if self._log is not None:
            line = decision.to_json()
            line["in_flight"] = self.runner.state.in_flight
            self._write(line)

    def _resize(self, limit: int) -> None:
        if self.pool is not None:
            self.pool.resize(limit + 1)  # one connection to spare for the /metrics poll

    def _account(self, now: float) -> None:
        limit = self.runner.state.limit
        self._limit_time[limit] = self._limit_time.get(limit, 0.0) + max(0.0, now - self._limit_since)
        self._limit_since = now

    def _status(self, text: str) -> None:
        self.metrics_status = text
        self._write({"t_s": round(self.now(), 3), "event": "metrics", "status": text})

    def _write(self, record: dict[str, Any]) -> None:
        if self._log is None:
            return
        try:
            self._log.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except OSError:
            self._log = None  # the log is a diagnostic: losing it must not stop the run

    def summary(self) -> dict[str, Any]:
        """The controller's account for the run summary: where the limit settled and how it got there."""
        total = sum(self._limit_time.values())
        mean = sum(k * v for k, v in self._limit_time.items()) / total if total else float(self.controller.limit)
        held = max(self._limit_time.items(), key=lambda kv: kv[1])[0] if self._limit_time else self.controller.limit
        return {"final_limit": self.controller.limit, "max_limit": self._max_limit, "most_held_limit": held,
                "time_weighted_limit": round(mean, 2), "changes": self._changes, "phase": self.controller.phase,
                "server_metrics": self.metrics_status}
