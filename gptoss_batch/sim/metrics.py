"""Prometheus text for /metrics under vLLM's names and labels (``vllm:...{model_name="..."}``).

A tiny histogram and a renderer; no prometheus_client needed.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# vLLM's own bucket boundaries, so dashboards and quantile estimates read the same.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out: list[str] = []
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}",{labels}}} {float(cumulative)}')
        out.append(f'{name}_bucket{{le="+Inf",{labels}}} {float(self.count)}')
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        return out


@dataclass(slots=True)
class EngineMetrics:
    """What /metrics reports beyond the live gauges."""

    ttft_s: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    e2e_s: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS_S))
    success_by_reason: Counter[str] = field(default_factory=Counter)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(model: str, *, running: int, waiting: int, kv_usage: float, prompt_tokens: int,
                   generation_tokens: int, metrics: EngineMetrics) -> str:
    labels = f'model_name="{_escape(model)}"'
    out: list[str] = []

    def head(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    for name, value, text in (
        ("vllm:num_requests_running", running, "Number of requests in model execution batches."),
        ("vllm:num_requests_waiting", waiting, "Number of requests waiting to be processed."),
        ("vllm:kv_cache_usage_perc", kv_usage, "KV-cache usage. 1 means 100 percent usage."),
        # The pre-V1 name of the same gauge, which older dashboards still read.
        ("vllm:gpu_cache_usage_perc", kv_usage, "GPU KV-cache usage. 1 means 100 percent usage."),
    ):
        head(name, "gauge", text)
        out.append(f"{name}{{{labels}}} {float(value)}")
    for name, value, text in (
        ("vllm:prompt_tokens_total", prompt_tokens, "Number of prefill tokens processed."),
        ("vllm:generation_tokens_total", generation_tokens, "Number of generation tokens processed."),
    ):
        head(name, "counter", text)
        out.append(f"{name}{{{labels}}} {float(value)}")
    head("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in ("stop", "length", *sorted(set(metrics.success_by_reason) - {"stop", "length"})):
        out.append(f'vllm:request_success_total{{finished_reason="{reason}",{labels}}} '
                   f"{float(metrics.success_by_reason[reason])}")
    head("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.")
    out += metrics.ttft_s.lines("vllm:time_to_first_token_seconds", labels)
    head("vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.")
    out += metrics.e2e_s.lines("vllm:e2e_request_latency_seconds", labels)
    return "\n".join(out) + "\n"
