"""The server's own gauges from its Prometheus ``/metrics`` page: a pure parser that knows the names vLLM,
SGLang, TGI and llama.cpp use, and a poller that averages them over a measurement window.

``parse_gauges(text)`` is the reusable core (text in, ``{"requests_running": 7.0, ...}`` out); the poller
takes anything with the transport's ``get_text`` and a sleep function, so it is tested without a network.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from gptoss_batch.errors import TransportError

POLL_INTERVAL_S = 0.5
POLL_TIMEOUT_S = 2.0
# After this many failed polls in a row the poller gives up for the window (the server is busy enough).
MAX_CONSECUTIVE_FAILURES = 3

# Canonical gauge -> the servers' names for it, in order of preference (the first one present wins).
# Counts are summed over label sets (several engines or ranks behind one endpoint); fractions are averaged.
GAUGE_NAMES: dict[str, tuple[str, ...]] = {
    "requests_running": (
        "vllm:num_requests_running",      # vLLM: sequences in the running batch
        "sglang:num_running_reqs",        # SGLang
        "tgi_batch_current_size",         # TGI: size of the batch being decoded
        "llamacpp:requests_processing",   # llama.cpp llama-server (--metrics)
    ),
    "requests_waiting": (
        "vllm:num_requests_waiting",
        "sglang:num_queue_reqs",
        "tgi_queue_size",
        "llamacpp:requests_deferred",
    ),
    "kv_cache_usage": (                   # a fraction, 0..1, whatever the name says
        "vllm:kv_cache_usage_perc",       # vLLM V1
        "vllm:gpu_cache_usage_perc",      # vLLM before V1 (V1 still exports it on some versions)
        "sglang:token_usage",
        "llamacpp:kv_cache_usage_ratio",  # older llama-server builds
    ),
}
FRACTIONS = frozenset({"kv_cache_usage"})
_WANTED: dict[str, tuple[str, int]] = {
    name: (gauge, rank) for gauge, names in GAUGE_NAMES.items() for rank, name in enumerate(names)}


def metrics_url_for(base_url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/metrics`` (servers serve /metrics beside /v1)."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[:-3]
    return root + "/metrics"


# -- parsing -----------------------------------------------------------------------------------------

def _families(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)


def iter_samples(text: str, names: frozenset[str] | set[str] | None = None
                 ) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page as ``(name, labels, value)``, parsed by prometheus-client's
    maintained parser (escapes, timestamps, NaN, exemplars). A page the parser rejects as a whole is read
    line by line, so one malformed line costs only itself. With ``names``, only those metrics come back.
    """
    try:
        samples = list(_families(text))
    except ValueError:
        samples = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                samples.extend(_families(line + "\n"))
            except ValueError:
                continue
    for sample in samples:
        if names is None or sample[0] in names:
            yield sample


def parse_gauges(text: str) -> dict[str, float]:
    """The gauges we know, under canonical names: ``requests_running``, ``requests_waiting`` (counts,
    summed over label sets) and ``kv_cache_usage`` (a 0..1 fraction, averaged). Missing ones are absent;
    NaN samples are ignored."""
    found: dict[str, dict[str, list[float]]] = {}
    for name, _labels, value in iter_samples(text, set(_WANTED)):
        if math.isnan(value):
            continue
        gauge, _rank = _WANTED[name]
        found.setdefault(gauge, {}).setdefault(name, []).append(value)
    out: dict[str, float] = {}
    for gauge, by_name in found.items():
        best = min(by_name, key=lambda n: _WANTED[n][1])
        values = by_name[best]
        out[gauge] = sum(values) / len(values) if gauge in FRACTIONS else sum(values)
    return out


# -- averaging over a window ---------------------------------------------------------------------------

@dataclass
class GaugeStats:
    """Mean and max of each gauge over the polls of one window; pure."""

    polls: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)

    def add(self, reading: Mapping[str, float]) -> None:
        self.polls += 1
        for key, value in reading.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
            self.maxima[key] = max(self.maxima.get(key, value), value)

    def summary(self) -> dict[str, float | int]:
        """``{"polls": n, "requests_running_mean": .., "requests_running_max": .., ...}``."""
        out: dict[str, float | int] = {"polls": self.polls}
        for key in GAUGE_NAMES:
            if self.counts.get(key):
                out[f"{key}_mean"] = round(self.sums[key] / self.counts[key], 4)
                out[f"{key}_max"] = round(self.maxima[key], 4)
        return out


class TextGetter(Protocol):
    async def get_text(self, url: str, timeout_s: float = ...) -> tuple[int, str]:
        """GET ``url``: (status, body text); raise ``TransportError`` when there is no answer."""


class MetricsPoller:
    """Polls ``url`` every ``interval_s`` until cancelled, folding each page into ``stats``.

    A first answer that is not 200, or that has none of the known gauges, ends polling with ``error`` set:
    the server has no usable /metrics and asking again would only add load.
    """

    def __init__(self, getter: TextGetter, url: str, *, interval_s: float = POLL_INTERVAL_S,
                 timeout_s: float = POLL_TIMEOUT_S,
                 sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        self.getter = getter
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.stats = GaugeStats()
        self.error: str | None = None

    async def run(self) -> None:
        # Half an interval in: a sample at the very start would see the server before the load arrived.
        await self.sleep(self.interval_s / 2)
        failures = 0
        while True:
            try:
                status, text = await self.getter.get_text(self.url, self.timeout_s)
            except TransportError as exc:
                failures += 1
                if self.stats.polls == 0 or failures >= MAX_CONSECUTIVE_FAILURES:
                    self.error = f"{self.url}: {exc}"
                    return
            else:
                if status != 200:
                    self.error = f"{self.url}: HTTP {status}"
                    return
                reading = parse_gauges(text)
                if not reading and self.stats.polls == 0:
                    self.error = f"{self.url}: none of the known gauges (vLLM, SGLang, TGI, llama.cpp)"
                    return
                failures = 0
                self.stats.add(reading)
            await self.sleep(self.interval_s)
