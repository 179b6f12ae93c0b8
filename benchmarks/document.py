"""BENCHMARKS.md: every benchmark's tables with its method and the machine, written by ``make bench``
(``python -m benchmarks --write BENCHMARKS.md``), so the document cannot drift from the code that measures.

Each section's method is its module's docstring (the part before the usage line); the goal lines that the
benchmarks print (``- Goal ...``) are gathered at the top.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from benchmarks.measure import machine, nginx_version
from benchmarks.peers import guidellm_runner

TITLES = {
    "pipeline": "Full pipeline against the alternatives: CPU per request",
    "transport": "Transport: aiohttp against httpx",
    "streaming": "Streaming: CPU per chunk",
    "memory": "Memory: peak RSS as the input grows",
    "startup": "Start-up: `--help` and imports",
    "resume_scan": "Resume scan",
    "adaptive": "Adaptive concurrency",
    "resilience": "Resilience",
}
ORDER = ("pipeline", "streaming", "memory", "startup", "transport")

INTRO = """\
# Benchmarks

gptoss-batch exists to keep an inference server busy, so the client must never be the bottleneck: what
it costs per request, per streamed chunk, per row held in memory and per invocation is measured here,
side by side with what a user would write or install instead. Regenerate this file with `make bench`
(about half an hour; `make bench-quick` is a one-minute smoke run that prints the tables without writing
this file).

**How to read the numbers.** Every benchmark starts its own "instant" OpenAI-compatible server on
loopback (nginx answering a fixed completion or SSE stream, else a minimal asyncio server), pinned to one
CPU with the client pinned to another, so what is measured is the client's own work. CPU is user+sys
time of the client process (from `os.wait4` or the process's own `getrusage`), not wall time, so a
neighbour on the machine slows the wall clock more than the figures. Repeats are interleaved (every client
at a concurrency, then the next repeat), and the figures are medians with (min–max); ratios are medians
of per-repeat ratios, measured in the same run. On a shared two-core machine expect ±15% between runs:
compare ratios, not absolute figures across runs.
"""


def _method(run: Callable[[bool], str]) -> str:
    doc = (sys.modules[run.__module__].__doc__ or "").strip()
    keep = []
    for para in doc.split("\n\n"):
        if para.lstrip().startswith(("python -m", "Run ``python", "Run `python")):
            break  # the usage line and what follows it are for the command line, not the reader
        keep.append(para)
    return "\n\n".join(keep)


def _machine_lines(quick: bool) -> list[str]:
    env = machine()
    gl = guidellm_runner.guidellm_version()
    lines = [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}{' (quick run)' if quick else ''}",
        f"- CPU: {env['cpu_model']}, {env['cpus']} cores ({env['cpus_allowed']} allowed to this process); "
        f"Linux {env['kernel']}",
        f"- {env['python']}; aiohttp {env['aiohttp']}, anyio {env['anyio']}, uvloop {env['uvloop']}, "
        f"orjson {env['orjson']}, rich {env['rich']}, typer {env['typer']}; gptoss-batch {env['gptoss-batch']}",
        f"- Instant server: {('nginx ' + v) if (v := nginx_version()) else 'asyncio fallback (nginx not installed)'}",
        f"- guidellm: {gl + ' (in .bench/guidellm)' if gl else 'not installed (make bench-guidellm)'}",
    ]
    return lines


def render(results: Sequence[tuple[str, Callable[[bool], str], str]], *, quick: bool) -> str:
    """``results``: (name, the benchmark's entry function, the Markdown it returned), in run order."""
    by_name = {name: (run, text) for name, run, text in results}
    names = [n for n in ORDER if n in by_name] + [n for n, _, _ in results if n not in ORDER]
    goals = [line for _, _, text in results for line in text.splitlines() if line.startswith("- Goal")]
    out = [INTRO, "## The machine", "", *_machine_lines(quick), ""]
    if goals:
        out += ["## The goals at a glance", "", *goals, ""]
    for name in names:
        run, text = by_name[name]
        out += [f"## {TITLES.get(name, name)}", "", _method(run), "", text.strip(), ""]
    return "\n".join(out).rstrip() + "\n"
