"""What the process-level benchmarks share: run a child and take its own rusage, describe the machine,
and format a median with its spread.

``run_child`` waits for the child with ``os.wait4``, so CPU (user+sys) and peak RSS are the child's own
(with whatever children it reaped itself, e.g. guidellm's worker processes), never this process's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class ChildResult:
    returncode: int
    cpu_s: float  # user+sys of the child and the descendants it waited for
    wall_s: float
    peak_rss_kib: int  # the child's ru_maxrss (the largest of it and its reaped descendants)
    stdout: bytes
    stderr: bytes
    timed_out: bool

    def check(self, what: str, ok_codes: Sequence[int] = (0,)) -> ChildResult:
        if self.timed_out or self.returncode not in ok_codes:
            tail = self.stderr.decode(errors="replace")[-2000:]
            why = "timed out" if self.timed_out else f"exited with {self.returncode}"
            raise RuntimeError(f"{what} {why}:\n{tail}")
        return self


# Linux keeps a process's peak RSS across fork and exec (ru_maxrss starts at the parent's), so a child of a
# large benchmark process would report at least the parent's size. This small launcher forks the command
# from a fresh interpreter (~10 MB: the floor of every peak reported here) and writes the command's own
# rusage to the file named by its first argument.
_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_utime!r} {ru.ru_stime!r} {ru.ru_maxrss}")
"""


def run_child(cmd: Sequence[str], *, timeout_s: float, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` to completion (killed after ``timeout_s``) and return its own resource usage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as usage_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, usage_file.name, *cmd],
                                cwd=cwd or ROOT, env=dict(env) if env is not None else None,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command: one process group

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        wall_s = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        fields = usage_file.read().split()
        if len(fields) != 4:  # the launcher itself was killed
            return ChildResult(-9, 0.0, wall_s, 0, out.read(), err.read(), True)
        code, user_s, sys_s, maxrss = int(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])
        return ChildResult(code, user_s + sys_s, wall_s, maxrss, out.read(), err.read(), killed.is_set())


# -- the machine ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def nginx_version() -> str | None:
    from benchmarks.instant_server import find_nginx  # the lookup that picks the server, so they agree

    nginx = find_nginx()
    if nginx is None:
        return None
    proc = subprocess.run([nginx, "-v"], capture_output=True, timeout=10, check=False)
    return (proc.stderr or proc.stdout).decode(errors="replace").strip().removeprefix("nginx version: ")


def machine() -> dict[str, str]:
    """The facts a reader needs to judge the figures: cores, CPU, Python, the libraries in the hot path."""
    return {
        "cpus": str(os.cpu_count()),
        "cpus_allowed": str(len(os.sched_getaffinity(0))),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": version("aiohttp"),
        "anyio": version("anyio"),
        "uvloop": version("uvloop"),
        "orjson": version("orjson"),
        "rich": version("rich"),
        "typer": version("typer"),
        "gptoss-batch": version("gptoss-batch"),
    }


def loop_name() -> str:
    """The event loop the benchmarks run on: uvloop where installed."""
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


def loadavg() -> str:
    return f"{os.getloadavg()[0]:.1f}"


# -- numbers --------------------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``median (min–max)``, or the value alone when there is one."""
    if not values:
        return "–"
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:,.{digits}f}"
    return f"{mid:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
