"""The HTTP layer: one aiohttp session, request in, ``Completion`` or a typed ``TransportError`` out.

Also the SSE decoder for streamed responses. Nothing else in the package imports aiohttp; every
aiohttp/asyncio exception is translated to our error tree in ``_translate_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import orjson
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from gptoss_batch.body import rejects_stream_options, without_stream_options
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
# After [DONE], how long to wait for the end of the body before letting the connection go. Servers send it
# at once; past a reconnect's cost, waiting longer gains nothing.
DONE_DRAIN_S = 0.1
# A server may close the connection the moment a streamed answer ends, while announcing keep-alive (llama.cpp's
# llama-server does, after every stream). A request sent on that pooled connection before the close is seen
# fails before any answer ("Can not write request body", "server disconnected"): against llama-server nearly
# every streamed request failed once, and came back after a backoff. So a session learns it: its first streamed
# answers are watched for a moment each, and a close seen behind one (or a streamed request failing that way,
# which is then resent at once) ends connection reuse for the session; a fresh connection costs little next to a
# generation. Only the first few are watched, so a keep-alive limit ("max=100") closing a connection now and
# then changes nothing.
STREAMS_WATCHED_FOR_CLOSE = 8
CLOSE_WATCH_S = 0.001  # the close comes right behind the last chunk: one event-loop turn sees about half


class SSEDecoder:
    """Incremental server-sent-events decoder: feed bytes, get complete ``data`` payloads.

    Splits events on blank lines (``\\n``, ``\\r\\n`` or ``\\r`` line endings, mixed freely), joins multi-line
    ``data:`` fields with ``\\n`` and ignores comments (``:``), ``id:`` and ``retry:``. ``close()`` returns a last
    event that had no trailing blank line. A chunk boundary may fall anywhere, even inside a UTF-8 character or
    a ``\\r\\n``: the decoder works on bytes and never decodes text.

    Error events become ``{"error": ...}`` payloads, so one check downstream catches every style: the
    standard ``event: error`` + ``data: ...``, and llama.cpp's non-standard ``error: {...}`` field.
    """

    __slots__ = ("_buf", "_state")

    def __init__(self) -> None:
        self._buf = b""
        self._state = _FRESH

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buf and not self._state and chunk[-2:] == b"\n\n" and chunk[:6] == b"data: ":
            # The hot path: a read that holds exactly one `data: {...}` event, as servers write them.
            payload = chunk[6:-2]
            if b"\n" not in payload and b"\r" not in payload:
                return [payload]
        if self._state and chunk:
            if self._state == _AFTER_CR:
                if chunk[:1] == b"\n":
                    chunk = chunk[1:]  # the LF of a CRLF whose CR ended the previous read
            else:  # the first bytes: a byte-order mark may start the stream, even split across reads
                chunk = self._buf + chunk
                self._buf = b""
                if len(chunk) < 3 and _BOM.startswith(chunk):
                    self._buf = chunk
                    return []
                if chunk[:3] == _BOM:
                    chunk = chunk[3:]
            self._state = 0
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A CR ends a line at once (an event is never held back for the next read), and the LF that
            # may follow it in that read is dropped. Safe on payloads: JSON text cannot hold a raw CR.
            if buf[-1:] == b"\r":
                self._state = _AFTER_CR
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        events: list[bytes] = []
        for part in parts:
            # One `data: {...}` line per event, as vLLM, SGLang, llama.cpp and OpenAI send.
            if part[:6] == b"data: " and b"\n" not in part:
                events.append(part[6:])
            elif part:
                _parse_event(part, events)
        return events

    def close(self) -> list[bytes]:
        """End of stream: the last event, when it lacked its blank line."""
        tail = self._buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").strip(b"\n")
        if self._state == _FRESH and _BOM.startswith(tail):
            tail = b""
        self._buf = b""
        events: list[bytes] = []
        if tail:
            _parse_event(tail, events)
        return events


_BOM = b"\xef\xbb\xbf"
_FRESH = 1  # SSEDecoder._state: nothing read yet (a BOM may come)
_AFTER_CR = 2  # SSEDecoder._state: the last read ended with a CR (drop an LF that starts the next)


def _parse_event(block: bytes, events: list[bytes]) -> None:
    """One event's lines (``\\n``-separated, no blank line) -> its payload, if it has data or an error."""
    data: list[bytes] = []
    kind = b""
    for line in block.split(b"\n"):
        if not line or line[:1] == b":":
            continue  # a stray blank line (the block began with one) or a comment
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            kind = value
        elif name == b"error":  # llama.cpp's server_sent_event(sink, "error", ...)
            events.append(_error_payload(value))
    if data:
        payload = b"\n".join(data)
        events.append(_error_payload(payload) if kind == b"error" else payload)


