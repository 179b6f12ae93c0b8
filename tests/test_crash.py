"""Interruptions of real runs (the CLI as a subprocess against serve-sim): SIGKILL at random moments, SIGINT
and SIGTERM with their drain, a second Ctrl-C, and a full disk. After each, the same command finishes the
job with exactly one final ok line per row, and nothing written before is lost."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from gptoss_batch.sim.testing import start_sim
from gptoss_batch.verify import verify
from tests.cli_helpers import gptoss, read_jsonl, summary_of, wait_for_line, write_jsonl

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

ROWS = 2000
MAX_ITERATIONS = 30
LOOP_BUDGET_S = 170.0  # the bound is 3 minutes
WAIT_S = 60.0  # any single wait on a child or a file


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptoss_batch", *args]


def run_args(base_url: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--base-url", base_url, "--max-tokens", "8", "--progress", "plain",
            *extra]


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def lines_in(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def test_sigkill_at_random_moments_then_the_same_command_until_done(tmp_path: Path) -> None:
    """Killed anywhere (start-up, scan, mid-run, while finishing), rerun until it exits 0. After every kill
    the file only grew, no id has two ok lines and every complete line parses; torn lines (injected after
    some kills, as a crash inside write() leaves them) are set aside whole; at the end verify passes."""
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    inp = write_jsonl(tmp_path / "in.jsonl", ({"id": f"q{i}", "prompt": f"question {i}"} for i in range(ROWS)))
    out = tmp_path / "out.jsonl"
    t_end = time.monotonic() + LOOP_BUDGET_S
    kept = b""  # the complete lines so far: every later file must start with them
    injected: list[bytes] = []
    kills = 0
    # ~50 ms per request at 16 in flight: a whole run takes ~6 s, so most kills land mid-run.
    with start_sim("--ttft-s", "0.05") as sim:
        for iteration in range(MAX_ITERATIONS):
            assert time.monotonic() < t_end, f"seed {seed}: not done within {LOOP_BUDGET_S:g}s"
            proc = subprocess.Popen(cli(*run_args(sim.base_url, inp, out, "-n", "16")),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                code: int | None = proc.wait(timeout=rng.uniform(0.3, 2.5))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=WAIT_S)
                code, kills = None, kills + 1
            data = out.read_bytes() if out.exists() else b""
            assert data.startswith(kept), f"seed {seed}, iteration {iteration}: earlier lines were lost or changed"
            kept = data[:data.rfind(b"\n") + 1]
            if code is not None:
                assert code == 0, f"seed {seed}: the run ended with exit {code}"
                break
            if not out.exists():
                continue  # killed during start-up, before the output was opened
            report = verify(str(inp), out)
            assert report.duplicated.count == 0 and report.corrupt_lines == 0 and report.extra.count == 0, (
                seed, iteration, report.to_json())
            if iteration % 3 == 1 and data.endswith(b"\n") and report.missing.examples:
                # What a crash inside write() leaves: the first bytes of a row's line, no newline.
                rid = report.missing.examples[0]
                torn = f'{{"id":"{rid}","index":{rid[1:]},"status":"ok","text":"Half a li'.encode()
                with out.open("ab") as f:
                    f.write(torn)
                injected.append(torn)
        else:
            pytest.fail(f"seed {seed}: not done after {MAX_ITERATIONS} runs")
    assert kills >= 1, "no kill landed before the run finished"
    final = gptoss("verify", str(inp), str(out), "--json")
    assert final.returncode == 0, final.stdout.decode()
    report_json = orjson.loads(final.stdout)
    assert report_json["ok"] == ROWS and report_json["lines"] == ROWS
    assert report_json["corrupt_lines"] == 0 and report_json["torn_tail_bytes"] == 0
    aside = [p.read_bytes() for p in tmp_path.glob("out.jsonl.partial-*")]
    assert all(torn in aside for torn in injected), f"seed {seed}: a torn line was not preserved"
    assert summary_of(out)["overall"]["rows"]["ok"] == ROWS


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_drains_in_flight_rows_writes_the_summary_and_exits(signum: int, code: int,
                                                                    tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"question {i}"} for i in range(200)))
    out = tmp_path / "out.jsonl"
    with start_sim("--ttft-s", "0.3") as sim:
        proc = subprocess.Popen(cli(*run_args(sim.base_url, inp, out, "-n", "8")), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_for("16 result lines", lambda: lines_in(out) >= 16)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == code, err.decode()
        stats = sim.stats()
    name = signal.Signals(signum).name
    written = read_jsonl(out)
    # Every request the server took was completed (none cut off) and every completion has its line.
    assert stats["in_flight"] == 0 and stats["by_status"] == {"200": len(written)}
    assert stats["requests_total"] == len(written) < 200
    summary = summary_of(out)
    assert summary["stop_reason"] == f"interrupted by {name}" and summary["rows"]["done"] == len(written)
    assert f"{name}: no new rows; finishing" in err.decode()

    with start_sim("--ttft-s", "0.001") as fast:
        assert gptoss(*run_args(fast.base_url, inp, out, "-n", "32")).returncode == 0
    assert gptoss("verify", str(inp), str(out)).returncode == 0
    assert summary_of(out)["overall"]["runs_total"] == 2


def test_a_second_ctrl_c_stops_at_once_and_leaves_a_consistent_file(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"question {i}"} for i in range(24)))
    out = tmp_path / "out.jsonl"
    with start_sim("--ttft-s", "3") as slow:
        proc = subprocess.Popen(cli(*run_args(slow.base_url, inp, out, "-n", "8")), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_for("the first 8 rows", lambda: lines_in(out) >= 8)
        wait_for("8 more in flight", lambda: slow.stats()["in_flight"] == 8)
        proc.send_signal(signal.SIGINT)
        # The second Ctrl-C once the first has been taken (two sent at once could arrive as one).
        before = b"".join(wait_for_line(proc, b"SIGINT: no new rows", WAIT_S))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=WAIT_S)
        err = before + rest
        took_s = time.monotonic() - t0
        assert proc.returncode == 130, err.decode()
        assert took_s < 2.5, f"took {took_s:.1f}s: the second Ctrl-C waited for the drain"
        wait_for("the server to see the cut requests", lambda: slow.stats()["in_flight"] == 0)
        assert slow.stats()["by_status"] == {"200": 8, "499": 8}
    data = out.read_bytes()
    assert data.endswith(b"\n") and len(read_jsonl(out)) == 8  # the cut rows have no line, not half a line
    assert summary_of(out)["stop_reason"] == "interrupted by SIGINT"
    assert b"SIGINT again: stopping now" in err
    with start_sim("--ttft-s", "0.001") as fast:
        assert gptoss(*run_args(fast.base_url, inp, out)).returncode == 0
    assert gptoss("verify", str(inp), str(out)).returncode == 0


FSIZE_LIMIT_BYTES = 40_000


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT_BYTES, FSIZE_LIMIT_BYTES))


def test_a_full_disk_stops_the_run_cleanly_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    """A file-size limit stands in for a full disk: write() fails with EFBIG (the CLI ignores SIGXFSZ)."""
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"question {i}"} for i in range(400)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc write may hit the limit first
    with start_sim("--ttft-s", "0.002") as sim:
        proc = subprocess.run(cli(*run_args(sim.base_url, inp, out, "-n", "4")), capture_output=True, env=env,
                              preexec_fn=_limit_file_size, timeout=WAIT_S, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 74, err
        assert "write failed" in err and "rerun the same command to resume" in err
        data = out.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        torn = data[len(complete):]
        written = complete.count(b"\n")
        assert 0 < written < 400 and len(data) <= FSIZE_LIMIT_BYTES
        # No request was started after the failed write: only those already in flight (at most 4).
        sent = sim.stats()["requests_total"]
        assert sent <= written + 4, (sent, written)
        assert summary_of(out)["stop_reason"].startswith("output error")

        again = subprocess.run(cli(*run_args(sim.base_url, inp, out, "-n", "4")), capture_output=True,
                               timeout=WAIT_S, check=False)
        assert again.returncode == 0, again.stderr.decode()
        assert sim.stats()["requests_total"] == sent + 400 - written
    assert out.read_bytes().startswith(complete)
    aside = list(tmp_path.glob("out.jsonl.partial-*"))
    if torn:
        assert [p.read_bytes() for p in aside] == [torn] and b"torn last line" in again.stderr
    else:  # the limit fell exactly on a line boundary
        assert aside == []
    assert gptoss("verify", str(inp), str(out)).returncode == 0
