"""What the end-to-end tests share: prompt files, running the real CLI against a real server, reading what it
wrote, and the structural checks every ok line must pass (generated text is random; its shape is not)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.real_servers import ServerHandle
from tests.cli_helpers import gptoss, read_jsonl, summary_of, write_jsonl

# Generous: a real model on a 2-core machine that other test runs share.
CLI_TIMEOUT_S = 420.0
FINISH_REASONS = {"stop", "length"}

TOPICS = ("gravity", "rainbows", "volcanoes", "tides", "magnets", "bread", "bees", "glaciers", "comets", "clouds",
          "coral", "deserts", "lightning", "owls", "salt", "wind")


def prompts(n: int, *, chat: bool = False, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """``n`` short rows with ids r0..r{n-1}: prompts, or one-message chats."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        text = f"Here are three facts about {TOPICS[i % len(TOPICS)]}:"
        row: dict[str, Any] = {"id": f"r{i}"}
        if chat:
            row["messages"] = [{"role": "user", "content": text}]
        else:
            row["prompt"] = text
        if max_tokens is not None:
            row["max_tokens"] = max_tokens
        rows.append(row)
    return rows


def write_prompts(path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_jsonl(path, rows)


def run_args(server: ServerHandle, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--base-url", server.base_url, "--model", server.model,
            "--progress", "none", *extra]


def run(server: ServerHandle, inp: Path, out: Path, *extra: str,
        timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """``gptoss-batch run`` as a subprocess against ``server``."""
    return gptoss(*run_args(server, inp, out, *extra), timeout=timeout)


def start_run(server: ServerHandle, inp: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gptoss_batch", *run_args(server, inp, out, *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_lines(proc: subprocess.Popen[bytes], out: Path, lines: int, timeout_s: float = 240.0) -> int:
    """SIGKILL ``proc`` once ``out`` holds at least ``lines`` complete lines; returns how many it held once dead
    (counted again after the kill: lines written between the last poll and the kill count too). Polls the
    file: a killed writer cannot tell us anything, and the file is what a crash leaves behind."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return out.read_bytes().count(b"\n") if out.exists() else 0


def assert_a_killed_run_resumes(server: ServerHandle, tmp_path: Path, rows: int, kill_at: int, *args: str) -> None:
    """SIGKILL a run once ``kill_at`` lines are written, rerun the same command: it skips exactly the rows the
    killed run finished, ends with exit 0, and ``verify`` finds one final line per row."""
    inp, out = write_prompts(tmp_path / "in.jsonl", prompts(rows)), tmp_path / "out.jsonl"
    done_before = kill_after_lines(start_run(server, inp, out, *args), out, lines=kill_at)
    assert kill_at <= done_before < rows, "the run should have been killed mid-way"

    resumed = run(server, inp, out, *args)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert summary_of(out)["skipped"] == len({r["id"] for r in results(out)[:done_before] if r["status"] == "ok"})
    check = gptoss("verify", str(inp), str(out))
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def results(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out)


def assert_ok_line(line: dict[str, Any], *, max_tokens: int, model: str | None, stream: bool) -> None:
    """One ok result line, as any OpenAI-compatible server should produce it."""
    assert line["status"] == "ok", line
    assert isinstance(line["text"], str)
    assert line["finish_reason"] in FINISH_REASONS, line
    usage = line["usage"]
    assert usage["prompt_tokens"] >= 1
    assert 1 <= usage["completion_tokens"] <= max_tokens, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if line["finish_reason"] == "length":
        assert usage["completion_tokens"] == max_tokens, line
    if model is not None:
        assert line["model"] == model
    assert line["attempts"] == 1, line
    assert line["latency_s"] > 0
    if stream:
        assert 0 < line["ttft_s"] <= line["latency_s"]
        assert line["output_tokens_source"] == "usage"  # the server's own count, not a guess from chunks
    else:
        assert "ttft_s" not in line


def assert_clean_run(proc: subprocess.CompletedProcess[bytes], out: Path, ids: list[str], **ok_line: Any) -> None:
    """Exit 0, exactly one ok line per row and a summary that counts them."""
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    lines = results(out)
    assert sorted(r["id"] for r in lines) == sorted(ids)
    for line in lines:
        assert_ok_line(line, **ok_line)
    s = summary_of(out)
    assert s["rows"]["ok"] == len(ids) and s["rows"]["failed"] == 0
    assert s["output_tokens_per_s"] > 0


def error_line(out: Path, row_id: str) -> dict[str, Any]:
    [line] = [r for r in results(out) if r["id"] == row_id]
    assert line["status"] == "error", line
    error: dict[str, Any] = line["error"]
    return {**error, "attempts": line["attempts"]}
