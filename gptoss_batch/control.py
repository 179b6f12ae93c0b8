"""Adaptive concurrency, the pure part: observations in (finished attempts, failures, server gauges, clock
ticks), the concurrency limit and the reason for it out. ``adaptive.py`` feeds it and applies its decisions.

The controller measures the server in *windows*: spans at one limit that end once enough requests started
inside the span have finished. Each window gives the mean number of requests in flight ``c`` and the latency
per output token ``lpt`` (sum of latencies / sum of output tokens, so long and short generations weigh
alike); by Little's law the output throughput is ``c / lpt``. Comparing two windows gives the *efficiency*
of the added concurrency: ``e = (throughput gain) / (concurrency gain)``, 1 while the server turns every
extra request into throughput, 0 once extra requests only wait (latency per token inflating without
throughput gain).

    startup  slow start: after each window, grow the limit by x(1 + e) (x2 at first) one step per
             finished request (ACK-clocked, as in TCP), while e >= E_GROW. When e falls below it, settle at
             the knee estimate ``throughput(now) * lpt(previous level)``: the concurrency that delivers the
             throughput just seen at the per-request speed seen one level below.
    steady   hold, re-measuring; now and then probe PROBE_STEP higher and keep the probe only if e >= E_GROW,
             or (after an up-probe failed) lower, kept if the concurrency removed had e < E_SHRINK; probes
             back off exponentially while they fail. When latency per token inflates by INFLATION
             at the same limit (the server slowed down or lost capacity), scale the limit by the throughput
             kept. An SLO whose p90 is broken caps the limit below the level that broke it.
    always   congestion (429/502/503/504, timeouts, resets) cuts the limit by CUT_FACTOR at once, at most
             once per round trip (failures of requests sent before the last cut are ignored). A queue on the
             server (``requests_waiting`` over QUEUE_POLLS polls in a row) trims the limit by its length;
             a KV cache over KV_FULL stops growth. Without gauges the latency signal decides alone.

Everything is a function of the observations and the times passed in: no clock is read here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# --- the numbers, with units
START_LIMIT = 4
# Growth pays while the added concurrency turns into throughput at least this efficiently.
E_GROW = 0.5
# Slow start past the knee: a step whose throughput gain is at least this share is kept (a soft knee);
# below it the limit goes back to the knee that Little's law gives from the lower level's latency.
SOFT_KNEE_GAIN = 0.12
# ... and the step's efficiency at least this (below it the gain is within noise of a flat knee).
SOFT_KNEE_MIN_E = 0.2
# A down-probe is kept when the concurrency it took away carried less than this share of its throughput.
# Lower than E_GROW: between the two the limit stays, so measurement noise does not walk it up and down.
E_SHRINK = 0.25
# Steady-state probe: this fraction of the limit higher (at least one more request). A failed probe halves
# the step, down to PROBE_MIN_STEP: smaller steps drown in measurement noise.
PROBE_STEP = 0.15
PROBE_MIN_STEP = 0.05
# Windows between probes: starts at 1, doubles after each failed probe, up to this.
PROBE_MAX_WINDOWS = 16
# Latency per output token this much above the steady reference, at the same limit, means lost capacity.
INFLATION = 0.25
# AIMD: the multiplicative decrease on a congestion signal.
CUT_FACTOR = 0.5
CONGESTION_STATUSES = frozenset({429, 502, 503, 504})
CONGESTION_KINDS = frozenset({"timeout", "connect"})
# After a congestion cut, probes stay below the level that was cut for this long.
CEILING_TTL_S = 120.0
# Server queue: requests_waiting at least max(1, QUEUE_SHARE * running) in each of QUEUE_POLLS polls in a
# row. Single polls see requests that merely arrived between two engine steps.
QUEUE_POLLS = 3
QUEUE_SHARE = 0.05
KV_FULL = 0.95
# How often the driver should read /metrics: faster while a slow-start ramp may run into a queue.
POLL_INTERVAL_S = 0.5
RAMP_POLL_INTERVAL_S = 0.2
# When the server shows its queue, a ramp also waits for each poll: it may go at most this factor above the
# limit of the last poll that showed no queue, so the first queued requests stop it close to the knee.
RAMP_PER_POLL = 1.25
# Polls in a row showing a queue that end a ramp (one alone may be requests between two engine steps).
RAMP_STOP_POLLS = 2
# A window closes once this many requests started inside it have finished, and it lasted WINDOW_MIN_S.
WINDOW_MIN_COMPLETIONS = 20
STARTUP_WINDOW_PER_LIMIT = 0.5
WINDOW_PER_LIMIT = 1.0
WINDOW_MIN_S = 0.5
# A window still short of completions after this long closes with what it has (at least WINDOW_MIN_SAMPLES).
WINDOW_MAX_S = 60.0
WINDOW_MIN_SAMPLES = 3
# Below this share of the limit actually in flight, the run is limited by its input, not the server.
DEMAND_SHARE = 0.8
# After a change, measuring waits this quantile of recent latencies, so requests sent under the old limit
# have drained and the sample is not only the quick answers.
SETTLE_QUANTILE = 0.9
LATENCY_MEMORY = 256
SLO_QUANTILE = 0.9
SLO_MIN_SAMPLES = 10
# Without a good level to fall back to, an SLO breach scales the limit by this.
SLO_CUT_FACTOR = 0.8

Phase = Literal["startup", "steady", "probe"]


@dataclass(frozen=True, slots=True)
class Settings:
    min_limit: int = 1
    max_limit: int = 256
    start_limit: int = START_LIMIT
    # SLO name (ttft, tpot, itl, latency) -> seconds that its p90 must stay within.
    slos: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finished:
    """One successful attempt. Times are on the caller's clock (seconds)."""

    start_s: float
    end_s: float
    output_tokens: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class Failed:
    """One failed attempt: the error kind of the result line (``http``, ``timeout``, ``connect``, ...)."""

    start_s: float
    end_s: float
    kind: str
    status: int | None = None


