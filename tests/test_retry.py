"""The retry policy as tables: backoff bounds, server hints, classification of every status and error,
and the translation of aiohttp's exceptions into ours (always with a message)."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from gptoss_batch.config import RetryPolicy, Timeouts
from gptoss_batch.errors import (
    ConnectError,
    HTTPStatusError,
    ProtocolError,
    StreamError,
    TimeoutError_,
    TransportError,
)
from gptoss_batch.retry import (
    backoff_delay_s,
    is_retryable,
    is_unavailability,
    parse_duration_s,
    parse_retry_after,
    retry_wait_s,
)
from gptoss_batch.transport import _translate_errors

POLICY = RetryPolicy(backoff_initial_s=0.5, backoff_max_s=30.0, max_retry_after_s=120.0)
NOW = 1_700_000_000.0  # Unix time for the HTTP-date cases


# -- backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "cap"), [
    (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0),  # the cap doubles...
    (7, 30.0), (8, 30.0), (100, 30.0),  # ...up to backoff_max
    (10**6, 30.0), (2**70, 30.0),  # huge attempt numbers neither overflow nor raise
    (0, 0.5), (-5, 0.5),  # nonsense below 1 counts as the first attempt
])
def test_backoff_cap_doubles_per_attempt_up_to_the_maximum(attempt: int, cap: float) -> None:
    assert backoff_delay_s(attempt, POLICY, lambda: 1.0) == cap
    assert backoff_delay_s(attempt, POLICY, lambda: 0.0) == 0.0
    assert backoff_delay_s(attempt, POLICY, lambda: 0.25) == cap / 4


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 60, 10**9])
def test_backoff_is_full_jitter_within_zero_and_the_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    cap = min(30.0, 0.5 * 2 ** min(attempt - 1, 100))
    delays = [backoff_delay_s(attempt, POLICY, rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= cap for d in delays)
    assert min(delays) < 0.05 * cap and max(delays) > 0.95 * cap  # the whole range is used
    assert sum(delays) / len(delays) == pytest.approx(cap / 2, rel=0.1)


def test_backoff_with_zero_initial_is_zero() -> None:
    assert backoff_delay_s(50, RetryPolicy(backoff_initial_s=0.0), lambda: 1.0) == 0.0


# -- server hints --------------------------------------------------------------------------------


def http_date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset_s, UTC), usegmt=True)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": "1.5"}, 1.5),
    ({"Retry-After": " 3 "}, 3.0),
    ({"Retry-After": "0"}, 0.0),
    ({"retry-after": "2"}, 2.0),  # header names are case-insensitive
    ({"RETRY-AFTER": "2"}, 2.0),
    ({"Retry-After": http_date(30)}, 30.0),  # an HTTP date in the future
    ({"Retry-After": http_date(-30)}, 0.0),  # in the past: "now"
    ({"Retry-After": "Tue, 14 Nov 2023 22:13:50 -0000"}, 30.0),  # naive zone: GMT all the same
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the precise one wins
    ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),  # a bad one falls through to the next
    ({"Retry-After": "1e9"}, 1e9),  # huge: capped later by retry_wait_s, not here
    ({"Retry-After": "soon"}, None),  # garbage
    ({"Retry-After": ""}, None),
    ({"Retry-After": "-5"}, None),  # negative: no usable hint, the backoff applies
    ({"retry-after-ms": "-100"}, None),
    ({"Retry-After": "inf"}, None),
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),  # out of range
    ({}, None),
    ({"Content-Type": "application/json"}, None),
])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-reset-requests": "1s"}, 1.0),
    ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
    ({"x-ratelimit-reset-requests": "1h2m3.5s"}, 3723.5),
    ({"x-ratelimit-reset-requests": "0.5"}, 0.5),  # plain seconds
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),  # the later one
    # When the remaining counts say which limit is exhausted, only that one's reset counts.
    ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "5000"}, 1.0),
    ({"X-RateLimit-Reset-Requests": "2s"}, 2.0),
    ({"x-ratelimit-reset-requests": "abc"}, None),
    ({"x-ratelimit-reset-requests": "1x"}, None),
    ({"x-ratelimit-reset-requests": "s"}, None),
    ({"x-ratelimit-reset-requests": "1.2.3s"}, None),
    ({"x-ratelimit-reset-requests": "-1s"}, None),
    ({"Retry-After": "3", "x-ratelimit-reset-requests": "50s"}, 3.0),  # Retry-After comes first
])
def test_parse_retry_after_reads_openai_rate_limit_resets(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == (pytest.approx(expected) if expected is not None else None)
    if "Retry-After" not in headers:
        assert parse_retry_after(headers, NOW, rate_limit_resets=False) is None


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h", 3600.0), ("1m30s", 90.0), ("1.5s", 1.5),
    ("2ms500ms", 0.502), ("7", 7.0), ("", None), ("ms", None), ("5d", None), ("1s2", None),
])
def test_parse_duration_s(text: str, seconds: float | None) -> None:
    assert parse_duration_s(text) == (pytest.approx(seconds) if seconds is not None else None)


def err(status: int, headers: dict[str, str] | None = None) -> HTTPStatusError:
    return HTTPStatusError(f"HTTP {status}", status=status, headers=headers)


@pytest.mark.parametrize(("error", "attempt", "expected"), [
    (err(429, {"Retry-After": "7"}), 1, (7.0, 7.0)),
    (err(429, {"Retry-After": "1e9"}), 1, (120.0, 120.0)),  # huge: capped by max_retry_after
    (err(503, {"Retry-After": http_date(3600)}), 1, (120.0, 120.0)),  # a far date, capped too
    (err(429, {"Retry-After": "-3"}), 3, (2.0, None)),  # negative: the backoff instead
    (err(429, {"Retry-After": "soon"}), 1, (0.5, None)),
    (err(500), 4, (4.0, None)),  # no hint: backoff with rand() = 1, the cap
    (err(429, {"x-ratelimit-reset-requests": "2s"}), 1, (2.0, 2.0)),
    (err(500, {"x-ratelimit-reset-requests": "2s"}), 1, (0.5, None)),  # resets are no hint on a 500
    (ConnectError("refused"), 2, (1.0, None)),
])
def test_retry_wait_uses_the_capped_hint_else_the_backoff(
        error: TransportError, attempt: int, expected: tuple[float, float | None]) -> None:
    assert retry_wait_s(error, attempt, POLICY, rand=lambda: 1.0, now=NOW) == pytest.approx(expected)


# -- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retried", "unavailable"), [
    (408, True, False), (409, True, False), (429, True, False),
    (500, True, True), (502, True, True), (503, True, True), (504, True, True),
    (520, True, True), (524, True, True),  # a CDN's "origin is down" family
    (400, False, False), (401, False, False), (403, False, False), (404, False, False),
    (413, False, False), (422, False, False),
    (501, False, False), (505, False, False),  # never succeeds here, so no retry and no outage
])
def test_status_classification(status: int, retried: bool, unavailable: bool) -> None:
    assert is_retryable(err(status)) is retried
    assert is_unavailability(err(status)) is unavailable


@pytest.mark.parametrize(("error", "retried", "unavailable"), [
    (ConnectError("connection refused"), True, True),
    (TimeoutError_("read timeout"), True, True),
    (ProtocolError("response body is not valid JSON"), True, False),  # the server is up, its body broke
    (StreamError("stream cut"), True, False),
    (TransportError("unknown"), False, False),
])
def test_error_kind_classification(error: TransportError, retried: bool, unavailable: bool) -> None:
    assert is_retryable(error) is retried
    assert is_unavailability(error) is unavailable


# -- aiohttp's exceptions into ours ----------------------------------------------------------------

URL = "http://127.0.0.1:9/v1/chat/completions"
TIMEOUTS = Timeouts(connect_s=3.0, read_s=7.0, request_s=11.0)
KEY = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)


def payload_error() -> BaseException:
    return aiohttp.ClientPayloadError("Response payload is not completed")


@pytest.mark.parametrize(("make", "kind", "words"), [
    (lambda: aiohttp.ConnectionTimeoutError("Connection timeout to host"), TimeoutError_,
     ["connect timeout", "3s", "--connect-timeout", URL]),
    (lambda: aiohttp.SocketTimeoutError("Timeout on reading data from socket"), TimeoutError_,
     ["read timeout", "7s", "--read-timeout"]),
    (lambda: TimeoutError(), TimeoutError_, ["request timeout", "11s", "--request-timeout"]),  # aiohttp's total
    (lambda: aiohttp.ServerTimeoutError(), TimeoutError_, ["timeout"]),
    (lambda: aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")), ConnectError,
     ["cannot connect", "Connection refused", URL]),
    (lambda: aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(-2, "Name or service not known")),
     ConnectError, ["cannot connect", "Name or service not known"]),
    (lambda: aiohttp.ServerDisconnectedError(), ConnectError, ["server disconnected"]),
    (lambda: aiohttp.ClientOSError(104, "Connection reset by peer"), ConnectError, ["Connection reset by peer"]),
    (lambda: aiohttp.ClientOSError(), ConnectError, ["ClientOSError"]),
    (lambda: ConnectionResetError(104, "Connection reset by peer"), ConnectError, ["Connection reset by peer"]),
    (lambda: BrokenPipeError(32, "Broken pipe"), ConnectError, ["Broken pipe"]),
    (lambda: OSError(24, "Too many open files"), ConnectError, ["Too many open files"]),
    (payload_error, StreamError, ["cut short", "not completed"]),
    (lambda: aiohttp.ClientResponseError(None, (), message="Bad status line"),  # type: ignore[arg-type]
     ProtocolError, ["bad HTTP response", "Bad status line"]),
    (lambda: aiohttp.ClientError(), ConnectError, ["ClientError"]),
])
def test_every_aiohttp_error_becomes_ours_with_a_message(
        make: Callable[[], BaseException], kind: type[TransportError], words: list[str]) -> None:
    with pytest.raises(kind) as info, _translate_errors(URL, TIMEOUTS, stream=False):
        raise make()
    message = str(info.value)
    assert message.strip() and message == info.value.message
    for w in words:
        assert w in message


def test_our_own_errors_pass_through_untouched() -> None:
    original = HTTPStatusError("HTTP 429: slow down", status=429)
    with pytest.raises(HTTPStatusError) as info, _translate_errors(URL, TIMEOUTS, stream=False):
        raise original
    assert info.value is original


def test_the_read_timeout_message_names_the_streaming_default() -> None:
    with pytest.raises(TimeoutError_) as info, _translate_errors(URL, Timeouts(request_s=300), stream=True):
        raise aiohttp.SocketTimeoutError()
    assert "60s" in str(info.value)
