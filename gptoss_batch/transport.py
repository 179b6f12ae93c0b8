"""The HTTP layer: one aiohttp session, request in, ``Completion`` or a typed ``TransportError`` out.

Also the SSE decoder for streamed responses. Nothing else in the package imports aiohttp; every
aiohttp/asyncio exception is translated to our error tree in ``_translate_errors``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from gptoss_batch.config import Timeouts
from gptoss_batch.errors import (
    ConnectError,
    HTTPStatusError,
    ProtocolError,
    StreamError,
    TimeoutError_,
    TransportError,
)
from gptoss_batch.records import ROUTE_PATHS, Completion, Route, Usage

_JSON = "application/json"


class SSEDecoder:
    """Incremental server-sent-events decoder: feed bytes, get complete ``data`` payloads.

    Splits events on blank lines (``\\n\\n``, ``\\r\\n\\r\\n`` or mixed), joins multi-line ``data:`` fields with
    ``\\n``, ignores comments (``:``) and other fields. ``close()`` returns a last event that had no trailing
    blank line. Byte-level buffering means a chunk boundary may fall anywhere, even inside a UTF-8
    character or a ``\\r\\n``.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[bytes] = []
        if b"\r" not in buf:  # the common case: \n line endings only
            lines = buf.split(b"\n")
            self._buf = lines.pop()
            for line in lines:
                self._line(line, events)
            return events
        start, n = 0, len(buf)
        while start < n:
            nl = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, nl) if nl >= 0 else buf.find(b"\r", start)
            if cr >= 0:
                if cr == n - 1:
                    break  # maybe the first half of a \r\n: wait for the next chunk
                end, nxt = cr, cr + 2 if buf[cr + 1] == 10 else cr + 1
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            self._line(buf[start:end], events)
            start = nxt
        self._buf = buf[start:]
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # comments (":...") and other fields (event:, id:, retry:) carry nothing we use

    def close(self) -> list[bytes]:
        events: list[bytes] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), events)
            self._buf = b""
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
        return events


def error_message(body: bytes, status: int | None = None) -> str:
    """The server's own words from an error body (OpenAI, vLLM, llama.cpp and TGI shapes)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or (f"HTTP {status}" if status else "empty response")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str) and err:
            return err[:500]
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])[:500]
    return (body.decode("utf-8", "replace").strip()[:500]) or f"HTTP {status}"


def parse_completion(data: Any, route: Route) -> Completion:
    """A non-streamed response body (already JSON-decoded) -> Completion."""
    if not isinstance(data, dict):
        raise ProtocolError("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        if "error" in data:
            raise StreamError(f"server error in body: {error_message(orjson.dumps(data))}")
        raise ProtocolError("response has no choices")
    choice = choices[0]
    reasoning: str | None = None
    if route == "chat":
        msg = choice.get("message")
        if not isinstance(msg, dict):
            raise ProtocolError("chat response choice has no message")
        text = msg.get("content")
        r = msg.get("reasoning_content") or msg.get("reasoning")
        reasoning = r if isinstance(r, str) else None
    else:
        text = choice.get("text")
    model = data.get("model")
    return Completion(
        text=text if isinstance(text, str) else "",
        finish_reason=choice.get("finish_reason"),
        usage=Usage.from_json(data.get("usage")),
        model=model if isinstance(model, str) else None,
        reasoning=reasoning,
    )


class StreamAccumulator:
    """Folds streamed chunks into a Completion, timing each chunk that carries content."""

    __slots__ = ("chunk_times", "finish_reason", "model", "parts", "reasoning", "route", "started_at", "usage")

    def __init__(self, route: Route, started_at: float) -> None:
        self.route = route
        self.started_at = started_at
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.chunk_times: list[float] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None

    def add(self, payload: bytes, now: float) -> bool:
        """Add one event's data; returns True at ``[DONE]``."""
        if payload == b"[DONE]":
            return True
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"stream event is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ProtocolError("stream event is not a JSON object")
        if "error" in data and not data.get("choices"):
            raise StreamError(f"error event in stream: {error_message(payload)}")
        if self.model is None and isinstance(data.get("model"), str):
            self.model = data["model"]
        usage = data.get("usage")
        if usage:
            self.usage = Usage.from_json(usage)
        choices = data.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if self.route == "chat":
                delta = choice.get("delta")
                content = delta.get("content") if isinstance(delta, dict) else None
                r = (delta.get("reasoning_content") or delta.get("reasoning")) if isinstance(delta, dict) else None
                if isinstance(r, str) and r:
                    self.reasoning.append(r)
                    self.chunk_times.append(now)
            else:
                content = choice.get("text")
            if isinstance(content, str) and content:
                self.parts.append(content)
                if not self.chunk_times or self.chunk_times[-1] != now:
                    self.chunk_times.append(now)
            fr = choice.get("finish_reason")
            if fr:
                self.finish_reason = fr
        return False

    def result(self) -> Completion:
        return Completion(
            text="".join(self.parts),
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.model,
            started_at=self.started_at,
            chunk_times=tuple(self.chunk_times),
            reasoning="".join(self.reasoning) if self.reasoning else None,
        )


