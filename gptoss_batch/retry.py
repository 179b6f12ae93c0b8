"""Pure retry policy: which failures to retry, how long to wait, and what the server asked for.

The clock and the random source are parameters, so every rule is testable without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def is_retryable(error: TransportError) -> bool:
    """Connection errors, timeouts, broken bodies/streams and the transient statuses are retried.

    Other 4xx (400, 401, 403, 404, 422, ...) are the request's own fault: retrying cannot help.
    """
    if isinstance(error, HTTPStatusError):
        return error.status in RETRYABLE_STATUSES or (error.status or 0) >= 500
    return isinstance(error, ConnectError | TimeoutError_ | ProtocolError | StreamError)


def is_unavailability(error: TransportError) -> bool:
    """Failures that say the server is not serving at all (as opposed to refusing this request)."""
    if isinstance(error, HTTPStatusError):
        return (error.status or 0) >= 500
    return isinstance(error, ConnectError | TimeoutError_)


def backoff_delay_s(attempt: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with full jitter, for the wait after failed ``attempt`` (1-based).

        delay = rand() * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))

    The exponent is clamped so a huge attempt number cannot overflow.
    """
    exp = min(max(attempt - 1, 0), 62)
    cap = min(policy.backoff_max_s, policy.backoff_initial_s * math.ldexp(1.0, exp))
    return rand() * cap


def _seconds(value: str) -> float | None:
    try:
        x = float(value.strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _reset_duration(value: str) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*``: "1s", "6m0s", "20ms", "1h2m3.5s" or plain seconds."""
    v = value.strip()
    plain = _seconds(v)
    if plain is not None:
        return plain
    total, num = 0.0, ""
    i = 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    matched = False
    while i < len(v):
        c = v[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if v.startswith("ms", i) else c
        if unit not in units or not num:
            return None
        try:
            total += float(num) * units[unit]
        except ValueError:
            return None
        num, matched = "", True
        i += len(unit)
    return total if matched and not num else None


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the server asked us to wait, or None when it gave no usable hint.

    Reads ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date, ``now`` being Unix time) and
    ``x-ratelimit-reset-requests`` / ``-tokens`` (the longer of the two). Negative hints become 0.
    Header names are matched case-insensitively.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        x = _seconds(ms)
        if x is not None:
            return max(0.0, x / 1000.0)
    ra = lower.get("retry-after")
    if ra is not None:
        x = _seconds(ra)
        if x is not None:
            return max(0.0, x)
        try:
            when = parsedate_to_datetime(ra)
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    resets = [
        d for d in (_reset_duration(lower[k]) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
                    if k in lower)
        if d is not None
    ]
    if resets:
        return max(0.0, max(resets))
    return None


def retry_wait_s(error: TransportError, attempt: int, policy: RetryPolicy, *,
                 rand: Callable[[], float], now: float) -> tuple[float, float | None]:
    """(wait before the next attempt, the server's hint if any, capped by ``max_retry_after_s``)."""
    hint = parse_retry_after(error.headers, now) if error.headers else None
    if hint is not None:
        hint = min(hint, policy.max_retry_after_s)
        return hint, hint
    return backoff_delay_s(attempt, policy, rand), None
