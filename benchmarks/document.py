"""BENCHMARKS.md: every benchmark's tables with its method and the machine, written by ``make bench``
(``python -m benchmarks --write BENCHMARKS.md``), so the document cannot drift from the code that measures.

Each section's method is its module's docstring (the part before the usage line); the goal lines that the
benchmarks print (``- Goal ...``) are gathered at the top. ``--only NAME --write BENCHMARKS.md`` refreshes
those sections of an existing document and keeps the others as they were (each section is dated).
"""

from __future__ import annotations

import re
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
(about 40 minutes on two cores, guidellm included; `make bench-quick` is a 45-second smoke run that prints
the tables without writing this file).

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
        f"- Written: {_now()}{' (quick run)' if quick else ''}; a section refreshed on its own "
        "(`python -m benchmarks --only NAME --write BENCHMARKS.md`) says when it was measured",
        f"- CPU: {env['cpu_model']}, {env['cpus']} cores ({env['cpus_allowed']} allowed to this process); "
        f"Linux {env['kernel']}",
        f"- {env['python']}; aiohttp {env['aiohttp']}, anyio {env['anyio']}, uvloop {env['uvloop']}, "
        f"orjson {env['orjson']}, rich {env['rich']}, typer {env['typer']}; gptoss-batch {env['gptoss-batch']}",
        f"- Instant server: {('nginx ' + v) if (v := nginx_version()) else 'asyncio fallback (nginx not installed)'}",
        f"- guidellm: {gl + ' (in .bench/guidellm)' if gl else 'not installed (make bench-guidellm)'}",
    ]
    return lines


_MEASURED = "_Measured "


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def render(results: Sequence[tuple[str, Callable[[bool], str], str]], *, quick: bool,
           previous: str | None = None) -> str:
    """``results``: (name, the benchmark's entry function, the Markdown it returned), in run order.
    ``previous``: an earlier document whose other sections are kept (a partial run)."""
    sections: dict[str, str] = {}  # title -> body (method, date line, tables)
    if previous is not None:
        sections.update(_sections(previous))
    when = _now() + (" (quick run)" if quick else "")
    for name, run, text in results:
        sections[TITLES.get(name, name)] = f"{_method(run)}\n\n{_MEASURED}{when}._\n\n{text.strip()}"
    order = [TITLES.get(n, n) for n in ORDER] + [TITLES.get(n, n) for n, _, _ in results]
    titles = [t for t in dict.fromkeys(order + list(sections)) if t in sections]
    goals = [line for t in titles for line in sections[t].splitlines() if line.startswith("- Goal")]
    out = [INTRO, "## The machine", "", *_machine_lines(quick), ""]
    if goals:
        out += ["## The goals at a glance", "", *goals, ""]
    for title in titles:
        out += [f"## {title}", "", sections[title].strip(), ""]
    return "\n".join(out).rstrip() + "\n"


def _sections(document: str) -> dict[str, str]:
    """The benchmark sections of a document written by ``render`` (title -> body)."""
    parts = re.split(r"^## (.+)$", document, flags=re.MULTILINE)
    found = {title.strip(): body.strip() for title, body in zip(parts[1::2], parts[2::2], strict=True)}
    return {t: b for t, b in found.items() if t not in ("The machine", "The goals at a glance")}
