"""Resuming through the real CLI against serve-sim: one writer per output, the input check, kept or retried
failures, ordered output, the output's directory and stdout, and the verify/summary commands."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gptoss_batch.sim.testing import SimHandle, start_sim
from tests.cli_helpers import CLI_TIMEOUT_S, gptoss, read_jsonl, summary_of, write_jsonl

# Fixed timing: every request takes ~10 ms, independent of load.
FAST = ("--ttft-s", "0.005", "--itl-s", "0.0005")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim(*FAST) as handle:
        yield handle


def run_args(base_url: str, inp: Path, out: Path | str, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--base-url", base_url, "--max-tokens", "8", "--progress", "none",
            *extra]


def requests_total(sim: SimHandle) -> int:
    n: int = sim.stats()["requests_total"]
    return n


def prompts(n: int, *, ids: bool = True) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": f"r{i}", "prompt": f"question {i}"} if ids else {"prompt": f"question {i}"}


def test_the_outputs_directory_is_created(sim: SimHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "not" / "yet" / "there" / "out.jsonl"
    proc = gptoss(*run_args(sim.base_url, inp, out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(read_jsonl(out)) == 5 and not Path(f"{out}.lock").exists()


def test_stdout_output_takes_no_lock_and_leaves_no_files(sim: SimHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    work = tmp_path / "cwd"
    work.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_batch", *run_args(sim.base_url, inp, "-")],
                              cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:  # two at once: stdout has no lock to fight over
        out, err = p.communicate(timeout=CLI_TIMEOUT_S)
        assert p.returncode == 0, err.decode()
        lines = [orjson.loads(x) for x in out.splitlines()]
        assert sorted(r["id"] for r in lines) == sorted(f"r{i}" for i in range(20))
    assert list(work.iterdir()) == []


def test_a_second_run_on_the_same_output_refuses_naming_the_pid_and_a_killed_runs_lock_is_taken_over(
        tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "out.jsonl"
    lock = Path(f"{out}.lock")
    with start_sim("--ttft-s", "0.5") as slow:
        first = subprocess.Popen([sys.executable, "-m", "gptoss_batch", *run_args(slow.base_url, inp, out,
                                  "-n", "2")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert lock.read_text().strip() == str(first.pid)
            second = gptoss(*run_args(slow.base_url, inp, out))
            assert second.returncode == 75
            assert f"PID {first.pid}" in second.stderr.decode()
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        assert lock.exists()  # a SIGKILLed run leaves its lock file; the kernel dropped the lock itself
    with start_sim(*FAST) as fast:
        third = gptoss(*run_args(fast.base_url, inp, out))
        assert third.returncode == 0, third.stderr.decode()
    assert gptoss("verify", str(inp), str(out)).returncode == 0
    assert not lock.exists()


def test_changed_input_is_refused_and_force_resume_keeps_rows_whose_id_remains(sim: SimHandle,
                                                                              tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10, ids=False))
    out = tmp_path / "out.jsonl"
    assert gptoss(*run_args(sim.base_url, inp, out)).returncode == 0
    before = out.read_bytes()
    # Edit row 3 and add two rows: rows without an explicit id are keyed by position and content.
    rows = list(prompts(12, ids=False))
    rows[3]["prompt"] = "an edited question"
    write_jsonl(inp, rows)

    sent = requests_total(sim)
    refused = gptoss(*run_args(sim.base_url, inp, out))
    err = refused.stderr.decode()
    assert refused.returncode == 2
    assert "different input" in err and "--force-resume" in err and "--overwrite" in err
    assert out.read_bytes() == before and requests_total(sim) == sent

    forced = gptoss(*run_args(sim.base_url, inp, out, "--force-resume"))
    assert forced.returncode == 0, forced.stderr.decode()
    assert requests_total(sim) == sent + 3  # the edited row and the two new ones
    assert out.read_bytes().startswith(before)
    overall = summary_of(out)["overall"]
    assert overall["rows"] == {"total": 12, "done": 12, "ok": 12, "failed": 0}  # the stale line is not counted
    report = orjson.loads(gptoss("verify", str(inp), str(out), "--json").stdout)
    assert report["passed"] and report["extra"]["count"] == 1
    # From now on the output belongs to the edited input: a plain rerun resumes it without complaint.
    again = gptoss(*run_args(sim.base_url, inp, out))
    assert again.returncode == 0 and requests_total(sim) == sent + 3


def test_failed_rows_are_kept_with_no_retry_failed_and_retried_by_default(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(8))
    out = tmp_path / "out.jsonl"
    with start_sim(*FAST, "--fail-500-rate", "1") as failing:
        proc = gptoss(*run_args(failing.base_url, inp, out, "--max-attempts", "1"))
        assert proc.returncode == 1
    assert [r["status"] for r in read_jsonl(out)] == ["error"] * 8
    with start_sim(*FAST) as healthy:
        kept = gptoss(*run_args(healthy.base_url, inp, out, "--no-retry-failed"))
        assert kept.returncode == 1  # the rows are still failed
        assert requests_total(healthy) == 0 and len(read_jsonl(out)) == 8
        retried = gptoss(*run_args(healthy.base_url, inp, out))
        assert retried.returncode == 0, retried.stderr.decode()
        assert requests_total(healthy) == 8
    lines = read_jsonl(out)
    assert [r["status"] for r in lines] == ["error"] * 8 + ["ok"] * 8  # appended, never rewritten
    overall = summary_of(out)["overall"]
    # Each row counted once, from its final line, with the run that finished it and how many runs it took.
    assert overall["rows"] == {"total": 8, "done": 8, "ok": 8, "failed": 0}
    assert overall["runs"] == {"3": 8} and overall["runs_total"] == 3
    assert gptoss("verify", str(inp), str(out)).returncode == 0

    recomputed = gptoss("summary", str(out), "--json")
    assert recomputed.returncode == 0
    alone = orjson.loads(recomputed.stdout)
    assert alone["rows"] == overall["rows"] and alone["runs"] == {"3": 8} and alone["runs_total"] == 3
    table = gptoss("summary", str(out))
    assert b"8 ok, 0 failed of 8" in table.stdout and b"3 runs" in table.stdout


def test_verify_fails_on_missing_and_duplicated_rows(sim: SimHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.jsonl"
    assert gptoss(*run_args(sim.base_url, inp, out)).returncode == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[0])  # two rows gone, one ok twice
    proc = gptoss("verify", str(inp), str(out), "--json")
    assert proc.returncode == 1
    report = orjson.loads(proc.stdout)
    assert (report["ok"], report["missing"]["count"], report["duplicated"]["count"]) == (3, 2, 1)
    assert report["duplicated"]["examples"] == [orjson.loads(lines[0])["id"]]
    table = gptoss("verify", str(inp), str(out))
    assert table.returncode == 1 and b"FAIL" in table.stdout and b"missing" in table.stdout
    assert gptoss("verify", str(inp), str(tmp_path / "none.jsonl")).returncode == 74


def test_ordered_output_is_in_input_order(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"id": f"r{i}", "prompt": f"q{i}", "max_tokens": 1 + (i * 7) % 40}
                                              for i in range(150)))
    out = tmp_path / "out.jsonl"
    # The engine model with varied output lengths: rows finish out of order.
    with start_sim("--decode-base-s", "0.001", "--max-num-seqs", "16", "--min-tokens", "1") as varied:
        plain = gptoss(*run_args(varied.base_url, inp, tmp_path / "plain.jsonl", "-n", "16"))
        ordered = gptoss(*run_args(varied.base_url, inp, out, "-n", "16", "--ordered"))
    assert plain.returncode == 0 and ordered.returncode == 0, ordered.stderr.decode()
    assert [r["index"] for r in read_jsonl(tmp_path / "plain.jsonl")] != list(range(150))
    assert [r["index"] for r in read_jsonl(out)] == list(range(150))
    assert b"--ordered" in gptoss("run", "--help").stdout