def _error_payload(value: bytes) -> bytes:
    """Wrap an error event's text as ``{"error": ...}``: its JSON as it is, anything else as a string."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        obj = value.decode("utf-8", "replace")
    if isinstance(obj, dict) and "error" in obj:
        return orjson.dumps(obj)
    return orjson.dumps({"error": obj})


def _stream_error_message(data: dict[str, Any]) -> str:
    """The server's words from an in-stream error object (OpenAI/vLLM dict, TGI string, llama.cpp dict)."""
    err = data.get("error")
    if isinstance(err, dict):
        for key in ("message", "detail", "error"):
            if isinstance(err.get(key), str) and err[key]:
                return str(err[key])[:500]
        return orjson.dumps(err).decode()[:500]
    if isinstance(err, str) and err:
        return err[:500]
    return orjson.dumps(data).decode()[:500]


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
        if isinstance(data.get("detail"), list):
            return _validation_errors(data["detail"])[:500]
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])[:500]
    return (body.decode("utf-8", "replace").strip()[:500]) or f"HTTP {status}"


def _validation_errors(items: list[Any]) -> str:
    """FastAPI's 422 ``{"detail": [{"loc": ["body", ...], "msg": ...}, ...]}`` (transformers serve and other
    FastAPI servers) as "where: what; ...", instead of a Python list repr."""
    parts = []
    for item in items:
        if isinstance(item, dict) and item.get("msg"):
            loc = ".".join(str(x) for x in item.get("loc") or ())
            parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
        else:
            parts.append(orjson.dumps(item).decode())
    return "; ".join(parts) or "validation error"


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
    """Folds streamed chunks into a Completion, timing each event that carries output.

    ``chunk_times`` gets one ``perf_counter()`` time per event with content (or reasoning) for choice 0; the
    role-only chunk, the finish chunk and the usage chunk carry none. Events that arrived in one read share
    its time. ``on_text(text, reasoning)`` sees each piece as it arrives (the ``chat`` command prints them).
    """

    __slots__ = ("_chat", "chunk_times", "finish_reason", "model", "on_text", "parts", "reasoning", "started_at",
                 "usage")

    def __init__(self, route: Route, started_at: float,
                 on_text: Callable[[str, bool], None] | None = None) -> None:
        self._chat = route == "chat"
        self.started_at = started_at
        self.on_text = on_text
        self.parts: list[str] = []
        self.reasoning: list[str] = []
        self.chunk_times: list[float] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None

    def add(self, payload: bytes, now: float) -> bool:
        """Add one event's data; returns True at ``[DONE]``. Raises StreamError for an error event."""
        if payload == b"[DONE]":
            return True
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            if not payload.strip():
                return False  # an empty `data:` line: nothing to add
            raise ProtocolError(f"stream event is not valid JSON: {exc}") from None
        if type(data) is not dict:
            raise ProtocolError("stream event is not a JSON object")
        choices = data.get("choices")
        if choices:
            choice = choices[0] if type(choices) is list else None
            if type(choice) is dict and not choice.get("index"):  # choice 0 only (n > 1 interleaves)
                if self._chat:
                    delta = choice.get("delta")
                    content = None
                    if type(delta) is dict:
                        content = delta.get("content")
                        # A plain content delta has one key: skip the reasoning look-ups for it.
                        if content is None or len(delta) > 1:
                            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                            if reasoning and type(reasoning) is str:
                                self._reasoning(reasoning, now, bool(content))
                else:
                    content = choice.get("text")
                if content and type(content) is str:
                    self.parts.append(content)
                    self.chunk_times.append(now)
                    if self.on_text is not None:
                        self.on_text(content, False)
                finish = choice.get("finish_reason")
                if finish:
                    self.finish_reason = str(finish)
        elif "error" in data:
            raise StreamError(f"error event in stream: {_stream_error_message(data)}")
        usage = data.get("usage")
        if usage:
            self.usage = Usage.from_json(usage)
        if self.model is None:
            model = data.get("model")
            if type(model) is str:
                self.model = model
        return False

    def _reasoning(self, text: str, now: float, with_content: bool) -> None:
        self.reasoning.append(text)
        if not with_content:  # an event is timed once, whatever it carries
            self.chunk_times.append(now)
        if self.on_text is not None:
            self.on_text(text, True)

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


