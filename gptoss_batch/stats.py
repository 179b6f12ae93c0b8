"""Pure statistics: results in, a Summary out (counts, rates, latency/TTFT/TPOT percentiles, goodput).

Memory stays bounded on any number of rows: samples are kept exactly up to ``EXACT_SAMPLES`` and then
folded into a log-bucket histogram with 0.5% relative error.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from gptoss_batch.records import Result

EXACT_SAMPLES = 100_000
_LOG_STEP = math.log1p(0.01)  # bucket width: 1% ratio -> at most 0.5% error at the bucket midpoint
PERCENTILES = (50, 90, 95, 99)


class Samples:
    """Streaming sample store: exact quantiles for small runs, a log histogram for huge ones."""

    __slots__ = ("_buckets", "_exact", "count", "max", "min", "total", "zeros")

    def __init__(self) -> None:
        self._exact: list[float] | None = []
        self._buckets: Counter[int] = Counter()
        self.zeros = 0
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: float) -> None:
        self.count += 1
        self.total += x
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x
        if self._exact is not None:
            self._exact.append(x)
            if len(self._exact) > EXACT_SAMPLES:
                for v in self._exact:
                    self._bucket(v)
                self._exact = None
        else:
            self._bucket(x)

    def _bucket(self, x: float) -> None:
        if x <= 0:
            self.zeros += 1
        else:
            self._buckets[math.floor(math.log(x) / _LOG_STEP)] += 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """q in [0, 1]; linear interpolation between order statistics (numpy's default)."""
        if not self.count:
            return None
        if self._exact is not None:
            data = self._exact
            data.sort()  # in place: nearly free when nothing was added since the last call (timsort)
            pos = q * (len(data) - 1)
            lo = math.floor(pos)
            hi = min(lo + 1, len(data) - 1)
            return data[lo] + (data[hi] - data[lo]) * (pos - lo)
        rank = q * (self.count - 1)
        seen = self.zeros
        if rank < seen:
            return 0.0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if rank < seen:
                return min(self.max, max(self.min, math.exp((b + 0.5) * _LOG_STEP)))
        return self.max

    def describe(self) -> dict[str, float | None]:
        if not self.count:
            return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "min": None, "max": None}
        out: dict[str, float | None] = {"mean": self.mean}
        for p in PERCENTILES:
            out[f"p{p}"] = self.quantile(p / 100)
        out["min"], out["max"] = self.min, self.max
        return {k: (round(v, 6) if v is not None else None) for k, v in out.items()}


def stream_timings(started_at: float, chunk_times: Sequence[float], end: float,
                   usage_tokens: int | None) -> dict[str, Any]:
    """TTFT, TPOT and inter-token latency for one streamed response (all ``perf_counter()`` seconds).

    * ``ttft_s``: request start to the first event carrying output (not the role-only chunk).
    * ``output_tokens`` and ``output_tokens_source``: from ``usage`` when the server sent it (a chunk may
      carry several tokens), else the counted content events ("chunks").
    * ``tpot_s``: (latency − TTFT) / (output tokens − 1), the mean time per token after the first.
    * ``itl_s``: mean, median and largest gap between consecutive content events. Events that arrived in
      one read share its time, so a client that fell behind shows gaps of 0 and a longer one before them.
    """
    if not chunk_times:
        return {}
    ttft = chunk_times[0] - started_at
    tokens, source = (usage_tokens, "usage") if usage_tokens else (len(chunk_times), "chunks")
    latency = end - started_at
    out: dict[str, Any] = {"ttft_s": ttft, "output_tokens": tokens, "output_tokens_source": source}
    if tokens > 1:
        out["tpot_s"] = max(latency - ttft, 0.0) / (tokens - 1)
    if len(chunk_times) > 1:
        gaps = sorted(b - a for a, b in pairwise(chunk_times))
        mid = len(gaps) // 2
        p50 = gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2
        out["itl_s"] = {"mean": round((chunk_times[-1] - chunk_times[0]) / len(gaps), 6), "p50": round(p50, 6),
                        "max": round(gaps[-1], 6)}
    return out


@dataclass
class SummaryBuilder:
    """Accumulates results as they finish; ``summary()`` can be called at any time (progress, end)."""

    slos: Mapping[str, float] = field(default_factory=dict)
    total_rows: int | None = None
    latency: Samples = field(default_factory=Samples)
    ttft: Samples = field(default_factory=Samples)
    tpot: Samples = field(default_factory=Samples)
    # Each row's mean inter-token latency (as guidellm reports ITL): rows, not gaps, are the samples, so a
    # resumed run's overall summary, rebuilt from result lines, agrees with the live one.
    itl: Samples = field(default_factory=Samples)
    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    attempts: int = 0
    good: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    runs: Counter[int] = field(default_factory=Counter)
    concurrency: Counter[int] = field(default_factory=Counter)

    def add(self, r: Result) -> None:
        self.attempts += r.attempts
        for a in r.attempt_log:
            self.retries[f"{a.kind}:{a.status}" if a.status else a.kind] += 1
        if r.run is not None:
            self.runs[r.run] += 1
        if r.status != "ok":
            self.failed += 1
            self.errors[r.error.kind if r.error else "unknown"] += 1
            return
        self.ok += 1
        if r.concurrency is not None:
            self.concurrency[r.concurrency] += 1
        self.latency.add(r.latency_s)
        # From usage, or a stream's counted chunks when the server sent no usage.
        self.output_tokens += r.output_tokens
        if r.usage is not None:
            self.prompt_tokens += r.usage.prompt_tokens
        if r.ttft_s is not None:
            self.ttft.add(r.ttft_s)
        if r.tpot_s is not None:
            self.tpot.add(r.tpot_s)
        if r.itl_s is not None and "mean" in r.itl_s:
            self.itl.add(r.itl_s["mean"])
        if self.slos and self._meets_slos(r):
            self.good += 1

    def _meets_slos(self, r: Result) -> bool:
        values = {"ttft": r.ttft_s, "tpot": r.tpot_s, "latency": r.latency_s,
                  "itl": r.itl_s.get("mean") if r.itl_s else None}
        return all(values[k] is not None and values[k] <= limit  # type: ignore[operator]
                   for k, limit in self.slos.items())

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def summary(self, wall_s: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        wall = max(wall_s, 1e-9)
        out: dict[str, Any] = {
            "rows": {"total": self.total_rows, "done": self.done, "ok": self.ok, "failed": self.failed},
            "wall_s": round(wall_s, 6),
            "requests_per_s": round(self.done / wall, 4),
            "ok_per_s": round(self.ok / wall, 4),
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens_per_s": round(self.output_tokens / wall, 3),
            "success_rate": round(self.ok / self.done, 6) if self.done else None,
            "attempts": self.attempts,
            "latency_s": self.latency.describe(),
            "errors_by_kind": dict(self.errors),
            "retries_by_cause": dict(self.retries),
        }
        if self.ttft.count:
            out["ttft_s"] = self.ttft.describe()
            out["tpot_s"] = self.tpot.describe()
            out["itl_s"] = self.itl.describe()
        if self.slos:
            out["slos"] = dict(self.slos)
            out["goodput"] = {"rows": self.good, "share": round(self.good / self.done, 6) if self.done else None,
                              "per_s": round(self.good / wall, 4)}
        if self.runs:
            out["runs"] = {str(k): v for k, v in sorted(self.runs.items())}
        if self.concurrency:
            out["concurrency"] = {"most_common": self.concurrency.most_common(1)[0][0],
                                  "max": max(self.concurrency)}
        if extra:
            out.update(extra)
        return out
