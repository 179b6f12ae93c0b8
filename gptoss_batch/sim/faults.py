"""Which fault, if any, a request gets: a pure function of the config and a keyed RNG.

Every rate gets its own draw, in a fixed order, so the rates are independent and setting one does not
shift the decisions of another. When several hit, the first in ``FAULT_ORDER`` wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from gptoss_batch.sim.config import SimConfig

Fault = Literal["reset", "stall", "http_500", "http_503", "http_429", "malformed", "stream_cut"]
FAULT_ORDER: tuple[Fault, ...] = ("reset", "stall", "http_500", "http_503", "http_429", "malformed",
                                  "stream_cut")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    fault: Fault | None = None
    # Only meaningful for http_429: whether the answer carries Retry-After.
    retry_after: bool = False
    slow_first_byte: bool = False


# Each fault's rate: the SimConfig field holding it.
_RATE_FIELD: dict[Fault, str] = {
    "reset": "reset_rate",
    "stall": "stall_rate",
    "http_500": "fail_500_rate",
    "http_503": "fail_503_rate",
    "http_429": "fail_429_rate",
    "malformed": "malformed_rate",
    "stream_cut": "stream_cut_rate",
}


def _rate(config: SimConfig, fault: Fault) -> float:
    rate: float = getattr(config, _RATE_FIELD[fault])
    return rate


def plan_faults(config: SimConfig, rng: random.Random) -> FaultPlan:
    """Draw one request's faults. ``rng`` is keyed on the request, so the plan is reproducible."""
    draws = [rng.random() for _ in FAULT_ORDER]
    retry_draw, slow_draw = rng.random(), rng.random()
    fault = next((f for f, d in zip(FAULT_ORDER, draws, strict=True) if d < _rate(config, f)), None)
    return FaultPlan(
        fault=fault,
        retry_after=fault == "http_429" and retry_draw < config.retry_after_share,
        slow_first_byte=config.slow_first_byte_s > 0 and slow_draw < config.slow_first_byte_rate,
    )
