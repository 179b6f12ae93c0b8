"""Memory stays flat as the input grows: the whole pipeline with an instant stub transport."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson


def generate(path: Path, rows: int) -> Path:
    with path.open("wb") as f:
        for i in range(rows):
            f.write(b'{"prompt": "Tell me about the number %d in a few words."}\n' % i)
    return path


def peak_rss_kib(tmp_path: Path, rows: int) -> int:
    inp = generate(tmp_path / f"in-{rows}.jsonl", rows)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.stub_run", str(inp), str(tmp_path / f"out-{rows}.jsonl"),
         "--concurrency", "64"],
        capture_output=True, timeout=240, check=True)
    report = orjson.loads(proc.stdout)
    assert report["ok"] == rows and report["exit_code"] == 0
    return int(report["peak_rss_kib"])


def test_a_million_rows_take_no_more_memory_than_ten_thousand(tmp_path: Path) -> None:
    small = peak_rss_kib(tmp_path, 10_000)
    large = peak_rss_kib(tmp_path, 1_000_000)
    assert large <= small * 1.2, f"peak RSS {large} KiB at 1M rows vs {small} KiB at 10k rows"
