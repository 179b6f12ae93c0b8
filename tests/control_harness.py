"""A fake-time closed loop for controller tests: serve-sim's pure continuous-batching ``Scheduler`` as the
server, a client that keeps ``controller.limit`` requests in flight, and the controller's ticks and /metrics
polls, all on a simulated clock (a minute of traffic runs in well under a second)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gptoss_batch.control import Controller, Decision, Failed, Finished, Settings
from gptoss_batch.sim.engine import Scheduler, Seq

TICK_S = 0.25
POLL_S = 0.5


@dataclass(frozen=True)
class Server:
    """The simulated engine: a knee at ``max_num_seqs`` (throughput flat beyond it, requests queue)."""

    max_num_seqs: int = 32
    decode_base_s: float = 0.01
    decode_slope: float | None = None  # default 0.25 / max_num_seqs: nearly linear up to the knee
    kv_tokens: int = 10_000_000
    prompt_tokens: int = 20
    max_tokens: int = 64
    min_tokens: int = 16
    # (after_s, slots), ...: capacity changes mid-run.
    capacity_changes: tuple[tuple[float, int], ...] = ()
    crash_above: int | None = None

    def scheduler(self) -> Scheduler:
        slope = self.decode_slope if self.decode_slope is not None else 0.25 / self.max_num_seqs
        return Scheduler(max_num_seqs=self.max_num_seqs, kv_tokens=self.kv_tokens, prefill_s_per_token=0.0,
                         decode_base_s=self.decode_base_s, decode_slope=slope, tokens_per_step=1)


@dataclass
class Trace:
    decisions: list[Decision] = field(default_factory=list)
    limits: list[tuple[float, int]] = field(default_factory=list)  # (t, limit) after every change
    done: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, tokens)
    failures: list[float] = field(default_factory=list)  # when each rejected attempt was answered
    crashed: bool = False
    max_server_load: int = 0

    def limit_at(self, t: float) -> int:
        current = self.limits[0][1]
        for when, limit in self.limits:
            if when > t:
                break
            current = limit
        return current

    def tokens_per_s(self, t0: float, t1: float) -> float:
        return sum(n for _, end, n in self.done if t0 <= end < t1) / (t1 - t0)

    def p95_latency(self, t0: float, t1: float) -> float:
        lat = sorted(end - start for start, end, _ in self.done if t0 <= end < t1)
        return lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]


def run_loop(server: Server, settings: Settings, duration_s: float, *, seed: int = 0, metrics: bool = True,
             gauges: Callable[[float, Scheduler], Mapping[str, float] | None] | None = None,
             reject: Callable[[float], int | None] | None = None, jitter: float = 0.0,
             fixed_limit: int | None = None) -> Trace:
    """Drive a Controller (or a ``fixed_limit``) against ``server`` for ``duration_s`` simulated seconds.

    ``reject(t)`` returns a status to answer instead of serving (429s); ``gauges`` overrides what /metrics
    returns; ``jitter`` is the sigma of a log-normal factor on each reported latency (client-side noise).
    """
    rng = random.Random(seed)
    sched = server.scheduler()
    ctrl = Controller(settings, 0.0)
    trace = Trace(limits=[(0.0, fixed_limit or ctrl.limit)])
    in_flight: set[int] = set()
    now, step_end = 0.0, math.inf
    next_tick, next_poll = TICK_S, POLL_S
    refused_until = -1.0

    def limit() -> int:
        return fixed_limit if fixed_limit is not None else ctrl.limit

    def apply(d: Decision | None) -> None:
        if d is None:
            return
        trace.decisions.append(d)
        if d.changed:
            trace.limits.append((d.t_s, d.limit))

    while now < duration_s:
        for after_s, slots in server.capacity_changes:
            if now >= after_s:
                sched.max_num_seqs = slots
        while len(in_flight) < limit() and not trace.crashed and now >= refused_until:
            status = reject(now) if reject is not None else None
            if status is not None:
                trace.failures.append(now + 0.001)
                apply(ctrl.failed(Failed(now, now + 0.001, "http", status)))
                refused_until = now + 0.05  # the client backs off a little before the next attempt
                break
            n = rng.randint(server.min_tokens, server.max_tokens)
            seq = Seq(prompt_tokens=server.prompt_tokens, max_tokens=server.max_tokens, output_tokens=n,
                      arrival_s=now)
            sched.submit(seq)
            in_flight.add(id(seq))
            load = len(sched.running) + len(sched.waiting)
            trace.max_server_load = max(trace.max_server_load, load)
            if server.crash_above is not None and load > server.crash_above:
                trace.crashed = True
        if step_end == math.inf and sched.has_work():
            step_end = now + sched.plan_step(now)
        now = min(step_end, next_tick, next_poll, max(refused_until, now) if refused_until > now else math.inf)
        if now >= step_end:
            step_end = math.inf
            for seq in sched.complete_step(now):
                if seq.state != "finished":
                    continue
                in_flight.discard(id(seq))
                latency = (now - seq.arrival_s) * (rng.lognormvariate(0.0, jitter) if jitter else 1.0)
                trace.done.append((seq.arrival_s, seq.arrival_s + latency, seq.generated))
                apply(ctrl.finished(Finished(seq.arrival_s, seq.arrival_s + latency, seq.generated)))
        if now >= next_tick:
            next_tick += TICK_S
            if fixed_limit is None:
                apply(ctrl.tick(now, len(in_flight)))
        if now >= next_poll:
            next_poll = now + (ctrl.poll_interval_s if fixed_limit is None else POLL_S)
            if fixed_limit is None and metrics:
                g = gauges(now, sched) if gauges is not None else {
                    "requests_running": float(len(sched.running)), "requests_waiting": float(len(sched.waiting)),
                    "kv_cache_usage": sched.kv_usage}
                apply(ctrl.server(now, g))
    return trace
