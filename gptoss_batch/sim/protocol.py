"""The OpenAI wire format as vLLM speaks it: request parsing/validation and response bodies (pure).

Bodies follow vLLM's shapes (``id``/``object``/``created``/``model``/``choices``/``usage``, errors as
``{"error": {"message", "type", "param", "code"}}``); streams are ``data: {json}\\n\\n`` SSE events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gptoss_batch.sim.config import SimConfig
from gptoss_batch.sim.textgen import count_text_tokens

ApiRoute = Literal["chat", "completions"]

# Chat templates wrap each message in a few special tokens and prime the reply; roughly what vLLM counts.
TEMPLATE_TOKENS_PER_MESSAGE = 4
TEMPLATE_TOKENS_REPLY = 3

SSE_DONE = b"data: [DONE]\n\n"


class RequestError(Exception):
    """A request the API rejects; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    route: ApiRoute
    model: str
    prompt_key: str
    prompt_tokens: int
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise RequestError(400, "message content must be a string or a list of content parts")


def _prompt(route: ApiRoute, body: dict[str, Any]) -> tuple[str, int]:
    """The prompt's RNG key and its token count."""
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "'messages' must be a non-empty list of message objects")
        parts = [(str(m.get("role", "user")), _content_text(m.get("content"))) for m in messages]
        tokens = sum(count_text_tokens(text) + TEMPLATE_TOKENS_PER_MESSAGE for _, text in parts)
        return "\n".join(f"{role}: {text}" for role, text in parts), tokens + TEMPLATE_TOKENS_REPLY
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt, count_text_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    raise RequestError(400, "'prompt' must be a non-empty string, a list of one string or a list of token ids")


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer")
    return value


def parse_request(route: ApiRoute, raw: bytes, config: SimConfig) -> ParsedRequest:
    """Validate a completion request the way vLLM does; raises RequestError."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string")
    if config.strict_model and model != config.model:
        raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
    prompt_key, prompt_tokens = _prompt(route, body)
    max_tokens = _int_field(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.")
    if prompt_tokens + max_tokens > config.max_model_len:
        raise RequestError(400, (
            f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."))
    options = body.get("stream_options")
    return ParsedRequest(
        route=route,
        model=model or config.model,
        prompt_key=prompt_key,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        seed=_int_field(body, "seed"),
    )


def error_body(status: int, message: str, err_type: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every body and chunk of one response shares."""

    route: ApiRoute
    id: str
    created: int
    model: str

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion"
        if self.route == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.route == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "reasoning_content": None,
                                              "tool_calls": []}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=None)
        return {**self._head(False), "choices": [choice], "usage": usage_json(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.route == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text or (not role and finish_reason is None):
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage_json(prompt_tokens, completion_tokens)}


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"
