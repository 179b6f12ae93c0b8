"""The SSE decoder and the stream accumulator, from recorded-style byte streams of vLLM, llama.cpp, OpenAI
(through a proxy), TGI and GPT-OSS reasoning, split at every possible byte boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import anyio
import orjson
import pytest

from gptoss_batch import transport
from gptoss_batch.errors import ProtocolError, StreamError
from gptoss_batch.records import Completion, Route, Usage
from gptoss_batch.retry import is_retryable
from gptoss_batch.stats import stream_timings
from gptoss_batch.transport import SSEDecoder, StreamAccumulator, read_stream

# -- recorded-style streams ------------------------------------------------------------------------------

# vLLM 0.10 /v1/chat/completions with stream_options.include_usage: role chunk, content chunks (multi-byte
# UTF-8 in several), finish_reason on the last content chunk, the usage chunk, [DONE]. LF line endings.
VLLM_CHAT = (
    b'data: {"id":"chatcmpl-1f0c","object":"chat.completion.chunk","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1f0c","object":"chat.completion.chunk","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"delta":{"content":"H\xc3\xa9"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1f0c","object":"chat.completion.chunk","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"delta":{"content":"llo \xe6\x97\xa5\xe6\x9c\xac"},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1f0c","object":"chat.completion.chunk","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"delta":{"content":" \xf0\x9f\x99\x82!"},"logprobs":null,"finish_reason":"stop",'
    b'"stop_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1f0c","object":"chat.completion.chunk","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[],"usage":{"prompt_tokens":12,"total_tokens":17,"completion_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)

# llama.cpp llama-server: content null in the role chunk, finish_reason on an empty delta with usage and
# timings, then [DONE].
LLAMACPP_CHAT = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"created":1754000000,"id":"chatcmpl-Xy","model":"gpt-oss-20b","system_fingerprint":"b6100-1a2b3c",'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Bonjour"}}],"created":1754000000,'
    b'"id":"chatcmpl-Xy","model":"gpt-oss-20b","system_fingerprint":"b6100-1a2b3c",'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" \xc3\xa0 tous"}}],'
    b'"created":1754000000,"id":"chatcmpl-Xy","model":"gpt-oss-20b","system_fingerprint":"b6100-1a2b3c",'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1754000000,'
    b'"id":"chatcmpl-Xy","model":"gpt-oss-20b","system_fingerprint":"b6100-1a2b3c",'
    b'"object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":9,"total_tokens":13},'
    b'"timings":{"prompt_n":9,"prompt_ms":12.1,"predicted_n":4,"predicted_ms":40.2}}\n\n'
    b"data: [DONE]\n\n"
)

# OpenAI's format after a proxy rewrote line endings to CRLF and added keep-alive comments, an event
# name, an id and a retry field; usage is null on every chunk but the last; one event's JSON is split over
# two data lines (joined with \n, still valid JSON).
OPENAI_CRLF = (
    b": keep-alive\r\n\r\n"
    b'data: {"id":"chatcmpl-AB","object":"chat.completion.chunk","created":1754000000,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\r\n\r\n'
    b"retry: 3000\r\n"
    b"event: message\r\nid: 7\r\n"
    b'data: {"id":"chatcmpl-AB","object":"chat.completion.chunk","created":1754000000,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"na\xc3\xafve"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\r\n\r\n'
    b": OPENROUTER PROCESSING\r\n\r\n"
    b'data: {"id":"chatcmpl-AB","object":"chat.completion.chunk","created":1754000000,\r\n'
    b'data: "model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" caf\xc3\xa9"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-AB","object":"chat.completion.chunk","created":1754000000,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\r\n\r\n'
    b'data: {"id":"chatcmpl-AB","object":"chat.completion.chunk","created":1754000000,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)

# A server that never sends [DONE], with every kind of line ending mixed (LF, CRLF, lone CR), `data:`
# without the space, and a last event with no blank line after it: the body just ends.
MIXED_NO_DONE = (
    b'data: {"model":"tgi","choices":[{"index":0,"delta":{"role":"assistant","content":"Gr"}}]}\n\n'
    b'data:{"model":"tgi","choices":[{"index":0,"delta":{"content":"\xc3\xbc\xc3\x9f"}}]}\r\n\r\n'
    b'data: {"model":"tgi","choices":[{"index":0,"delta":{"content":" Gott"}}]}\r\r'
    b'data: {"model":"tgi","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}\r\n'
)

# vLLM /v1/completions (text route): no role chunk, text on each choice, usage chunk, [DONE].
VLLM_TEXT = (
    b'data: {"id":"cmpl-9","object":"text_completion","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"text":" once","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
    b'data: {"id":"cmpl-9","object":"text_completion","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[{"index":0,"text":" upon \xe2\x80\x94","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null}]}\n\n'
    b'data: {"id":"cmpl-9","object":"text_completion","created":1754000000,"model":"gpt-oss-20b",'
    b'"choices":[],"usage":{"prompt_tokens":4,"total_tokens":7,"completion_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)

# GPT-OSS on vLLM: the reasoning (analysis channel) streams as reasoning_content before the answer.
GPTOSS_REASONING = (
    b'data: {"model":"gpt-oss-20b","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"model":"gpt-oss-20b","choices":[{"index":0,"delta":{"reasoning_content":"User greets."}}]}\n\n'
    b'data: {"model":"gpt-oss-20b","choices":[{"index":0,"delta":{"reasoning_content":" Reply."}}]}\n\n'
    b'data: {"model":"gpt-oss-20b","choices":[{"index":0,"delta":{"content":"Hi!"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def _json_payloads(stream: bytes) -> list[Any]:
    """What each fixture must decode to: its data payloads, JSON-parsed (``[DONE]`` kept as a string)."""
    return [p if p == "[DONE]" else orjson.loads(p) for p in _decoded(stream)]


def _decoded(stream: bytes, pieces: Iterable[bytes] | None = None) -> list[Any]:
    d = SSEDecoder()
    out: list[bytes] = []
    for piece in pieces if pieces is not None else [stream]:
        out += d.feed(piece)
    out += d.close()
    return [p.decode() if p == b"[DONE]" else p for p in out]


# fixture -> (route, events expected, text, reasoning, finish_reason, usage, content events)
FIXTURES: dict[str, tuple[bytes, Route, int, str, str | None, str | None, Usage | None, int]] = {
    "vllm": (VLLM_CHAT, "chat", 6, "Héllo 日本 🙂!", None, "stop", Usage(12, 5, 17), 3),
    "llamacpp": (LLAMACPP_CHAT, "chat", 5, "Bonjour à tous", None, "length", Usage(9, 4, 13), 2),
    "openai-crlf": (OPENAI_CRLF, "chat", 6, "naïve café", None, "stop", Usage(8, 2, 10), 2),
    "mixed-no-done": (MIXED_NO_DONE, "chat", 4, "Grüß Gott!", None, "stop", None, 4),
    "vllm-text": (VLLM_TEXT, "completions", 4, " once upon —", None, "length", Usage(4, 3, 7), 2),
    "gptoss-reasoning": (GPTOSS_REASONING, "chat", 5, "Hi!", "User greets. Reply.", "stop", None, 3),
}


def test_fixtures_hold_the_hard_boundaries() -> None:
    """Splitting at every byte only proves something if the streams hold what is hard to split."""
    everything = b"".join(f[0] for f in FIXTURES.values())
    assert b"\xf0\x9f\x99\x82" in everything and b"\xe6\x97\xa5" in everything  # 4- and 3-byte UTF-8
    assert b"\r\n\r\n" in everything and b"\r\r" in everything and b"\n\n" in everything
    assert b"\r\ndata: " in everything and b"data:{" in everything and b": keep-alive" in everything
    assert not MIXED_NO_DONE.endswith(b"\n\n") and b"[DONE]" not in MIXED_NO_DONE


@pytest.mark.parametrize("name", FIXTURES)
def test_each_stream_decodes_to_its_events(name: str) -> None:
    stream, _, n_events, *_ = FIXTURES[name]
    payloads = _json_payloads(stream)
    assert len(payloads) == n_events
    assert all(p == "[DONE]" or isinstance(p, dict) for p in payloads)


@pytest.mark.parametrize("name", FIXTURES)
def test_a_split_at_any_byte_gives_the_same_events(name: str) -> None:
    stream = FIXTURES[name][0]
    whole = _decoded(stream)
    for i in range(len(stream) + 1):
        assert _decoded(stream, [stream[:i], stream[i:]]) == whole, f"split at byte {i}: {stream[i - 3:i + 3]!r}"


@pytest.mark.parametrize("name", FIXTURES)
def test_feeding_one_byte_at_a_time_gives_the_same_events(name: str) -> None:
    stream = FIXTURES[name][0]
    assert _decoded(stream, [stream[i:i + 1] for i in range(len(stream))]) == _decoded(stream)


def test_three_pieces_at_every_pair_of_boundaries_in_the_hardest_stretch() -> None:
    """CRLF, lone CR, `data:` without its space and a 2-byte character, cut in three everywhere."""
    stretch = MIXED_NO_DONE[80:200]
    whole = _decoded(stretch)
    for i in range(len(stretch) + 1):
        for j in range(i, len(stretch) + 1):
            assert _decoded(stretch, [stretch[:i], stretch[i:j], stretch[j:]]) == whole


def test_multiline_data_is_joined_with_newlines() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"a":\ndata: 1}\n\n') == [b'{"a":\n1}']
    assert d.feed(b"data:x\ndata\ndata:  y\n\n") == [b"x\n\n y"]  # a bare `data` adds an empty line


def test_comments_and_other_fields_carry_nothing() -> None:
    d = SSEDecoder()
    assert d.feed(b": ping\n\nid: 1\nretry: 10\n\nevent: message\n\n:x\ndata: ok\n\n") == [b"ok"]


def test_a_byte_order_mark_at_the_start_is_dropped_even_when_split() -> None:
    d = SSEDecoder()
    assert d.feed(b"\xef") == [] and d.feed(b"\xbb") == []
    assert d.feed(b"\xbfdata: 1\n\n") == [b"1"]


def test_an_event_whose_blank_line_ends_in_cr_is_not_held_back_for_the_next_read() -> None:
    """Its CR ends the line (the spec), so the event goes out now; the LF of that CRLF is then skipped."""
    d = SSEDecoder()
    assert d.feed(b"data: a\r\n\r") == [b"a"]
    assert d.feed(b"\ndata: b\r\n\r") == [b"b"]
    assert d.feed(b"\n") == []
    assert d.feed(b"data: c\r\r") == [b"c"]
    assert d.feed(b"\n\ndata: d\n\n") == [b"d"]  # the first LF pairs with the CR, the second is a blank line


def test_close_returns_a_last_event_without_its_blank_line_only_once() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: 1\n\ndata: 2\r") == [b"1"]
    assert d.close() == [b"2"]
    assert d.close() == []


# -- the accumulator -------------------------------------------------------------------------------------


class Chunks:
    """An async iterator over byte pieces, as ``resp.content.iter_any()`` is; ``then`` raises after them."""

    def __init__(self, pieces: Sequence[bytes], then: BaseException | None = None, hang: bool = False) -> None:
        self.pieces = list(pieces)
        self.then = then
        self.hang = hang
        self.read = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.read < len(self.pieces):
            self.read += 1
            return self.pieces[self.read - 1]
        if self.then is not None:
            raise self.then
        if self.hang:
            await anyio.sleep_forever()
        raise StopAsyncIteration


async def fold(pieces: Sequence[bytes], route: Route = "chat", **kw: Any) -> Completion:
    return await read_stream(Chunks(pieces, **kw), route, 0.0)


@pytest.mark.anyio
@pytest.mark.parametrize("name", FIXTURES)
async def test_every_stream_folds_into_its_completion_at_every_split(name: str) -> None:
    stream, route, _, text, reasoning, finish, usage, content_events = FIXTURES[name]
    for i in range(0, len(stream) + 1, 7 if len(stream) > 600 else 1):
        c = await fold([stream[:i], stream[i:]], route)
        assert (c.text, c.reasoning, c.finish_reason, c.usage) == (text, reasoning, finish, usage), i
        assert len(c.chunk_times) == content_events
        assert c.model is not None


@pytest.mark.anyio
async def test_every_content_event_is_timed_even_when_one_read_holds_many() -> None:
    """A read holding several events stamps each of them (same time): none is lost from the count."""
    c = await fold([VLLM_CHAT])
    assert len(c.chunk_times) == 3 and len(set(c.chunk_times)) == 1


def test_reasoning_and_content_pieces_reach_on_text_as_they_come() -> None:
    seen: list[tuple[str, bool]] = []
    acc = StreamAccumulator("chat", 0.0, on_text=lambda t, r: seen.append((t, r)))
    d = SSEDecoder()
    for now, line in enumerate(GPTOSS_REASONING.split(b"\n\n")):
        for p in d.feed(line + b"\n\n"):
            acc.add(p, float(now))
    assert seen == [("User greets.", True), (" Reply.", True), ("Hi!", False)]
    assert acc.chunk_times == [1.0, 2.0, 3.0]  # the role chunk (0) carries nothing


def test_only_the_first_choice_is_kept_when_n_is_above_one() -> None:
    acc = StreamAccumulator("chat", 0.0)
    for i, piece in enumerate(["a", "B", "b", "A"]):
        index = 0 if piece.islower() else 1
        acc.add(orjson.dumps({"choices": [{"index": index, "delta": {"content": piece}}]}), float(i))
    assert acc.result().text == "ab" and acc.chunk_times == [0.0, 2.0]


def test_an_empty_data_line_is_skipped() -> None:
    assert StreamAccumulator("chat", 0.0).add(b"", 1.0) is False


@pytest.mark.anyio
async def test_a_stream_without_done_is_complete_when_it_said_why_it_finished() -> None:
    assert (await fold([MIXED_NO_DONE])).text == "Grüß Gott!"
    usage_only = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: {"choices":[],"usage":{}}\n\n'
    with pytest.raises(StreamError):  # usage {} is no usage at all
        await fold([usage_only])
    usage = (b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
             b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n')
    assert (await fold([usage])).usage == Usage(0, 1, 1)


_LAST_CONTENT = VLLM_CHAT.index(b'"finish_reason":"stop"')
_EVENT_END = VLLM_CHAT.rindex(b"\n\n", 0, _LAST_CONTENT) + 2


@pytest.mark.anyio
@pytest.mark.parametrize(("cut_at", "message"), [
    (_EVENT_END, "ended before any finish_reason"),  # between events
    (_LAST_CONTENT - 100, "in the middle of an event"),  # inside one: not a bad-JSON error, a cut
])
async def test_a_stream_that_stops_before_any_finish_reason_was_cut(cut_at: int, message: str) -> None:
    with pytest.raises(StreamError, match=message) as info:
        await fold([VLLM_CHAT[:cut_at]])
    assert is_retryable(info.value)


@pytest.mark.anyio
async def test_a_failure_mid_stream_propagates_and_no_partial_completion_comes_back() -> None:
    head = VLLM_CHAT[:400]
    with pytest.raises(StreamError, match="cut"):
        await fold([head], then=StreamError("response cut short (test)"))


# (name, stream, message the error must carry)
ERROR_EVENTS = [
    ("vllm/openai data error", b'data: {"error": {"object": "error", "message": "CUDA out of memory", '
     b'"type": "InternalServerError", "param": null, "code": 500}}\n\n', "CUDA out of memory"),
    ("tgi data error", b'data: {"error":"Request failed during generation: Server error: overloaded",'
     b'"error_type":"generation"}\n\n', "overloaded"),
    ("llama.cpp error field", b'error: {"code":500,"message":"the request exceeds the available context size",'
     b'"type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n', "exceeds the available context"),
    ("event: error", b"event: error\ndata: {\"message\": \"model crashed\"}\n\n", "model crashed"),
    ("event: error, plain text", b"event: error\r\ndata: upstream timed out\r\n\r\n", "upstream timed out"),
    ("nested error object", b'event: error\ndata: {"error": {"message": "rate limited"}}\n\n', "rate limited"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "event", "message"), ERROR_EVENTS, ids=[e[0] for e in ERROR_EVENTS])
async def test_an_error_event_mid_stream_fails_the_attempt_as_retryable(name: str, event: bytes, message: str) -> None:
    first = b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n'
    with pytest.raises(StreamError) as info:
        await fold([first, event, b"data: [DONE]\n\n"])
    assert message in info.value.message and "error event in stream" in info.value.message
    assert is_retryable(info.value)


@pytest.mark.anyio
async def test_an_event_that_is_not_json_is_a_retryable_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        await fold([b'data: {"id": "x", "choices": [{"ind\n\n'])
    assert is_retryable(info.value)


@pytest.mark.anyio
async def test_the_body_is_read_to_its_end_after_done() -> None:
    """Leaving the chunked terminator unread would make aiohttp drop the connection instead of reusing it."""
    chunks = Chunks([VLLM_CHAT, b"", b"trailing"])
    await read_stream(chunks, "chat", 0.0)
    assert chunks.read == 3


@pytest.mark.anyio
async def test_a_body_that_never_ends_after_done_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "DONE_DRAIN_S", 0.01)
    with anyio.fail_after(5):
        c = await read_stream(Chunks([VLLM_CHAT], hang=True), "chat", 0.0)
    assert c.text == "Héllo 日本 🙂!"


@pytest.mark.anyio
async def test_an_error_after_done_does_not_undo_the_answer() -> None:
    c = await read_stream(Chunks([VLLM_CHAT], then=ConnectionResetError()), "chat", 0.0)
    assert c.finish_reason == "stop"


# -- per-row timing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_times", "end", "usage_tokens", "expect"),
    [
        # first content at 0.2 s, then every 20 ms; 20 tokens from usage
        ([0.2 + 0.02 * i for i in range(20)], 0.58, 20,
         {"ttft_s": 0.2, "tpot_s": 0.02, "output_tokens": 20, "output_tokens_source": "usage"}),
        # the server sent no usage: tokens are the counted chunks
        ([0.1, 0.2, 0.3], 0.3, None, {"ttft_s": 0.1, "tpot_s": 0.1, "output_tokens": 3,
                                      "output_tokens_source": "chunks"}),
        # chunks of 4 tokens: usage says 8 while only 2 chunks came
        ([0.5, 0.9], 0.9, 8, {"ttft_s": 0.5, "tpot_s": 0.4 / 7, "output_tokens": 8, "output_tokens_source": "usage"}),
        # one token: no TPOT, no ITL
        ([0.3], 0.3, 1, {"ttft_s": 0.3, "output_tokens": 1, "output_tokens_source": "usage"}),
        ([], 1.0, 5, {}),
    ],
)
def test_stream_timings(chunk_times: list[float], end: float, usage_tokens: int | None, expect: dict[str, Any]) -> None:
    got = stream_timings(0.0, chunk_times, end, usage_tokens)
    got.pop("itl_s", None)
    assert got.keys() == expect.keys()
    for key, value in expect.items():
        assert got[key] == pytest.approx(value), key


def test_itl_summarises_the_gaps_between_content_events() -> None:
    itl = stream_timings(0.0, [1.0, 1.1, 1.2, 1.2, 1.7], 2.0, None)["itl_s"]
    assert itl == {"mean": pytest.approx(0.175), "p50": pytest.approx(0.1), "max": pytest.approx(0.5)}
