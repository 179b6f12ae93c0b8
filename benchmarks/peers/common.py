"""What the peer scripts share: the command line, the rows, the request body and the JSON report."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson

MODEL = "instant"
MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class PeerArgs:
    input: str
    output: str
    base_url: str
    concurrency: int
    gc_tuned: bool
    stub: bool


def parse_args(prog: str, description: str, argv: Sequence[str] | None = None) -> PeerArgs:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("input", help="JSONL rows {'id', 'prompt'}")
    ap.add_argument("output", help="results JSONL")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server base URL ending in /v1")
    ap.add_argument("--concurrency", "-n", type=int, default=64)
    ap.add_argument("--gc-tuned", action="store_true",
                    help="tune the garbage collector as gptoss-batch does (gc.freeze, gen-0 threshold 10,000)")
    ap.add_argument("--stub", action="store_true", help="answer without a server (tutorial only; for memory)")
    ns = ap.parse_args(argv)
    return PeerArgs(ns.input, ns.output, ns.base_url.rstrip("/"), ns.concurrency, ns.gc_tuned, ns.stub)


def tune_gc() -> None:
    """What gptoss_batch.cli.run_async does before a run, for a like-for-like floor."""
    import gc

    gc.freeze()
    gc.set_threshold(10_000)


def chat_body(prompt: str) -> dict[str, Any]:
    """The same request gptoss-batch sends for a prompt row with --model instant --max-tokens 16."""
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": prompt}]}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True, slots=True)
class PeerReport:
    requests: int  # requests that completed (any status)
    ok: int  # HTTP 200 with a parsable completion
    loop_cpu_s: float  # user+sys of this process for the run loop only (no interpreter start-up, no imports)
    wall_s: float  # the run loop's wall time
    peak_rss_kib: int  # ru_maxrss of this process at the end

    def emit(self) -> None:
        sys.stdout.write(orjson.dumps(asdict(self)).decode() + "\n")
        sys.stdout.flush()


class LoopMeter:
    """CPU and wall time of the run loop."""

    def __init__(self) -> None:
        self.cpu0 = cpu_s()
        self.wall0 = time.perf_counter()

    def report(self, requests: int, ok: int) -> PeerReport:
        return PeerReport(requests, ok, cpu_s() - self.cpu0, time.perf_counter() - self.wall0,
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
