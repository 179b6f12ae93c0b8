"""Run the real CLI as a subprocess, the way users and cron run it."""

from __future__ import annotations

import subprocess
import sys
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
