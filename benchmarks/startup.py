"""Start-up: how long `gptoss-batch --help` takes, and which imports it pays for.

cron jobs and CI pay start-up on every invocation. Each command runs ``repeats`` times after one warm-up
run (so the files are in the page cache); wall time is the child's own, CPU is its user+sys from
``os.wait4``. ``python -c pass`` is the interpreter's floor. The import table is ``python -X importtime -c
"import gptoss_batch.cli"``: the modules gptoss_batch.cli imports directly, by cumulative time, and
whether aiohttp (needed only once a run starts) was among them.

    python -m benchmarks.startup [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import loadavg, run_child, spread, stderr_line

GOAL_HELP_S = 0.3
FULL_REPEATS = 15
QUICK_REPEATS = 3
TOP_IMPORTS = 12


def _console_script() -> str:
    script = Path(sys.executable).parent / "gptoss-batch"
    return str(script) if script.exists() else "gptoss-batch"


@dataclass(frozen=True, slots=True)
class Timing:
    label: str
    wall_s: list[float]
    cpu_s: list[float]


@dataclass(frozen=True, slots=True)
class ImportLine:
    module: str
    self_us: int
    cumulative_us: int
    depth: int


@dataclass(slots=True)
class Report:
    repeats: int
    timings: list[Timing] = field(default_factory=list)
    imports: list[ImportLine] = field(default_factory=list)
    loadavg: str = ""


def commands() -> list[tuple[str, list[str]]]:
    script = _console_script()
    return [
        ("`python -c pass` (the interpreter alone)", [sys.executable, "-c", "pass"]),
        ("`gptoss-batch --help`", [script, "--help"]),
        ("`gptoss-batch run --help`", [script, "run", "--help"]),
        ("`python -c 'import gptoss_batch.cli'`", [sys.executable, "-c", "import gptoss_batch.cli"]),
    ]


def time_command(label: str, cmd: Sequence[str], repeats: int) -> Timing:
    run_child(cmd, timeout_s=60).check(label)  # warm-up: page cache, .pyc files
    walls, cpus = [], []
    for _ in range(repeats):
        child = run_child(cmd, timeout_s=60).check(label)
        walls.append(child.wall_s)
        cpus.append(child.cpu_s)
    return Timing(label, walls, cpus)


def parse_importtime(stderr: str) -> list[ImportLine]:
    """``import time: SELF | CUMULATIVE | <2 spaces per level>module`` lines, in printed order."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, raw = line.removeprefix("import time:").split("|", 2)
        depth = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        out.append(ImportLine(raw.strip(), int(self_us), int(cumulative_us), depth))
    return out


def import_profile() -> list[ImportLine]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gptoss_batch.cli"],
                          capture_output=True, timeout=60, check=True, text=True)
    return parse_importtime(proc.stderr)


def run(repeats: int, progress: Callable[[str], None] | None = None) -> Report:
    report = Report(repeats, loadavg=loadavg())
    for label, cmd in commands():
        t = time_command(label, cmd, repeats)
        report.timings.append(t)
        if progress is not None:
            progress(f"startup {label:<45} wall {statistics.median(t.wall_s) * 1000:6.0f} ms  "
                     f"CPU {statistics.median(t.cpu_s) * 1000:6.0f} ms")
    import_profile()  # warm
    report.imports = import_profile()
    return report


def format_markdown(report: Report) -> str:
    lines = [
        f"{report.repeats} runs each after a warm-up, median (min–max) in ms; load average {report.loadavg}.",
        "",
        "| command | wall ms | CPU ms (user+sys) |",
        "|---|---:|---:|",
    ]
    for t in report.timings:
        lines.append(f"| {t.label} | {spread([w * 1000 for w in t.wall_s])} | {spread([c * 1000 for c in t.cpu_s])} |")
    help_timing = next((t for t in report.timings if t.label == "`gptoss-batch --help`"), None)
    if help_timing is not None:
        median_s = statistics.median(help_timing.wall_s)
        verdict = "met" if median_s < GOAL_HELP_S else "missed"
        lines += ["", f"- Goal: `gptoss-batch --help` under {GOAL_HELP_S * 1000:.0f} ms: {median_s * 1000:.0f} ms "
                      f"(median wall) — **{verdict}**."]
    cli = next((i for i in report.imports if i.module == "gptoss_batch.cli"), None)
    if cli is not None:
        direct = sorted((i for i in report.imports if i.depth == cli.depth + 1 and _under(report.imports, i, cli)),
                        key=lambda i: -i.cumulative_us)
        loaded = {i.module for i in report.imports}
        lines += [
            f"- `python -X importtime -c 'import gptoss_batch.cli'`: {cli.cumulative_us / 1000:.0f} ms in all; "
            f"aiohttp {'**imported**' if 'aiohttp' in loaded else 'not imported (loaded when a run starts)'}; "
            f"its direct imports by cumulative time:",
            "",
            "| module | cumulative ms | self ms |",
            "|---|---:|---:|",
        ]
        for i in direct[:TOP_IMPORTS]:
            lines.append(f"| {i.module} | {i.cumulative_us / 1000:.1f} | {i.self_us / 1000:.1f} |")
    return "\n".join(lines)


def _under(imports: list[ImportLine], item: ImportLine, parent: ImportLine) -> bool:
    """importtime prints children before their parent: ``item`` belongs to ``parent`` when no line of
    ``parent``'s depth or shallower comes between them."""
    a, b = imports.index(item), imports.index(parent)
    return a < b and all(i.depth > parent.depth for i in imports[a + 1:b])


def markdown(quick: bool) -> str:
    """Entry for ``python -m benchmarks``."""
    return format_markdown(run(QUICK_REPEATS if quick else FULL_REPEATS, progress=stderr_line))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} runs per command")
    args = ap.parse_args(argv)
    print(format_markdown(run(QUICK_REPEATS if args.quick else FULL_REPEATS, progress=stderr_line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
