"""Run the real CLI as a subprocess, the way users and cron run it."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

CLI_TIMEOUT_S = 120


def gptoss(*args: str, input: bytes | None = None, timeout: float = CLI_TIMEOUT_S,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gptoss_batch", *args], input=input, capture_output=True,
                          timeout=timeout, env=env, check=False)


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
    return path


def summary_of(out: Path) -> dict[str, Any]:
    """The summary JSON a run wrote beside its output."""
    data: dict[str, Any] = orjson.loads(Path(f"{out}.summary.json").read_bytes())
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def wait_for_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout_s: float) -> list[bytes]:
    """Read ``proc``'s stderr line by line until one starts with ``prefix`` (bounded by ``timeout_s``); the
    lines read, that one included."""
    assert proc.stderr is not None
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no line starting {prefix!r} within {timeout_s} s: {b''.join(seen)!r}")
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"the process ended before {prefix!r}: {b''.join(seen)!r}")
        seen.append(line)
        if line.startswith(prefix):
            return seen