@contextmanager
def _translate_errors(url: str, timeouts: Timeouts, stream: bool) -> Iterator[None]:
    """Map aiohttp/asyncio exceptions to our tree, most specific first, always with a message."""
    try:
        yield
    except TransportError:
        raise
    # Timeouts first: aiohttp's are also ClientErrors/OSErrors. str(TimeoutError()) is empty, so each
    # message names the limit that fired and the flag that sets it.
    except aiohttp.ConnectionTimeoutError as exc:
        raise TimeoutError_(f"connect timeout: no connection to {url} within {timeouts.connect_s:g}s "
                            "(--connect-timeout)") from exc
    except aiohttp.SocketTimeoutError as exc:
        # aiohttp's sock_read: the time between two reads, from the request being sent on (so it also
        # bounds the wait for the response headers, which is all of a non-streamed generation).
        raise TimeoutError_(f"read timeout: no data from {url} for {timeouts.read_timeout_s(stream):g}s "
                            "(--read-timeout)") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise TimeoutError_(f"request timeout: the attempt took longer than {timeouts.request_s:g}s "
                            f"({url}, --request-timeout)") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ConnectError(f"cannot connect to {url}: {exc.os_error.strerror or exc}") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise ConnectError(f"server disconnected before answering: {url}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise StreamError(f"response cut short: {str(exc) or exc.__class__.__name__} ({url})") from exc
    except (aiohttp.ClientOSError, ConnectionResetError, BrokenPipeError) as exc:
        raise ConnectError(f"connection error: {exc.strerror or str(exc) or exc.__class__.__name__} ({url})") from exc
    except aiohttp.ClientResponseError as exc:
        raise ProtocolError(f"bad HTTP response: {exc.message or exc.__class__.__name__} ({url})") from exc
    except aiohttp.ClientError as exc:
        raise ConnectError(f"{exc.__class__.__name__}: {str(exc) or 'client error'} ({url})") from exc
    except OSError as exc:  # raised past aiohttp's wrapping, e.g. EMFILE: too many open files
        raise ConnectError(f"connection error: {exc.strerror or str(exc) or exc.__class__.__name__} ({url})") from exc


class AiohttpTransport:
    """Satisfies ``runner.Transport``. Use as an async context manager; one session for the run."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        timeouts: Timeouts | None = None,
        limit: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts = timeouts or Timeouts()
        self._limit = limit
        h = {"Content-Type": _JSON, "Accept": "application/json, text/event-stream"}
        if api_key:
            h["Authorization"] = f"Bearer {api_key}"
        h.update(dict(headers))
        self._headers = h
        self._session: aiohttp.ClientSession | None = None
        self._timeout_plain = aiohttp.ClientTimeout(
            total=timeouts.request_s, sock_connect=timeouts.connect_s,
            sock_read=timeouts.read_timeout_s(False))
        self._timeout_stream = aiohttp.ClientTimeout(
            total=timeouts.request_s, sock_connect=timeouts.connect_s,
            sock_read=timeouts.read_timeout_s(True))

    async def __aenter__(self) -> AiohttpTransport:
        connector = aiohttp.TCPConnector(
            limit=self._limit, limit_per_host=0, keepalive_timeout=60, family=socket.AF_UNSPEC,
            enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=True, raise_for_status=False)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def resize(self, limit: int) -> None:
        """Let the connection pool follow the concurrency limit (adaptive concurrency)."""
        if self._session is not None:
            connector = self._session.connector
            if isinstance(connector, aiohttp.TCPConnector):
                connector._limit = max(limit, 1)  # no public setter; aiohttp reads it on each acquire

    async def send(self, route: Route, body: bytes, *, stream: bool) -> Completion:
        assert self._session is not None, "use AiohttpTransport as an async context manager"
        url = self.base_url + ROUTE_PATHS[route]
        with _translate_errors(url, self.timeouts, stream):
            started = time.perf_counter()
            async with self._session.post(
                url, data=body, timeout=self._timeout_stream if stream else self._timeout_plain,
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    raise HTTPStatusError(
                        f"HTTP {resp.status}: {error_message(raw, resp.status)}",
                        status=resp.status, headers=dict(resp.headers))
                ctype = resp.headers.get("Content-Type", "")
                if stream and "text/event-stream" in ctype:
                    return await self._read_stream(resp.content.iter_any(), route, started)
                raw = await resp.read()
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise ProtocolError(
                        f"response body is not valid JSON ({len(raw)} bytes, HTTP {resp.status})") from None
                return parse_completion(data, route)

    async def _read_stream(self, chunks: AsyncIterator[bytes], route: Route, started: float) -> Completion:
        decoder = SSEDecoder()
        acc = StreamAccumulator(route, started)
        perf = time.perf_counter
        async for chunk in chunks:
            now = perf()
            for event in decoder.feed(chunk):
                if acc.add(event, now):
                    return acc.result()
        for event in decoder.close():
            if acc.add(event, perf()):
                return acc.result()
        # No [DONE]: some servers never send it. A stream that said why it finished is complete.
        if acc.finish_reason is None and acc.usage is None:
            raise StreamError("stream ended before any finish_reason (connection cut mid-stream?)")
        return acc.result()

    async def get_text(self, url: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET a side URL (``/metrics``, ``/health``); failures come back as our errors."""
        assert self._session is not None
        with _translate_errors(url, self.timeouts, False):
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.text(errors="replace")

