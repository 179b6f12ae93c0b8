"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each benchmark is a ``(name, run)`` pair where ``run(quick)`` does the work and returns Markdown; add new
ones to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import adaptive, document, memory, pipeline, resilience, resume_scan, startup, streaming, transport

BENCHMARKS: list[tuple[str, Callable[[bool], str]]] = [
    ("transport", transport.markdown),
    ("streaming", streaming.markdown),
    ("resume_scan", resume_scan.markdown),
    ("adaptive", adaptive.markdown),
    ("resilience", resilience.markdown),
    ("pipeline", pipeline.markdown),
    ("memory", memory.markdown),
    ("startup", startup.markdown),
]


def main(argv: Sequence[str] | None = None) -> int:
    names = [name for name, _ in BENCHMARKS]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the benchmarks.")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME", help=f"run only these ({', '.join(names)})"
    )
    parser.add_argument("--write", type=Path, metavar="PATH",
                        help="also write the tables, methods and machine as a Markdown document (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    results = []
    failed: list[str] = []
    allowed = os.sched_getaffinity(0)
    t_all = time.perf_counter()
    for name, run in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        os.sched_setaffinity(0, allowed)  # a benchmark pins this process to one CPU; give the next all of them
        t0 = time.perf_counter()
        try:
            text = run(args.quick)
        except Exception as exc:  # one failing benchmark must not lose the others' tables
            traceback.print_exc()
            text = f"**Failed**: {type(exc).__name__}: {exc}"
            failed.append(name)
        results.append((name, run, text))
        print(f"## {name}\n\n{text}\n", flush=True)
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    if args.write is not None:
        # With --only, the other sections of an existing document are kept as they were.
        previous = args.write.read_text() if args.only and args.write.exists() else None
        args.write.write_text(document.render(results, quick=args.quick, previous=previous))
    print(f"benchmarks took {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
