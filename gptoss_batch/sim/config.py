"""SimConfig: every knob of serve-sim in one frozen dataclass.

Each field's ``help`` metadata is also its ``serve-sim --help`` text (the CLI is built from the fields), so the
two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gptoss_batch.errors import ConfigError

SERVER, ENGINE, TIMING, FAULTS = "Server", "Engine model", "Fixed timing", "Faults"


def _knob(default: Any, text: str, panel: str, flag: str | None = None) -> Any:
    meta: dict[str, str] = {"help": text, "panel": panel}
    if flag is not None:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated vLLM server behaves. Durations are seconds, rates are probabilities per request."""

    # --- the API surface
    model: str = _knob("gpt-oss-20b", "Model name served by /v1/models and echoed in responses.", SERVER)
    strict_model: bool = _knob(False, "Answer 404 (OpenAI error body) for any other model name; by default "
                               "any name is accepted.", SERVER)
    max_model_len: int = _knob(8192, "Context length: prompt tokens + max_tokens above it is a 400.", SERVER)
    default_max_tokens: int = _knob(64, "max_tokens used when the request gives neither max_tokens nor "
                                    "max_completion_tokens.", SERVER)
    seed: int = _knob(0, "Seed of every random choice (text, output lengths, faults). The request's own "
                      "`seed` field is mixed in too.", SERVER)
    metrics_enabled: bool = _knob(True, "Serve Prometheus metrics on /metrics (404 when off).", SERVER,
                                  flag="--metrics/--no-metrics")
    omit_done: bool = _knob(False, "End streams without the final `data: [DONE]` line.", SERVER)
    separate_finish_chunk: bool = _knob(False, "Streaming: send finish_reason in an empty chunk of its own "
                                        "(OpenAI style) instead of on the last content chunk (vLLM style).",
                                        SERVER)
    request_log: Path | None = _knob(  # noqa: RUF009 - _knob returns a dataclasses.field
        None, "Append one JSON line per completion request to this file (arrival/done times, status, fault, "
        "the Retry-After sent, in_flight, running, waiting).", SERVER)

    # --- the engine model (continuous batching)
    max_num_seqs: int = _knob(16, "Sequences decoded together; further requests wait in a FIFO queue.",
                              ENGINE)
    kv_tokens: int = _knob(131072, "KV-cache budget in tokens: a request reserves prompt + max_tokens while "
                           "it runs and waits while that does not fit.", ENGINE)
    prefill_s_per_token: float = _knob(0.00002, "Prefill time per prompt token, added to the step that "
                                       "admits the request.", ENGINE)
    decode_base_s: float = _knob(0.0015, "Decode step time with one running sequence.", ENGINE)
    decode_slope: float = _knob(0.02, "Step time grows as decode_base_s * (1 + decode_slope * running): "
                                "throughput rises with batch size and flattens towards "
                                "1 / (decode_base_s * decode_slope) tokens/s.", ENGINE)
    tokens_per_step: int = _knob(1, "Tokens each running sequence gets per engine step (and per streamed "
                                 "chunk); raise it for fewer wake-ups.", ENGINE)
    min_tokens: int = _knob(4, "Shortest natural output length.", ENGINE)
    natural_max_tokens: int | None = _knob(None, "Longest natural output length; the request's max_tokens "
                                           "truncates it (finish_reason \"length\"). Default: the request's "
                                           "max_tokens, so most outputs stop on their own.", ENGINE)
    capacity_change_after_s: float | None = _knob(None, "Seconds after start when max_num_seqs changes to "
                                                  "capacity_change_slots.", ENGINE)
    capacity_change_slots: int | None = _knob(None, "The new max_num_seqs after capacity_change_after_s.",
                                              ENGINE)

    # --- fixed timing, for timing-truth tests
    ttft_s: float | None = _knob(None, "Fixed schedule: first token this long after arrival. Setting it (or "
                                 "itl_s) replaces the engine model: each request is independent, no "
                                 "queueing, no batching slowdown.", TIMING)
    itl_s: float | None = _knob(None, "Fixed schedule: one token every itl_s after the first.", TIMING)

    # --- faults, each decided independently per request (first in this order wins)
    reset_rate: float = _knob(0.0, "Share of requests whose connection is reset before any response.", FAULTS)
    stall_rate: float = _knob(0.0, "Share of requests that are accepted and then get nothing for stall_s.",
                              FAULTS)
    stall_s: float = _knob(3600.0, "How long a stalled request hangs before its connection is closed.",
                           FAULTS)
    fail_500_rate: float = _knob(0.0, "Share of requests answered 500 at once.", FAULTS)
    fail_503_rate: float = _knob(0.0, "Share of requests answered 503 at once.", FAULTS)
    fail_429_rate: float = _knob(0.0, "Share of requests answered 429 at once.", FAULTS)
    retry_after_share: float = _knob(0.5, "Share of 429s that carry `Retry-After: <retry_after_s>`.", FAULTS)
    retry_after_s: float = _knob(1.0, "Retry-After value, in seconds, for 429s and overload answers.", FAULTS)
    malformed_rate: float = _knob(0.0, "Share of requests answered 200 with a body (or an SSE chunk) that "
                                  "is not valid JSON.", FAULTS)
    stream_cut_rate: float = _knob(0.0, "Share of requests whose connection is aborted halfway through the "
                                   "response (after some SSE chunks, or mid-body).", FAULTS)
    slow_first_byte_s: float = _knob(0.0, "Extra delay before the first byte of the response.", FAULTS)
    slow_first_byte_rate: float = _knob(1.0, "Share of requests that get the slow_first_byte_s delay.",
                                        FAULTS)
    overload_queue_limit: int | None = _knob(None, "Answer overload_status at once while this many "
                                             "requests (or more) are waiting.", FAULTS)
    overload_status: int = _knob(429, "Status of overload answers: 429 or 503.", FAULTS)
    crash_above_running: int | None = _knob(None, "Crash when running + waiting exceeds this: from then on "
                                            "every request and /health get 503 until restarted.", FAULTS)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") or f.name.endswith("_share"):
                if not 0.0 <= value <= 1.0:
                    problems.append(f"{f.name} must be within 0..1, not {value}")
            elif isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                problems.append(f"{f.name} must be a finite number >= 0, not {value}")
        positive = ("max_model_len", "default_max_tokens", "max_num_seqs", "kv_tokens", "tokens_per_step",
                    "natural_max_tokens", "capacity_change_slots", "min_tokens")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, not {value}")
        for name in ("overload_queue_limit", "crash_above_running"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0, not {value}")
        if self.overload_status not in (429, 503):
            problems.append(f"overload_status must be 429 or 503, not {self.overload_status}")
        if (self.capacity_change_after_s is None) != (self.capacity_change_slots is None):
            problems.append("capacity_change_after_s and capacity_change_slots go together")
        if problems:
            raise ConfigError("serve-sim: " + "; ".join(problems))

    @property
    def fixed_schedule(self) -> bool:
        """True when ttft_s/itl_s replace the engine model."""
        return self.ttft_s is not None or self.itl_s is not None

    def slots_at(self, elapsed_s: float) -> int:
        """max_num_seqs in effect ``elapsed_s`` seconds after start."""
        if (self.capacity_change_after_s is not None and self.capacity_change_slots is not None
                and elapsed_s >= self.capacity_change_after_s):
            return self.capacity_change_slots
        return self.max_num_seqs
