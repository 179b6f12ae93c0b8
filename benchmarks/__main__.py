"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each benchmark is a ``(name, run)`` pair where ``run(quick)`` does the work and returns Markdown; add new
ones to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from benchmarks import adaptive, resilience, resume_scan, streaming, transport

BENCHMARKS: list[tuple[str, Callable[[bool], str]]] = [
    ("transport", transport.markdown),
    ("streaming", streaming.markdown),
    ("resume_scan", resume_scan.markdown),
    ("adaptive", adaptive.markdown),
    ("resilience", resilience.markdown),
]


def main(argv: Sequence[str] | None = None) -> int:
    names = [name for name, _ in BENCHMARKS]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the benchmarks.")
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME", help=f"run only these ({', '.join(names)})"
    )
    args = parser.parse_args(argv)
    for name, run in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        print(f"## {name}\n\n{run(args.quick)}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