def is_congestion(kind: str, status: int | None) -> bool:
    """Failures that say "too much load": overload statuses, timeouts and resets (not 500s or 4xx)."""
    return status in CONGESTION_STATUSES if status is not None else kind in CONGESTION_KINDS


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one window saw. ``output_tokens_per_s`` follows from Little's law: in flight / lpt."""

    limit: int
    concurrency: float
    lpt_s: float
    completions: int
    duration_s: float
    slo_p90: Mapping[str, float] = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.concurrency / self.lpt_s

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"limit": self.limit, "in_flight": round(self.concurrency, 2),
                               "lpt_s": round(self.lpt_s, 6), "output_tokens_per_s": round(self.output_tokens_per_s, 2),
                               "completions": self.completions, "window_s": round(self.duration_s, 3)}
        if self.slo_p90:
            out["slo_p90"] = {k: round(v, 4) for k, v in self.slo_p90.items()}
        return out


def efficiency(lower: Measurement, upper: Measurement) -> float | None:
    """Throughput gain over concurrency gain from ``lower`` to ``upper``; None when concurrency barely moved."""
    gain = upper.concurrency / lower.concurrency - 1.0
    if gain < 0.02:
        return None
    return (upper.output_tokens_per_s / lower.output_tokens_per_s - 1.0) / gain


@dataclass(frozen=True, slots=True)
class Decision:
    """The controller's answer: the limit to apply now and why. ``event`` is a stable short name."""

    t_s: float
    limit: int
    previous: int
    event: str
    reason: str
    phase: Phase
    measurement: Measurement | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.limit != self.previous

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_s": round(self.t_s, 3), "limit": self.limit, "previous": self.previous,
                               "event": self.event, "reason": self.reason, "phase": self.phase}
        if self.measurement is not None:
            out["window"] = self.measurement.to_json()
        if self.detail:
            out.update(self.detail)
        return out


