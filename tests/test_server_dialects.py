"""Real servers' dialects, recorded from llama.cpp's llama-server (Gemma 3 270M) and ``transformers serve``
(5.24, continuous batching) and replayed through the transport's pure parts, so `make test` keeps every
behaviour found by `make test-real` without starting either server. docs/servers.md describes each one.

The byte strings are the servers' own, trimmed of ids and timestamps that nothing reads.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import orjson
import pytest

from gptoss_batch.errors import ConnectError, HTTPStatusError
from gptoss_batch.records import Route
from gptoss_batch.retry import is_retryable
from gptoss_batch.transport import AiohttpTransport, error_message, parse_completion, read_stream

# -- llama-server ----------------------------------------------------------------------------------------------

# stream_options.include_usage: usage (and llama.cpp's own `timings`) on an extra chunk with "choices": [].
LLAMA_CHAT_STREAM = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"model":"gemma-3-270m","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"<"}}],"model":"gemma-3-270m",'
    b'"object":"chat.completion.chunk"}\n\n'
    # llama-server's keep-alive ping while a request waits (--sse-ping-interval): a bare comment line.
    b':\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"|"}}],"model":"gemma-3-270m",'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"model":"gemma-3-270m",'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"model":"gemma-3-270m","object":"chat.completion.chunk","usage":{"completion_tokens":2,'
    b'"prompt_tokens":25,"total_tokens":27,"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,'
    b'"prompt_n":25,"prompt_ms":78.747,"predicted_n":2,"predicted_ms":12.739,"predicted_per_second":78.49}}\n\n'
    b'data: [DONE]\n\n'
)
# The completions route puts usage on the finish chunk, asked for or not.
LLAMA_COMPLETIONS_STREAM = (
    b'data: {"choices":[{"text":",","index":0,"logprobs":null,"finish_reason":null}],"model":"gemma-3-270m",'
    b'"object":"text_completion"}\n\n'
    b'data: {"choices":[{"text":"\\n\\n","index":0,"logprobs":null,"finish_reason":null}],"model":"gemma-3-270m",'
    b'"object":"text_completion"}\n\n'
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"model":"gemma-3-270m",'
    b'"object":"text_completion","usage":{"completion_tokens":2,"prompt_tokens":2,"total_tokens":4,'
    b'"prompt_tokens_details":{"cached_tokens":1}},"timings":{"cache_n":1,"prompt_n":1,"predicted_n":2}}\n\n'
    b'data: [DONE]\n\n'
)
LLAMA_CHAT_BODY = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"<|"}}],'
    b'"model":"gemma-3-270m","object":"chat.completion","usage":{"completion_tokens":2,"prompt_tokens":25,'
    b'"total_tokens":27,"prompt_tokens_details":{"cached_tokens":20}},"timings":{"cache_n":20,"prompt_n":5,'
    b'"predicted_n":2,"predicted_ms":15.848}}'
)
LLAMA_OVER_CONTEXT = (
    b'{"error":{"code":400,"message":"request (3002 tokens) exceeds the available context size (2048 tokens), '
    b'try increasing it","type":"exceed_context_size_error","n_prompt_tokens":3002,"n_ctx":2048}}'
)
LLAMA_MISTYPED = (b'{"error":{"code":400,"message":"Field \'seed\': [json.exception.type_error.302] type must be '
                  b'number, but is string","type":"invalid_request_error"}}')
LLAMA_LOADING = b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}'

# -- transformers serve ----------------------------------------------------------------------------------------

# No [DONE]; usage on the finish chunk (stream_options is ignored: "Ignoring unsupported fields"); a chunk
# may carry several tokens, and a character split across tokens arrives as U+FFFD.
HF_CHAT_STREAM = (
    b'data: {"id":"1823cb76","choices":[{"delta":{"role":"assistant"},"index":0}],"model":"/tmp/tiny-model",'
    b'"object":"chat.completion.chunk","system_fingerprint":""}\n\n'
    b'data: {"id":"1823cb76","choices":[{"delta":{"content":"\xef\xbf\xbdtu"},"index":0}],"model":"/tmp/tiny-model",'
    b'"object":"chat.completion.chunk","system_fingerprint":""}\n\n'
    b'data: {"id":"1823cb76","choices":[{"delta":{},"index":0,"finish_reason":"length"}],"model":"/tmp/tiny-model",'
    b'"object":"chat.completion.chunk","system_fingerprint":"","usage":{"completion_tokens":2,"prompt_tokens":17,'
    b'"total_tokens":19}}\n\n'
)
HF_COMPLETIONS_STREAM = (
    b'data: {"id":"a2fae71c","choices":[{"index":0,"text":"tu"}],"model":"/tmp/tiny-model",'
    b'"object":"text_completion"}\n\n'
    b'data: {"id":"a2fae71c","choices":[{"index":0,"text":"tu"}],"model":"/tmp/tiny-model",'
    b'"object":"text_completion"}\n\n'
    b'data: {"id":"a2fae71c","choices":[{"finish_reason":"length","index":0,"text":""}],"model":"/tmp/tiny-model",'
    b'"object":"text_completion","usage":{"completion_tokens":2,"prompt_tokens":2,"total_tokens":4}}\n\n'
)
HF_UNKNOWN_FIELD = b'{"detail":"Unexpected fields in the request: {\'no_such_parameter\'}"}'
HF_PINNED = b'{"detail":"Server is pinned to \'/tmp/tiny-model\'; requested \'gpt-oss-20b\'."}'
HF_NOT_AN_OBJECT = (b'{"detail":[{"type":"dict_type","loc":["body"],"msg":"Input should be a valid dictionary",'
                    b'"input":[1,2]}]}')
HF_BAD_JSON = (b'{"detail":[{"type":"json_invalid","loc":["body",0],"msg":"JSON decode error","input":{},'
               b'"ctx":{"error":"Expecting value"}}]}')
# A field of the wrong type (e.g. "seed": "abc") or a missing "messages" is an unhandled exception: a 500 with
# Starlette's plain-text page.
HF_UNHANDLED = b"Internal Server Error"


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.anyio
@pytest.mark.parametrize("size", [7, 4096], ids=["split-anywhere", "whole"])
@pytest.mark.parametrize(("stream", "route", "text", "usage", "model"), [
    (LLAMA_CHAT_STREAM, "chat", "<|", (25, 2), "gemma-3-270m"),
    (LLAMA_COMPLETIONS_STREAM, "completions", ",\n\n", (2, 2), "gemma-3-270m"),
    (HF_CHAT_STREAM, "chat", "\ufffdtu", (17, 2), "/tmp/tiny-model"),
    (HF_COMPLETIONS_STREAM, "completions", "tutu", (2, 2), "/tmp/tiny-model"),
], ids=["llama-chat", "llama-completions", "transformers-chat", "transformers-completions-no-done"])
async def test_each_servers_stream_folds_into_text_finish_reason_and_its_own_token_counts(
        stream: bytes, route: Route, text: str, usage: tuple[int, int], model: str, size: int) -> None:
    c = await read_stream(_chunks(stream, size), route, time.perf_counter())
    assert c.text == text
    assert c.finish_reason == "length"
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == usage
    assert c.model == model


@pytest.mark.anyio
async def test_a_stream_is_timed_once_per_content_chunk_not_per_role_finish_ping_or_usage_chunk() -> None:
    llama = await read_stream(_chunks(LLAMA_CHAT_STREAM, 4096), "chat", time.perf_counter())
    assert len(llama.chunk_times) == 2  # "<" and "|"
    hf = await read_stream(_chunks(HF_CHAT_STREAM, 4096), "chat", time.perf_counter())
    assert len(hf.chunk_times) == 1  # two tokens in one chunk: TPOT comes from usage, not from chunks


def test_llama_servers_plain_answer_keeps_usage_and_ignores_its_timings_field() -> None:
    c = parse_completion(orjson.loads(LLAMA_CHAT_BODY), "chat")
    assert (c.text, c.finish_reason, c.model) == ("<|", "length", "gemma-3-270m")
    assert c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens) == (25, 2)


@pytest.mark.parametrize(("status", "body", "message", "retried"), [
    (400, LLAMA_OVER_CONTEXT, "request (3002 tokens) exceeds the available context size (2048 tokens), try "
                              "increasing it", False),
    (400, LLAMA_MISTYPED, "Field 'seed': [json.exception.type_error.302] type must be number, but is string",
     False),
    (503, LLAMA_LOADING, "Loading model", True),
    (422, HF_UNKNOWN_FIELD, "Unexpected fields in the request: {'no_such_parameter'}", False),
    (400, HF_PINNED, "Server is pinned to '/tmp/tiny-model'; requested 'gpt-oss-20b'.", False),
    (422, HF_NOT_AN_OBJECT, "body: Input should be a valid dictionary", False),
    (422, HF_BAD_JSON, "body.0: JSON decode error", False),
    (500, HF_UNHANDLED, "Internal Server Error", True),
], ids=["llama-over-context", "llama-mistyped-field", "llama-loading", "hf-unknown-field", "hf-pinned-model",
        "hf-fastapi-detail-list", "hf-fastapi-bad-json", "hf-unhandled-exception"])
def test_each_servers_error_bodies_become_their_own_words_and_only_transient_ones_are_retried(
        status: int, body: bytes, message: str, retried: bool) -> None:
    assert error_message(body, status) == message
    error = HTTPStatusError(f"HTTP {status}: {error_message(body, status)}", status=status)
    assert is_retryable(error) is retried


# -- connections: llama-server closes every connection right after a streamed answer -----------------------------

class _SSEServer(socketserver.ThreadingTCPServer):
    """A loopback HTTP/1.1 server answering every POST with a short chunked SSE stream and ``Keep-Alive:
    timeout=5`` (llama-server's headers). ``close_after_stream``: close the connection a moment after the
    last chunk, as llama-server does after every stream; otherwise keep it, as a well-behaved server does."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, close_after_stream: bool) -> None:
        super().__init__(("127.0.0.1", 0), _SSEHandler)
        self.close_after_stream = close_after_stream
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()


class _SSEHandler(socketserver.StreamRequestHandler):
    server: _SSEServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                byte = self.rfile.read(1)
                if not byte:
                    return
                head += byte
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            self.rfile.read(length)
            with self.server.lock:
                self.server.requests += 1
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"Keep-Alive: timeout=5, max=100\r\n\r\n")
            for event in LLAMA_COMPLETIONS_STREAM.split(b"\n\n")[:-1]:  # one event a token, as generated
                self.wfile.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
                self.wfile.flush()
                time.sleep(0.001)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            if self.server.close_after_stream or b"connection: close" in head.lower():
                time.sleep(0.0002)  # llama-server's HTTP thread closes just behind the last chunk
                return


