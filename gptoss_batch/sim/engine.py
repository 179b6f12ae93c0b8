"""The engine model: a continuous-batching scheduler (pure, clock passed in) and the asyncio loop driving it.

One loop steps every running sequence together, like vLLM: each step admits waiting requests (FIFO, while
slots and KV budget allow), takes ``tokens_per_step * decode_base_s * (1 + decode_slope * running)`` plus
the prefill time of the requests it admitted, then hands every running sequence ``tokens_per_step`` tokens.
Per-sequence speed falls as the batch grows while aggregate throughput rises and flattens; beyond
``max_num_seqs`` requests queue. The loop sleeps while idle, so thousands of waiting connections cost nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal

from gptoss_batch.sim.config import SimConfig

SeqState = Literal["new", "waiting", "running", "finished", "aborted", "failed"]

# When the loop falls behind its schedule (a busy CPU), it catches up by running steps back to back, but
# never for more than this much simulated time: a process that was frozen should not then burst.
MAX_LAG_S = 0.25


@dataclass(eq=False, slots=True)
class Seq:
    """One request inside the engine. Times are on the engine's clock."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    arrival_s: float
    stream: bool = False
    generated: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    state: SeqState = "new"
    # Called after a step gave this sequence tokens (streams) or ended it (everyone).
    notify: Callable[[], None] | None = None

    @property
    def kv_need(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def done(self) -> bool:
        return self.state in ("finished", "aborted", "failed")


class Scheduler:
    """Continuous batching without I/O: ``plan_step`` admits and prices a step, ``complete_step`` runs it."""

    def __init__(self, *, max_num_seqs: int, kv_tokens: int, prefill_s_per_token: float,
                 decode_base_s: float, decode_slope: float, tokens_per_step: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_tokens = kv_tokens
        self.prefill_s_per_token = prefill_s_per_token
        self.decode_base_s = decode_base_s
        self.decode_slope = decode_slope
        self.tokens_per_step = tokens_per_step
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.kv_used = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.max_running_seen = 0
        self.max_waiting_seen = 0

    @classmethod
    def from_config(cls, config: SimConfig) -> Scheduler:
        return cls(max_num_seqs=config.max_num_seqs, kv_tokens=config.kv_tokens,
                   prefill_s_per_token=config.prefill_s_per_token, decode_base_s=config.decode_base_s,
                   decode_slope=config.decode_slope, tokens_per_step=config.tokens_per_step)

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_used / self.kv_tokens)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def decode_step_s(self, running: int) -> float:
        """Time of one decode token for the whole batch."""
        return self.decode_base_s * (1.0 + self.decode_slope * running)

    def submit(self, seq: Seq) -> None:
        seq.state = "waiting"
        self.waiting.append(seq)
        self.max_waiting_seen = max(self.max_waiting_seen, len(self.waiting))

    def abort(self, seq: Seq, state: SeqState = "aborted") -> None:
        """Take ``seq`` out wherever it is and free its KV reservation."""
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            self.running.remove(seq)
            self.kv_used -= seq.kv_need
        if not seq.done:
            seq.state = state

    def _fits(self, seq: Seq) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        # A request larger than the whole budget still runs alone rather than wait forever.
        return not self.running or self.kv_used + seq.kv_need <= self.kv_tokens

    def plan_step(self, now: float) -> float:
        """Admit what fits (head of line first) and return the step's duration (0 when idle)."""
        prefill_tokens = 0
        while self.waiting and self._fits(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.state = "running"
            self.running.append(seq)
            self.kv_used += seq.kv_need
            prefill_tokens += seq.prompt_tokens
        self.prompt_tokens_total += prefill_tokens
        self.max_running_seen = max(self.max_running_seen, len(self.running))
        if not self.running:
            return 0.0
        return (self.tokens_per_step * self.decode_step_s(len(self.running))
                + self.prefill_s_per_token * prefill_tokens)

    def complete_step(self, now: float) -> list[Seq]:
        """Give every running sequence its tokens; return the sequences that progressed."""
        progressed = list(self.running)
        still: list[Seq] = []
        for seq in progressed:
            n = min(self.tokens_per_step, seq.output_tokens - seq.generated)
            seq.generated += n
            self.generation_tokens_total += n
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.generated >= seq.output_tokens:
                seq.state = "finished"
                seq.finished_s = now
                self.kv_used -= seq.kv_need
            else:
                still.append(seq)
        self.running = still
        return progressed


class Engine:
    """Drives a Scheduler on the event loop's clock; ``generate`` is what request handlers await."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.scheduler = Scheduler.from_config(config)
        self._wake = asyncio.Event()
        self._started_s: float | None = None

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        self._started_s = loop.time()
        next_s = loop.time()
        while True:
            if not sched.has_work():
                self._wake.clear()
                await self._wake.wait()
                next_s = loop.time()
                continue
            now = loop.time()
            sched.max_num_seqs = self.config.slots_at(now - self._started_s)
            next_s = max(next_s, now - MAX_LAG_S)
            next_s += sched.plan_step(now)
            delay = next_s - loop.time()
            # sleep(0) when behind still yields, so handlers can write what the last step produced.
            await asyncio.sleep(max(delay, 0.0))
            for seq in sched.complete_step(loop.time()):
                if seq.notify is not None and (seq.stream or seq.done):
                    seq.notify()

    def fail_all(self) -> None:
        """End every sequence as failed (the simulated engine died)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.abort(seq, "failed")
            if seq.notify is not None:
                seq.notify()

    async def generate(self, seq: Seq) -> AsyncGenerator[int, None]:
        """Run ``seq`` and yield its token count after each step that advanced it (streams) or once at the
        end (non-streams). Leaving early (client gone) aborts it and frees its slot."""
        progressed = asyncio.Event()
        seq.notify = progressed.set
        self.scheduler.submit(seq)
        self._wake.set()
        sent = 0
        try:
            while not seq.done:
                await progressed.wait()
                progressed.clear()
                if seq.generated > sent:
                    sent = seq.generated
                    yield sent
        finally:
            if not seq.done:
                self.scheduler.abort(seq)


async def generate_fixed(seq: Seq, *, ttft_s: float, itl_s: float) -> AsyncGenerator[int, None]:
    """The fixed schedule: token i (from 1) at arrival + ttft_s + (i - 1) * itl_s, independent of load.

    Deadlines are absolute, so sleeping late once does not shift the tokens after it.
    """
    loop = asyncio.get_running_loop()
    seq.state = "running"
    for i in range(1, seq.output_tokens + 1):
        if not seq.stream and i < seq.output_tokens:
            continue
        delay = seq.arrival_s + ttft_s + (i - 1) * itl_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        seq.generated = i
        if seq.first_token_s is None:
            seq.first_token_s = seq.arrival_s + ttft_s if not seq.stream else loop.time()
        yield i
    seq.state = "finished"
    seq.finished_s = loop.time()
