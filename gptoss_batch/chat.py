"""One prompt, one answer: the library behind ``gptoss-batch chat``.

The request is built by the same ``BodyBuilder`` as a batch row and sent by the same transport, so a config
file, headers, ``--param`` and the ``stream_options`` fallback work as they do in ``run``. Text reaches the
caller through ``on_text`` as each chunk arrives; the caller decides where it goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from gptoss_batch.body import BodyBuilder
from gptoss_batch.config import RunConfig
from gptoss_batch.errors import ConfigError, TransportError
from gptoss_batch.records import Completion, Route, Row
from gptoss_batch.stats import stream_timings
from gptoss_batch.transport import AiohttpTransport

OnText = Callable[[str, bool], None]


def read_prompt(arg: str, stdin: IO[str]) -> str:
    """The prompt argument, or all of stdin for ``-``; an empty prompt is a usage error."""
    text = stdin.read() if arg == "-" else arg
    if not text.strip():
        raise ConfigError("the prompt is empty" + (" (nothing on stdin)" if arg == "-" else ""))
    return text


def build_request(cfg: RunConfig, prompt: str, system: str | None = None) -> tuple[Route, bytes]:
    """(route, body) for one prompt, with an optional system message first."""
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    route = cfg.route if cfg.route != "auto" else "chat"
    return BodyBuilder(cfg).build(Row(id="chat", index=0, line=0, payload={"messages": messages}, route=route))


@dataclass(frozen=True, slots=True)
class ChatOutcome:
    """The answer (or the error) and its timing; ``timing`` has stream_timings' keys when streamed."""

    completion: Completion | None
    error: TransportError | None
    latency_s: float
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int | None:
        c = self.completion
        if c is not None and c.usage is not None:
            return c.usage.completion_tokens
        tokens = self.timing.get("output_tokens")
        return tokens if isinstance(tokens, int) else None


async def chat_once(cfg: RunConfig, prompt: str, *, system: str | None = None, on_text: OnText | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> ChatOutcome:
    """Send one prompt; streamed pieces go to ``on_text(text, is_reasoning)`` as they arrive.

    One attempt, no retries: once text has been shown it cannot be taken back.
    """
    route, body = build_request(cfg, prompt, system)
    async with AiohttpTransport(cfg.base_url, api_key=cfg.api_key, headers=cfg.headers, timeouts=cfg.timeouts,
                                limit=1) as transport:
        t0 = clock()
        try:
            completion = await transport.send(route, body, stream=cfg.stream, on_text=on_text)
        except TransportError as exc:
            return ChatOutcome(None, exc, clock() - t0)
        t1 = clock()
    timing: dict[str, Any] = {}
    if completion.started_at is not None and completion.chunk_times:
        timing = stream_timings(completion.started_at, completion.chunk_times, t1,
                                completion.usage.completion_tokens if completion.usage else None)
    return ChatOutcome(completion, None, t1 - t0, timing)


def format_timing(outcome: ChatOutcome) -> str:
    """One line for stderr: TTFT, output tokens (and where the count came from), TPOT, tokens/s, latency."""
    parts: list[str] = []
    ttft = outcome.timing.get("ttft_s")
    if isinstance(ttft, float):
        parts.append(f"TTFT {ttft * 1000:.0f} ms")
    tokens = outcome.output_tokens
    if tokens is not None:
        source = outcome.timing.get("output_tokens_source", "usage")
        parts.append(f"{tokens} output tokens ({source})")
        tpot = outcome.timing.get("tpot_s")
        if isinstance(tpot, float):
            parts.append(f"TPOT {tpot * 1000:.1f} ms")
        if outcome.latency_s > 0:
            parts.append(f"{tokens / outcome.latency_s:.1f} tok/s")
    parts.append(f"{outcome.latency_s:.2f} s")
    if outcome.completion is not None and outcome.completion.finish_reason:
        parts.append(f"finish {outcome.completion.finish_reason}")
    return " · ".join(parts)