class _IdleDeadline:
    """A stream's read timeout (``--read-timeout``) at the cost of one float store per read.

    aiohttp's ``sock_read`` cancels and re-arms a timer on every packet it receives: about 1.4 µs of a
    streamed chunk's ~12 µs on the benchmark machine. This arms one timer; when it fires before the
    stream has been idle long enough, it re-arms itself for the rest, so it runs about once per
    ``limit_s``. When the stream has been idle that long it cancels ``scope``.
    """

    __slots__ = ("_handle", "_loop", "_scope", "last", "limit_s")

    def __init__(self, limit_s: float, scope: anyio.CancelScope) -> None:
        self.limit_s = limit_s
        self.last = time.perf_counter()
        self._scope = scope
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(limit_s, self._check)

    def _check(self) -> None:
        idle_s = time.perf_counter() - self.last
        if idle_s >= self.limit_s:
            self._scope.cancel()
        else:
            self._handle = self._loop.call_later(self.limit_s - idle_s, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


async def read_stream(chunks: AsyncIterator[bytes], route: Route, started: float,
                      on_text: Callable[[str, bool], None] | None = None,
                      idle: _IdleDeadline | None = None) -> Completion:
    """Read an SSE response body to its end: a Completion, or StreamError/ProtocolError.

    Each read is timestamped the moment it is handed over (``iter_any`` returns whatever bytes have arrived,
    without waiting for more). After ``[DONE]`` the body is still read to its end, briefly: leaving the
    chunked terminator unread would make aiohttp close the connection instead of reusing it. A stream
    that ends without ``[DONE]`` (some servers never send it) is complete when it said why it finished
    (a finish_reason, or usage); otherwise it was cut.
    """
    decoder = SSEDecoder()
    acc = StreamAccumulator(route, started, on_text)
    perf = time.perf_counter
    add = acc.add
    async for chunk in chunks:
        now = perf()
        if idle is not None:
            idle.last = now
        for event in decoder.feed(chunk):
            if add(event, now):
                # The answer is complete: nothing that happens to the rest of the body can change it.
                if idle is not None:
                    idle.cancel()
                with anyio.move_on_after(DONE_DRAIN_S), contextlib.suppress(Exception):
                    async for _ in chunks:
                        pass
                return acc.result()
    try:
        for event in decoder.close():
            if add(event, perf()):
                return acc.result()
    except ProtocolError:
        raise StreamError("stream ended in the middle of an event (connection cut mid-stream?)") from None
    if acc.finish_reason is None and acc.usage is None:
        raise StreamError("stream ended before any finish_reason (connection cut mid-stream?)")
    return acc.result()


def _closed_before_answering(exc: ConnectError) -> bool:
    """The server closed a connection we were sending on (not: refused to connect)."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ServerDisconnectedError) or (
        isinstance(cause, aiohttp.ClientOSError) and not isinstance(cause, aiohttp.ClientConnectorError))


def _translate(exc: Exception, url: str, timeouts: Timeouts, stream: bool) -> TransportError | None:
    """Our error for an aiohttp/asyncio exception, most specific first, always with a message; None: not ours
    to translate (raise it as it is)."""
    # Timeouts first: aiohttp's are also ClientErrors/OSErrors. str(TimeoutError()) is empty, so each
    # message names the limit that fired and the flag that sets it.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TimeoutError_(f"connect timeout: no connection to {url} within {timeouts.connect_s:g}s "
                             "(--connect-timeout)")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        # aiohttp's sock_read: the time between two reads, from the request being sent on (so it also
        # bounds the wait for the response headers, which is all of a non-streamed generation).
        return TimeoutError_(f"read timeout: no data from {url} for {timeouts.read_timeout_s(stream):g}s "
                             "(--read-timeout)")
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return TimeoutError_(f"request timeout: the attempt took longer than {timeouts.request_s:g}s "
                             f"({url}, --request-timeout)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        # asyncio words a refusal "Connect call failed ('127.0.0.1', 8000)"; the errno says it better.
        reason = (os.strerror(os_error.errno) if isinstance(os_error, ConnectionError) and os_error.errno
                  else os_error.strerror or str(exc))
        return ConnectError(f"cannot connect to {url}: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ConnectError(f"server disconnected before answering: {url}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return StreamError(f"response cut short: {str(exc) or exc.__class__.__name__} ({url})")
    if isinstance(exc, aiohttp.ClientOSError):
        return ConnectError(f"connection error: {exc.strerror or str(exc) or exc.__class__.__name__} ({url})")
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"bad HTTP response: {exc.message or exc.__class__.__name__} ({url})")
    if isinstance(exc, aiohttp.ClientError):
        return ConnectError(f"{exc.__class__.__name__}: {str(exc) or 'client error'} ({url})")
    if isinstance(exc, OSError):  # raised past aiohttp's wrapping, e.g. EMFILE: too many open files
        return ConnectError(f"connection error: {exc.strerror or str(exc) or exc.__class__.__name__} ({url})")
    return None


@contextmanager
def _translate_errors(url: str, timeouts: Timeouts, stream: bool) -> Iterator[None]:
    """``_translate`` as a context: our own errors pass as they are."""
    try:
        yield
    except TransportError:
        raise
    except Exception as exc:
        translated = _translate(exc, url, timeouts, stream)
        if translated is None:
            raise
        raise translated from exc


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
        # Set once the server rejected stream_options: it is left out for the rest of the session.
        self._drop_stream_options = False
        # Streamed answers still to watch for the server closing behind them (see STREAMS_WATCHED_FOR_CLOSE).
        self._streams_to_watch = STREAMS_WATCHED_FOR_CLOSE
        # Parsed once: aiohttp takes a URL object as it is, and parses a string again on every request.
        self._urls = {route: URL(self.base_url + path) for route, path in ROUTE_PATHS.items()}
        # A read timeout no shorter than the whole attempt's can never fire first (the default): leaving it
        # out spares aiohttp re-arming a timer on every packet it receives.
        read_s = timeouts.read_timeout_s(False)
        self._timeout_plain = aiohttp.ClientTimeout(
            total=timeouts.request_s, sock_connect=timeouts.connect_s,
            sock_read=read_s if read_s < timeouts.request_s else None)
        # Streams keep their read timeout in an _IdleDeadline instead of aiohttp's sock_read (see there).
        self._timeout_stream = aiohttp.ClientTimeout(total=timeouts.request_s, sock_connect=timeouts.connect_s)

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

    async def send(self, route: Route, body: bytes, *, stream: bool,
                   on_text: Callable[[str, bool], None] | None = None) -> Completion:
        """One attempt. ``on_text(text, reasoning)`` sees streamed pieces as they arrive.

        A server that rejects ``stream_options`` (400/422 naming it) gets the request again without it at
        once, and no request of this session carries it from then on; output tokens are then counted chunks.
        """
        if not stream:
            # The common path, kept one await shallower than the streamed one: a request's every wake-up
            # passes through each level of the await chain again.
            try:
                return await self._post(route, body, False, time.perf_counter(), None, None)
            except TransportError:
                raise
            except Exception as exc:
                translated = _translate(exc, self.base_url + ROUTE_PATHS[route], self.timeouts, False)
                if translated is None:
                    raise
                raise translated from exc
        if self._drop_stream_options:
            body = without_stream_options(body) or body
        # Sent while the session may still hand out a connection the server closed behind a stream.
        learning = self._streams_to_watch > 0
        try:
            return await self._send_stream(route, body, on_text)
        except ConnectError as exc:
            if not (learning and _closed_before_answering(exc)):
                raise
            # A close the watch missed (see STREAMS_WATCHED_FOR_CLOSE): this request went out on a pooled
            # connection the server had closed, and never reached it. Reuse ends here, and the request goes again
            # at once on a fresh connection: a flaw of the connection pool is neither a failed attempt nor a
            # reason to back off. Once a session at most: from here on every connection is fresh.
            self._stop_reusing_connections()
            return await self.send(route, body, stream=True, on_text=on_text)
        except HTTPStatusError as exc:
            stripped = without_stream_options(body)
            if stripped is None or not rejects_stream_options(exc.status, exc.message):
                raise
            self._drop_stream_options = True
            return await self._send_stream(route, stripped, on_text)

    async def _send_stream(self, route: Route, body: bytes,
                           on_text: Callable[[str, bool], None] | None) -> Completion:
        with _translate_errors(self.base_url + ROUTE_PATHS[route], self.timeouts, True):
            started = time.perf_counter()
            with anyio.CancelScope() as scope:
                idle = _IdleDeadline(self.timeouts.read_timeout_s(True), scope)
                try:
                    return await self._post(route, body, True, started, on_text, idle)
                finally:
                    idle.cancel()
            # Only the deadline cancels this scope: the same failure aiohttp's sock_read would raise.
            raise aiohttp.SocketTimeoutError(f"no data for {idle.limit_s:g}s")

    async def _post(self, route: Route, body: bytes, stream: bool, started: float,
                    on_text: Callable[[str, bool], None] | None, idle: _IdleDeadline | None) -> Completion:
        # TTFT counts from ``started``: connecting (or waiting for a pooled connection) is part of it.
        assert self._session is not None, "use AiohttpTransport as an async context manager"
        # Awaited rather than entered: ``async with`` would add aiohttp's __aenter__ to the await chain.
        resp = await self._session.post(
            self._urls[route], data=body, timeout=self._timeout_stream if stream else self._timeout_plain)
        try:
            if idle is not None:
                idle.last = time.perf_counter()  # the headers are data too
            if resp.status >= 400:
                raw = await resp.read()
                raise HTTPStatusError(
                    f"HTTP {resp.status}: {error_message(raw, resp.status)}",
                    status=resp.status, headers=dict(resp.headers))
            ctype = resp.headers.get("Content-Type", "")
            if stream and "text/event-stream" in ctype:
                # The protocol, not the connection: aiohttp detaches that from it once the body has been read.
                protocol = resp.connection.protocol if self._streams_to_watch and resp.connection else None
                completion = await read_stream(resp.content.iter_any(), route, started, on_text, idle)
                if protocol is not None:
                    await self._watch_for_close(protocol)
                return completion
            raw = await resp.read()
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ProtocolError(
                    f"response body is not valid JSON ({len(raw)} bytes, HTTP {resp.status})") from None
            return parse_completion(data, route)
        finally:
            resp.release()
            await resp.wait_for_close()  # what leaving ``async with`` does: the request's writer task is done

    async def _watch_for_close(self, protocol: ResponseHandler) -> None:
        """After a streamed answer: did the server close the connection right behind it? One seen is enough:
        the server that does it does it every time."""
        self._streams_to_watch = max(0, self._streams_to_watch - 1)
        await anyio.sleep(CLOSE_WATCH_S)
        if not protocol.is_connected():
            self._stop_reusing_connections()

    def _stop_reusing_connections(self) -> None:
        self._streams_to_watch = 0
        connector = self._session.connector if self._session is not None else None
        if isinstance(connector, aiohttp.TCPConnector):
            connector._force_close = True  # no public setter; aiohttp reads it on each release
            # The idle ones were released before: the server may have closed them too, unseen yet.
            idle = getattr(connector, "_conns", None)  # aiohttp's pool of idle connections, by host
            if isinstance(idle, dict):
                for conns in idle.values():
                    for protocol, _released_at in conns:
                        protocol.close()
                idle.clear()

    async def get_text(self, url: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET a side URL (``/metrics``, ``/health``); failures come back as our errors."""
        assert self._session is not None
        with _translate_errors(url, self.timeouts, False):
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.text(errors="replace")