@contextlib.contextmanager
def _sse_server(close_after_stream: bool) -> Iterator[_SSEServer]:
    server = _SSEServer(close_after_stream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def _stream_many(url: str, requests: int, concurrency: int) -> list[str]:
    """``requests`` streamed sends over one transport, ``concurrency`` at a time: the errors' messages."""
    errors: list[str] = []
    body = orjson.dumps({"prompt": "Hi", "max_tokens": 2, "stream": True})
    async with AiohttpTransport(url) as transport:
        async def worker(n: int) -> None:
            for _ in range(n):
                try:
                    await transport.send("completions", body, stream=True)
                except ConnectError as exc:
                    errors.append(exc.message)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker, requests // concurrency)
    return errors


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [4, 16])
async def test_a_server_that_closes_after_each_stream_costs_no_request_a_failed_attempt(concurrency: int) -> None:
    """Without watching for the close, nearly every request after the first few failed this way ("Can not
    write request body", "server disconnected before answering"), each a retry after a backoff. The few sent on
    connections pooled before the first close was seen go again at once, and are not failures either."""
    with _sse_server(close_after_stream=True) as server:
        errors = await _stream_many(f"http://127.0.0.1:{server.server_address[1]}/v1", 10 * concurrency, concurrency)
    assert errors == []
    # Answered once each; a resent request reached the server only once (its first try never did) or, where
    # the server read it before closing, twice: at most one extra for each connection open at the time.
    assert 10 * concurrency <= server.requests <= 11 * concurrency


@pytest.mark.anyio
async def test_a_server_that_keeps_connections_alive_after_streams_keeps_them_reused() -> None:
    with _sse_server(close_after_stream=False) as server:
        errors = await _stream_many(f"http://127.0.0.1:{server.server_address[1]}/v1", 40, 4)
    assert errors == []
    assert server.requests == 40
    assert server.connections <= 4 + 1  # one each for the four workers (another if one raced to connect)
