"""Deterministic pseudo-text and token counts for serve-sim.

Everything random is drawn from an RNG keyed on its purpose plus (seed, prompt), so the same prompt gives the
same words and the same output length on every run, whatever the arrival order.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Literal

FinishReason = Literal["stop", "length"]

_SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "qu", "dor", "an", "el", "is", "or", "un", "bra",
              "ti", "nex", "po", "ral", "ve", "shi", "gan", "mo", "ter", "lu", "fi", "zen", "ca", "dre", "op")


def _build_vocabulary(size: int = 1024) -> tuple[str, ...]:
    rng = random.Random(20240805)
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))] = None
    return tuple(words)


VOCABULARY = _build_vocabulary()


def stable_digest(*parts: object) -> bytes:
    """A hash of ``parts`` that, unlike ``hash()``, is the same in every process."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()


def keyed_rng(*parts: object) -> random.Random:
    """A Random seeded by ``stable_digest(parts)``."""
    return random.Random(int.from_bytes(stable_digest(*parts), "big"))


def count_text_tokens(text: str) -> int:
    """Rough tokenizer: about four characters a token, at least one."""
    return max(1, math.ceil(len(text) / 4))


def output_length(rng: random.Random, *, min_tokens: int, natural_max_tokens: int | None,
                  max_tokens: int) -> tuple[int, FinishReason]:
    """How many tokens a request gets and why it stops.

    The natural length is uniform in [min_tokens, natural_max_tokens or max_tokens]; reaching max_tokens
    means finish_reason "length", as vLLM reports it.
    """
    upper = natural_max_tokens if natural_max_tokens is not None else max_tokens
    natural = rng.randint(min_tokens, upper) if upper > min_tokens else min_tokens
    if natural >= max_tokens:
        return max_tokens, "length"
    return natural, "stop"


def generate_tokens(rng: random.Random, count: int) -> list[str]:
    """``count`` token strings (one pseudo-word each) that join into sentences."""
    out: list[str] = []
    sentence_left = 0
    for i in range(count):
        word = rng.choice(VOCABULARY)
        if sentence_left == 0:
            word = word.capitalize()
            sentence_left = rng.randint(5, 14)
        sentence_left -= 1
        if sentence_left == 0:
            word += "."
        out.append(word if i == 0 else " " + word)
    return out

