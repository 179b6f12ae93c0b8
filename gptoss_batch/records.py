"""The data that flows through a run: input rows, transport completions and result lines.

Frozen, slotted dataclasses; ``Result.to_line``/``Result.from_line`` are the one JSONL codec (orjson).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Route = Literal["chat", "completions"]
Status = Literal["ok", "error"]

ROUTE_PATHS: dict[Route, str] = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True, slots=True)
class Row:
    """One input row.

    ``payload`` holds the request fields the row brings (``messages`` or ``prompt`` plus any per-row
    overrides such as ``max_tokens``); defaults from the config are merged in by ``build_body``.
    ``route`` is None when the row does not pick one (the config or its shape decides).
    """

    id: str
    index: int
    line: int
    payload: dict[str, Any]
    route: Route | None = None
    explicit_id: bool = False
    # Set (with --on-invalid skip) when the row could not be used: the runner records it as an error line.
    invalid: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_json(cls, raw: Any) -> Usage | None:
        if not isinstance(raw, dict):
            return None

        def num(key: str) -> int:
            v = raw.get(key)
            return v if isinstance(v, int) else 0

        p, c = num("prompt_tokens"), num("completion_tokens")
        return cls(p, c, num("total_tokens") or p + c)

    def to_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful response as the transport parsed it (streamed or not)."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str | None
    # Streaming only: perf_counter() times of the request start and of each chunk carrying content.
    started_at: float | None = None
    chunk_times: tuple[float, ...] = ()
    reasoning: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    kind: str
    message: str
    status: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.status is not None:
            out["status"] = self.status
        return out

    @classmethod
    def from_json(cls, raw: Any) -> ErrorInfo | None:
        if not isinstance(raw, dict):
            return None
        status = raw.get("status")
        return cls(str(raw.get("kind", "unknown")), str(raw.get("message", "")),
                   status if isinstance(status, int) else None)


@dataclass(frozen=True, slots=True)
class Attempt:
    """A failed attempt, as recorded in the result line's attempt log."""

    kind: str
    status: int | None
    wait_s: float
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "wait_s": round(self.wait_s, 3)}
        if self.status is not None:
            out["status"] = self.status
        if self.message:
            out["message"] = self.message[:200]
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Attempt | None:
        if not isinstance(raw, dict):
            return None
        status, wait_s = raw.get("status"), raw.get("wait_s")
        return cls(str(raw.get("kind", "unknown")), status if isinstance(status, int) else None,
                   float(wait_s) if isinstance(wait_s, int | float) else 0.0, str(raw.get("message", "")))


@dataclass(frozen=True, slots=True)
class Result:
    """One output line: the final (or latest) outcome of one input row."""

    id: str
    index: int
    status: Status
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    latency_s: float = 0.0
    attempts: int = 1
    error: ErrorInfo | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: dict[str, float] | None = None
    output_tokens_source: str | None = None
    concurrency: int | None = None
    attempt_log: tuple[Attempt, ...] = ()
    run: int | None = None
    reasoning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def output_tokens(self) -> int:
        """From ``usage``; for a stream without usage, the chunks counted (kept in ``extra``)."""
        if self.usage is not None:
            return self.usage.completion_tokens
        counted = self.extra.get("output_tokens")
        return counted if isinstance(counted, int) else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "index": self.index, "status": self.status}
        if self.text is not None:
            out["text"] = self.text
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        if self.usage is not None:
            out["usage"] = self.usage.to_json()
        if self.model is not None:
            out["model"] = self.model
        out["latency_s"] = round(self.latency_s, 6)
        out["attempts"] = self.attempts
        if self.error is not None:
            out["error"] = self.error.to_json()
        if self.ttft_s is not None:
            out["ttft_s"] = round(self.ttft_s, 6)
        if self.tpot_s is not None:
            out["tpot_s"] = round(self.tpot_s, 6)
        if self.itl_s is not None:
            out["itl_s"] = self.itl_s
        if self.output_tokens_source is not None:
            out["output_tokens_source"] = self.output_tokens_source
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        if self.attempt_log:
            out["attempt_log"] = [a.to_json() for a in self.attempt_log]
        if self.run is not None:
            out["run"] = self.run
        if self.extra:
            out.update(self.extra)
        return out

    def to_line(self) -> bytes:
        """The JSONL line, newline included, ready for a single write call."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Result:
        def opt_float(key: str) -> float | None:
            v = raw.get(key)
            return float(v) if isinstance(v, int | float) else None

        status: Status = "ok" if raw.get("status") == "ok" else "error"
        itl = raw.get("itl_s")
        conc = raw.get("concurrency")
        run = raw.get("run")
        log = raw.get("attempt_log")
        attempts = tuple(a for a in map(Attempt.from_json, log) if a is not None) if isinstance(log, list) else ()
        return cls(
            id=str(raw["id"]),
            index=int(raw.get("index", -1)),
            status=status,
            text=raw.get("text"),
            finish_reason=raw.get("finish_reason"),
            usage=Usage.from_json(raw.get("usage")),
            model=raw.get("model"),
            latency_s=float(raw.get("latency_s") or 0.0),
            attempts=int(raw.get("attempts") or 1),
            error=ErrorInfo.from_json(raw.get("error")),
            ttft_s=opt_float("ttft_s"),
            tpot_s=opt_float("tpot_s"),
            itl_s=itl if isinstance(itl, dict) else None,
            output_tokens_source=raw.get("output_tokens_source"),
            # Counted chunks of a stream without usage: kept so resumed summaries count them too.
            extra={"output_tokens": raw["output_tokens"]} if isinstance(raw.get("output_tokens"), int) else {},
            concurrency=conc if isinstance(conc, int) else None,
            attempt_log=attempts,
            run=run if isinstance(run, int) else None,
            reasoning=raw.get("reasoning"),
        )

    @classmethod
    def from_line(cls, line: bytes | str) -> Result:
        return cls.from_json(orjson.loads(line))
