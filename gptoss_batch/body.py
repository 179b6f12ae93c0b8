"""Pure request-body building: a row plus the config's defaults becomes (route, JSON bytes).

Row fields win over config defaults. A ``prompt`` row sent to the chat route becomes one user message,
since instruction-tuned models (GPT-OSS among them) need the chat template to answer well.
"""

from __future__ import annotations

from typing import Any

import orjson

from gptoss_batch.config import RunConfig
from gptoss_batch.records import Route, Row


class BodyBuilder:
    """Precomputes the defaults once; ``build`` is on the per-row hot path."""

    __slots__ = ("_defaults", "_route", "_stream")

    def __init__(self, cfg: RunConfig) -> None:
        defaults: dict[str, Any] = {}
        if cfg.model is not None:
            defaults["model"] = cfg.model
        if cfg.max_tokens is not None:
            defaults["max_tokens"] = cfg.max_tokens
        if cfg.temperature is not None:
            defaults["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            defaults["top_p"] = cfg.top_p
        defaults.update(cfg.params)
        self._defaults = defaults
        self._route = cfg.route
        self._stream = cfg.stream

    def route_for(self, row: Row) -> Route:
        if row.route is not None:
            return row.route
        if self._route != "auto":
            return self._route
        return "chat"

    def build(self, row: Row) -> tuple[Route, bytes]:
        route = self.route_for(row)
        body = {**self._defaults, **row.payload}
        if route == "chat" and "messages" not in body and isinstance(body.get("prompt"), str):
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        elif route == "completions" and "prompt" not in body and "messages" in body:
            body["prompt"] = _flatten_messages(body.pop("messages"))
        if self._stream:
            body["stream"] = True
            # Ask for the usage chunk (exact output tokens), keeping any other option the row set.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return route, orjson.dumps(body)


def rejects_stream_options(status: int | None, message: str) -> bool:
    """Whether an error answer refuses ``stream_options`` itself (servers that predate it answer 400 or 422,
    e.g. "Unrecognized request argument supplied: stream_options"), rather than anything else in the request."""
    if status not in (400, 422):
        return False
    text = message.lower()
    return "stream_options" in text or "stream options" in text


def without_stream_options(body: bytes) -> bytes | None:
    """The same request body without ``stream_options``; None when it has none."""
    if b'"stream_options"' not in body:
        return None
    data = orjson.loads(body)
    if not isinstance(data, dict) or data.pop("stream_options", None) is None:
        return None
    return orjson.dumps(data)


def _flatten_messages(messages: Any) -> str:
    """A messages row on the completions route: the contents joined, for base models."""
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "\n\n".join(parts)
