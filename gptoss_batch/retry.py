"""Pure retry policy: which failures to retry, how long to wait, and what the server asked for.

The clock and the random source are parameters, so every rule is testable without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

from gptoss_batch.config import RetryPolicy
from gptoss_batch.errors import (
    ConnectError,
    HTTPStatusError,
    ProtocolError,
    StreamError,
    TimeoutError_,
    TransportError,
)

# 408 request timeout, 409 conflict (a lock held by a concurrent request), 429 rate limited, and the 5xx
# a restart, an overload or a proxy produces. Other 5xx are retried too (a 520-524 from a CDN in front of the
# server), except these two, which say the request can never succeed here.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
NEVER_RETRYABLE_5XX = frozenset({501, 505})  # Not Implemented, HTTP Version Not Supported
# The exponent of the backoff is clamped here: 2**62 seconds is already far past any cap.
_MAX_EXPONENT = 62


def is_retryable_status(status: int | None) -> bool:
    if status is None:
        return False
    return status in RETRYABLE_STATUSES or (500 <= status <= 599 and status not in NEVER_RETRYABLE_5XX)


def is_retryable(error: TransportError) -> bool:
    """Connection errors, timeouts, broken bodies/streams and the transient statuses are retried.

    Other 4xx (400, 401, 403, 404, 422, ...) are the request's own fault: retrying cannot help.
    """
    if isinstance(error, HTTPStatusError):
        return is_retryable_status(error.status)
    return isinstance(error, ConnectError | TimeoutError_ | ProtocolError | StreamError)


def is_unavailability(error: TransportError) -> bool:
    """Failures that say the server is not serving at all, as opposed to answering this request badly.

    No connection, no answer in time, or a retryable 5xx. Any other outcome, a 429 or a broken body
    included, shows a live server.
    """
    if isinstance(error, HTTPStatusError):
        return error.status is not None and error.status >= 500 and is_retryable_status(error.status)
    return isinstance(error, ConnectError | TimeoutError_)


def backoff_delay_s(attempt: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with full jitter, for the wait after failed ``attempt`` (1-based).

        delay = rand() * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))

    ``rand`` returns a float in [0, 1). The exponent is clamped, so a huge attempt number cannot overflow.
    """
    exp = min(max(attempt - 1, 0), _MAX_EXPONENT)
    cap = min(policy.backoff_max_s, policy.backoff_initial_s * math.ldexp(1.0, exp))
    return rand() * cap


def _seconds(value: str) -> float | None:
    """A non-negative, finite number of seconds, or None."""
    try:
        x = float(value.strip())
    except ValueError:
        return None
    return x if math.isfinite(x) and x >= 0 else None


_DURATION_UNITS_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration_s(value: str) -> float | None:
    """A Go-style duration as OpenAI's ``x-ratelimit-reset-*`` headers carry it ("1s", "6m0s", "20ms",
    "1h2m3.5s") or plain seconds; None when it is neither."""
    v = value.strip()
    plain = _seconds(v)
    if plain is not None:
        return plain
    total, num, i, matched = 0.0, "", 0, False
    while i < len(v):
        c = v[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if v.startswith("ms", i) else c
        if unit not in _DURATION_UNITS_S or not num:
            return None
        try:
            total += float(num) * _DURATION_UNITS_S[unit]
        except ValueError:  # "1.2.3s"
            return None
        num, matched = "", True
        i += len(unit)
    return total if matched and not num and math.isfinite(total) else None


def _http_date_s(value: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def parse_retry_after(headers: Mapping[str, str], now: float, *, rate_limit_resets: bool = True) -> float | None:
    """Seconds the server asked us to wait, or None when it gave no usable hint.

    In order: ``retry-after-ms``, then ``Retry-After`` (seconds, or an HTTP date: ``now`` is Unix time and a
    date in the past means "now", 0), then, when ``rate_limit_resets``, ``x-ratelimit-reset-requests`` /
    ``-tokens``: of the limits that are exhausted (``x-ratelimit-remaining-*`` is 0) or, when the remaining
    counts are not given, of both, the later reset. Negative, infinite or unreadable values are no hint.
    Header names match case-insensitively. The cap (``max_retry_after_s``) is ``retry_wait_s``'s job.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None and (x := _seconds(ms)) is not None:
        return x / 1000.0
    ra = lower.get("retry-after")
    if ra is not None:
        x = _seconds(ra)
        if x is None:
            x = _http_date_s(ra, now)
        if x is not None:
            return x
    if not rate_limit_resets:
        return None
    resets: list[float] = []
    exhausted: list[float] = []
    for limit in ("requests", "tokens"):
        raw = lower.get(f"x-ratelimit-reset-{limit}")
        reset = parse_duration_s(raw) if raw is not None else None
        if reset is None:
            continue
        resets.append(reset)
        if (lower.get(f"x-ratelimit-remaining-{limit}") or "").strip() == "0":
            exhausted.append(reset)
    if exhausted:
        return max(exhausted)
    return max(resets) if resets else None


def retry_wait_s(error: TransportError, attempt: int, policy: RetryPolicy, *,
                 rand: Callable[[], float], now: float) -> tuple[float, float | None]:
    """(wait before the next attempt, the server's hint if it gave one), the hint capped by
    ``max_retry_after_s``. Without a hint, the backoff for ``attempt``.

    ``x-ratelimit-reset-*`` count as a hint only on a 429: servers that send them send them on every answer,
    and on a 500 they say nothing about when to retry.
    """
    hint = None
    if error.headers:
        hint = parse_retry_after(error.headers, now, rate_limit_resets=error.status == 429)
    if hint is not None:
        hint = min(hint, policy.max_retry_after_s)
        return hint, hint
    return backoff_delay_s(attempt, policy, rand), None