@dataclass(slots=True)
class _Window:
    """A measurement at one limit. Requests sent before ``change_s`` (the last limit change) are not counted;
    measuring starts at ``open_s``, a settle time later, so that the sample is not only the quick answers."""

    change_s: float
    open_s: float
    limit: int
    per_limit: float
    last_tick_s: float
    busy_s: float = 0.0  # integral of requests in flight over time
    completions: int = 0
    latency_s: float = 0.0
    tokens: int = 0
    slo_samples: dict[str, list[float]] = field(default_factory=dict)
    kv: list[float] = field(default_factory=list)

    @property
    def needed(self) -> int:
        return max(WINDOW_MIN_COMPLETIONS, math.ceil(self.per_limit * self.limit))

    def add(self, obs: Finished, slos: Mapping[str, float]) -> None:
        self.completions += 1
        self.latency_s += obs.latency_s
        self.tokens += max(1, obs.output_tokens)  # a server without usage: latency per request instead
        for name in slos:
            value = obs.latency_s if name == "latency" else getattr(obs, f"{name}_s", None)
            if value is not None:
                self.slo_samples.setdefault(name, []).append(value)

    def measure(self, now_s: float) -> Measurement:
        duration = max(now_s - self.open_s, 1e-9)
        p90 = {name: _quantile(v, SLO_QUANTILE) for name, v in self.slo_samples.items() if len(v) >= SLO_MIN_SAMPLES}
        return Measurement(self.limit, max(self.busy_s / duration, 1e-9), max(self.latency_s / self.tokens, 1e-12),
                           self.completions, duration, p90)


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class Controller:
    """The adaptive-concurrency state machine. Feed it with ``finished``, ``failed``, ``server`` and ``tick``
    (each returns a ``Decision`` or None); ``limit`` is the limit in force."""

    def __init__(self, settings: Settings, now_s: float) -> None:
        if settings.min_limit < 1 or settings.max_limit < settings.min_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        self.settings = settings
        self.limit = self._clamp(settings.start_limit)
        self.phase: Phase = "startup"
        self._window: _Window | None = None
        self._target = self.limit  # startup ramp: +1 per finished request until here
        self._ramp_cap: int | None = None  # and, while the server's queue is visible, not past this
        self._queue_visible = False
        self._ramp_reason = ""
        self._prev: Measurement | None = None  # startup: the level below; steady: the reference
        self._base: Measurement | None = None  # probe: the level probed from
        self._probe_every = 1
        self._since_probe = 0
        self._probe_step = PROBE_STEP
        self._probe_down = False
        self._last_cut_s = -math.inf
        self._ceiling = settings.max_limit
        self._ceiling_until_s = -math.inf
        self._slo_ceiling = settings.max_limit
        self._slo_good: set[int] = set()
        self._recover_to = 0  # after congestion cuts: slow start may regrow up to here
        self._polls: deque[Mapping[str, float]] = deque(maxlen=QUEUE_POLLS)
        self._latencies: deque[float] = deque(maxlen=LATENCY_MEMORY)
        self._open(now_s)

    @property
    def ramping(self) -> bool:
        return self._target > self.limit

    @property
    def poll_interval_s(self) -> float:
        return RAMP_POLL_INTERVAL_S if self.ramping else POLL_INTERVAL_S

    # -- observations ----------------------------------------------------------------------------------

    def finished(self, obs: Finished) -> Decision | None:
        self._latencies.append(obs.latency_s)
        w = self._window
        if w is not None and obs.start_s >= w.change_s and obs.end_s >= w.open_s:
            w.add(obs, self.settings.slos)
        if self._target > self.limit and (self._ramp_cap is None or self.limit < self._ramp_cap):
            return self._ramp(obs.end_s)
        return None

    def failed(self, obs: Failed) -> Decision | None:
        """A congestion failure cuts at once, unless its request was sent before the last cut."""
        if not is_congestion(obs.kind, obs.status) or obs.start_s < self._last_cut_s:
            return None
        before = self.limit
        self._last_cut_s = obs.end_s
        # The ceiling is the highest level congested lately: cuts that follow (a server down) do not lower it.
        self._ceiling = before if obs.end_s >= self._ceiling_until_s else max(self._ceiling, before)
        self._ceiling_until_s = obs.end_s + CEILING_TTL_S
        new = self._clamp(math.floor(before * CUT_FACTOR))
        self._recover_to = max(self._recover_to, new)
        what = f"HTTP {obs.status}" if obs.status is not None else obs.kind
        # Regrow by slow start only when repeated cuts took the limit far below the first cut's level.
        return self._change(obs.end_s, new, "congestion", f"{what}: cut {before}→{new}",
                            "startup" if new < self._recover_to else "steady", reset_probes=False)

    def server(self, now_s: float, gauges: Mapping[str, float] | None) -> Decision | None:
        """One /metrics poll, as canonical gauges (``requests_running``, ``requests_waiting``,
        ``kv_cache_usage``); None when the endpoint is absent or gave nothing usable."""
        self._queue_visible = gauges is not None and "requests_waiting" in gauges
        if gauges is None:
            self._polls.clear()
            self._ramp_cap = None
            return None
        self._polls.append(gauges)
        if self._queue_visible and self._queue_in(gauges) == 0:
            self._ramp_cap = math.ceil(self.limit * RAMP_PER_POLL)
        kv = gauges.get("kv_cache_usage")
        if kv is not None and self._window is not None:
            self._window.kv.append(kv)
        if self._target > self.limit and all(self._queue_in(p) > 0 for p in list(self._polls)[-RAMP_STOP_POLLS:]) \
                and len(self._polls) >= RAMP_STOP_POLLS:
            # The first signs of a queue end a slow-start ramp: measure here before deciding anything more.
            self._target = self.limit
            self._open(now_s)
            return Decision(now_s, self.limit, self.limit, "ramp_stopped",
                            f"server queue building: growth paused at {self.limit}", self.phase)
        queue = self._sustained_queue()
        if queue <= 0:
            return None
        self._polls.clear()  # act once per fresh evidence
        new = self._clamp(self.limit - queue)
        if new >= self.limit:
            return None
        if self.phase == "probe":  # the probe found the queue: a failed probe, which backs off
            self._probe_failed()
        self._since_probe = 0
        return self._change(now_s, new, "queue", f"server queue of {queue}: {self.limit}→{new}", "steady",
                            reset_probes=False)

    def tick(self, now_s: float, in_flight: int) -> Decision | None:
        """The clock: accumulate requests in flight, close the window when it has enough, and decide."""
        w = self._window
        if w is None:
            return None
        w.busy_s += in_flight * max(0.0, now_s - max(w.last_tick_s, w.open_s))
        w.last_tick_s = now_s
        if now_s <= w.open_s:
            return None
        age = now_s - w.open_s
        if w.completions >= w.needed and age >= WINDOW_MIN_S:
            return self._evaluate(w.measure(now_s), now_s)
        if age >= WINDOW_MAX_S:
            if w.completions >= WINDOW_MIN_SAMPLES:
                return self._evaluate(w.measure(now_s), now_s)
            self._open(now_s, settle=False)  # too few answers to learn anything: start over
        return None

    # -- decisions -------------------------------------------------------------------------------------

    def _evaluate(self, m: Measurement, now_s: float) -> Decision | None:
        broken = {k: v for k, v in m.slo_p90.items() if v > self.settings.slos[k]}
        if broken:
            return self._slo_breach(m, broken, now_s)
        if set(m.slo_p90) == set(self.settings.slos) and self.settings.slos:
            self._slo_good.add(m.limit)
        if self.phase == "startup":
            return self._startup(m, now_s)
        if self.phase == "probe":
            return self._judge_probe(m, now_s)
        return self._steady(m, now_s)

    def _startup(self, m: Measurement, now_s: float) -> Decision | None:
        prev = self._prev
        if m.concurrency < DEMAND_SHARE * m.limit:
            self._open(now_s, settle=False)
            return self._hold(now_s, m, "input-bound: fewer requests in flight than the limit")
        e = efficiency(prev, m) if prev is not None and m.limit > prev.limit else None
        if prev is not None and e is not None and e < E_GROW:
            if e >= SOFT_KNEE_MIN_E and m.output_tokens_per_s >= prev.output_tokens_per_s * (1 + SOFT_KNEE_GAIN):
                # A soft knee (real GPUs: throughput still rising, slowly): the step paid in throughput, so
                # keep it and let steady-state probing decide; going back would give the gain away.
                self.phase, self._prev = "steady", m
                self._open(now_s, settle=False)
                return self._hold(now_s, m, f"soft knee: {self._pct(m, prev)} throughput for "
                                            f"+{m.limit / prev.limit - 1:.0%} concurrency; holding {m.limit}",
                                  {"efficiency": round(e, 3)})
            knee = self._clamp(min(m.limit, max(prev.limit, round(m.output_tokens_per_s * prev.lpt_s))))
            self._prev = None
            return self._change(now_s, knee, "knee",
                                f"knee: {self._pct(m, prev)} throughput for +{m.limit / prev.limit - 1:.0%} "
                                f"concurrency; {m.limit}→{knee}", "steady", m, {"efficiency": round(e, 3)})
        cap = self._growth_cap(now_s)
        if self._recover_to:  # regrowing after congestion cuts: slow start only up to where they began
            cap = min(cap, max(self.limit, self._recover_to))
        if self._kv_full() or self.limit >= cap:
            self.phase, self._prev = "steady", m
            self._open(now_s, settle=False)
            why = "KV cache nearly full" if self._kv_full() else f"at the cap of {cap}"
            return self._hold(now_s, m, f"growth stops: {why}")
        factor = 2.0 if e is None else 1.0 + min(1.0, max(E_GROW, e))
        self._prev = m
        self._target = min(cap, max(self.limit + 1, math.ceil(self.limit * factor)))
        gain = f" ({self._pct(m, prev)} throughput)" if prev is not None and e is not None else ""
        self._ramp_reason = f"slow start →{self._target}{gain}"
        self._ramp_cap = math.ceil(self.limit * RAMP_PER_POLL) if self._queue_visible else None
        self._window = None  # the ramp is not measured; the next window opens at the target
        detail = {"efficiency": round(e, 3)} if e is not None else {}
        return self._ramp(now_s, m, detail)

    def _steady(self, m: Measurement, now_s: float) -> Decision | None:
        ref = self._prev
        self._open(now_s, settle=False)
        if m.concurrency < DEMAND_SHARE * m.limit:
            return self._hold(now_s, m, "input-bound: fewer requests in flight than the limit")
        if ref is None or ref.limit != m.limit:
            self._prev = m
        elif m.lpt_s > ref.lpt_s * (1 + INFLATION) and m.concurrency >= ref.concurrency * 0.95:
            kept = m.output_tokens_per_s / ref.output_tokens_per_s
            new = self._clamp(min(self.limit - 1, math.floor(self.limit * kept)))
            if new < self.limit:
                self._probe_down = True  # a window straddling the change may have cut too little
                return self._change(now_s, new, "inflation",
                                    f"latency/token +{m.lpt_s / ref.lpt_s - 1:.0%} without more throughput: "
                                    f"{self.limit}→{new}", "steady", m)
        elif m.lpt_s < ref.lpt_s * (1 + INFLATION):
            self._prev = m  # follow slow drift; a sudden jump is what the test above is for
            if m.lpt_s < ref.lpt_s / (1 + INFLATION):
                self._since_probe = self._probe_every  # the server got faster: probe now
        self._since_probe += 1
        if self._since_probe >= self._probe_every and (level := self._probe_level(now_s)) is not None:
            self._since_probe = 0
            self._base = m
            return self._change(now_s, level, "probe", f"probe {self.limit}→{level}", "probe", m,
                                reset_probes=False)
        return self._hold(now_s, m, "steady")

    def _probe_level(self, now_s: float) -> int | None:
        """The next probe: up, or down after an up-probe failed (the level may hold a queue); the other way
        when there is no room. None: no room either way."""
        step = max(1, math.ceil(self.limit * self._probe_step))
        cap = self._growth_cap(now_s)
        up = min(cap, self.limit + step) if self.limit < cap and not self._kv_full() else None
        down = max(self.settings.min_limit, self.limit - step) if self.limit > self.settings.min_limit else None
        return (down or up) if self._probe_down else (up or down)

    def _judge_probe(self, m: Measurement, now_s: float) -> Decision | None:
        base = self._base
        assert base is not None
        self._base = None
        down = m.limit < base.limit
        # Down: the efficiency of the concurrency taken away. Kept when it carried less than its share.
        e = efficiency(m, base) if down else efficiency(base, m)
        if e is not None and ((e < E_SHRINK) if down else (e >= E_GROW and not self._kv_full())):
            self._probe_every, self._probe_step = 1, PROBE_STEP  # and the next probe goes the same way
            self.phase, self._prev = "steady", m
            self._open(now_s, settle=False)
            how = (f"-{1 - m.limit / base.limit:.0%} concurrency cost {self._pct(m, base)} throughput" if down
                   else f"{self._pct(m, base)} throughput")
            return self._hold(now_s, m, f"probe kept: {how}", {"efficiency": round(e, 3)})
        self._probe_failed()
        self._probe_down = not down
        why = "input-bound" if e is None else f"{self._pct(m, base)} throughput"
        decision = self._change(now_s, base.limit, "probe_undone", f"probe undone ({why}): {m.limit}→{base.limit}",
                                "steady", m, {"efficiency": round(e, 3)} if e is not None else {},
                                reset_probes=False)
        self._prev = base
        return decision

    def _slo_breach(self, m: Measurement, broken: Mapping[str, float], now_s: float) -> Decision:
        if self.phase == "probe":
            self._probe_failed()
        self._slo_good = {level for level in self._slo_good if level < m.limit}
        self._slo_ceiling = min(self._slo_ceiling, max(self.settings.min_limit, m.limit - 1))
        good = max(self._slo_good, default=0)
        new = self._clamp(good if good else min(m.limit - 1, math.floor(m.limit * SLO_CUT_FACTOR)))
        name, value = next(iter(broken.items()))
        return self._change(now_s, new, "slo", f"{name} p90 {value:.3g}s > {self.settings.slos[name]:g}s: "
                            f"{m.limit}→{new}", "steady", m, reset_probes=False)

    # -- helpers ---------------------------------------------------------------------------------------

    def _ramp(self, now_s: float, m: Measurement | None = None, detail: Mapping[str, Any] | None = None) -> Decision:
        before = self.limit
        self.limit += 1
        if self.limit >= self._target:
            self._open(now_s)
        event = "grow" if m is not None else "ramp"
        return Decision(now_s, self.limit, before, event, self._ramp_reason, self.phase, m, detail or {})

    def _change(self, now_s: float, new: int, event: str, reason: str, phase: Phase,
                m: Measurement | None = None, detail: Mapping[str, Any] | None = None, *,
                reset_probes: bool = True) -> Decision:
        before = self.limit
        self.limit = new
        self._target = new
        self.phase = phase
        self._polls.clear()  # the server's queue is judged afresh at the new level
        if phase != "probe" and event != "probe_undone":
            self._prev = None
        if reset_probes:
            self._probe_every, self._since_probe, self._probe_step = 1, 0, PROBE_STEP
        self._open(now_s)
        return Decision(now_s, new, before, event, reason, phase, m, detail or {})

    def _hold(self, now_s: float, m: Measurement, reason: str, detail: Mapping[str, Any] | None = None) -> Decision:
        return Decision(now_s, self.limit, self.limit, "hold", reason, self.phase, m, detail or {})

    def _open(self, now_s: float, *, settle: bool = True) -> None:
        """A new window at the current limit; ``settle`` after a change, not between windows at one limit."""
        per = STARTUP_WINDOW_PER_LIMIT if self.phase == "startup" else WINDOW_PER_LIMIT
        w = self._window
        if not settle and w is not None and w.limit == self.limit:
            self._window = _Window(w.change_s, now_s, self.limit, per, now_s)
            return
        wait = _quantile(list(self._latencies), SETTLE_QUANTILE) if self._latencies else 0.0
        self._window = _Window(now_s, now_s + wait, self.limit, per, now_s)

    def _probe_failed(self) -> None:
        self._probe_every = min(PROBE_MAX_WINDOWS, self._probe_every * 2)
        self._probe_step = max(PROBE_MIN_STEP, self._probe_step / 2)

    def _clamp(self, n: int) -> int:
        return max(self.settings.min_limit, min(self.settings.max_limit, n))

    def _growth_cap(self, now_s: float) -> int:
        cap = min(self.settings.max_limit, self._slo_ceiling)
        if now_s < self._ceiling_until_s:
            cap = min(cap, max(self.settings.min_limit, self._ceiling - 1))
        return cap

    @staticmethod
    def _queue_in(poll: Mapping[str, float]) -> int:
        """Requests waiting on the server in one poll, when they count as a queue (else 0)."""
        waiting = poll.get("requests_waiting")
        if waiting is None:
            return 0
        threshold = max(1.0, QUEUE_SHARE * (poll.get("requests_running") or 0.0))
        return math.floor(waiting) if waiting >= threshold else 0

    def _sustained_queue(self) -> int:
        """The queue's mean length over the last QUEUE_POLLS polls when every one of them showed a queue."""
        if len(self._polls) < QUEUE_POLLS:
            return 0
        queues = [self._queue_in(p) for p in self._polls]
        return sum(queues) // len(queues) if min(queues) > 0 else 0

    def _kv_full(self) -> bool:
        w = self._window
        recent = [p["kv_cache_usage"] for p in self._polls if "kv_cache_usage" in p]
        values = recent or (w.kv if w is not None else [])
        return bool(values) and sum(values) / len(values) >= KV_FULL

    @staticmethod
    def _pct(m: Measurement, ref: Measurement | None) -> str:
        if ref is None:
            return "?"
        return f"{m.output_tokens_per_s / ref.output_tokens_per_s - 1:+.0%}"
