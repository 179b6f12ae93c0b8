"""Faults end to end: the real CLI against serve-sim (or against nothing at all) on loopback.

The run must finish the job through 429s, 5xx, resets, stalls and broken bodies; honour the server's
Retry-After for every worker; not hammer a server that is down; and end, resumably, when it stays down.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from gptoss_batch.config import RetryPolicy
from gptoss_batch.limits import BREAKER_OPEN_AFTER_FAILURES
from gptoss_batch.sim.testing import LISTENING_PREFIX, SimHandle, start_sim
from tests.cli_helpers import gptoss, read_jsonl, summary_of, write_jsonl
from tests.test_limits import probe_bound

# Requests that take a few ms, without the engine model's queueing (faults are what these tests are about).
QUICK = ("--ttft-s", "0.005", "--itl-s", "0.0005")
# A request the client sent before it read a 429 may still reach the server's log after the 429 was
# answered: the server gets to the requests in flight one by one (a few ms each in a burst of 32; 50 ms at
# worst when this was measured on two busy cores).
IN_FLIGHT_LAG_S = 0.1


def run_args(base_url: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--base-url", base_url, "--model", "gpt-oss-20b",
            "--max-tokens", "8", "--progress", "plain", *extra]


def prompts(path: Path, n: int) -> Path:
    return write_jsonl(path, ({"id": f"r{i}", "prompt": f"question {i}"} for i in range(n)))


def latest_by_id(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_jsonl(out)}


def cooldown_violations(log: list[dict[str, Any]], concurrency: int) -> list[str]:
    """Requests the client sent during a pause it had been asked for, as far as the server can tell.

    Each 429 that carried Retry-After (the sim logs it as ``retry_after_s``) was answered at ``t_done``; the
    client read it later still, and from then on may send nothing for ``retry_after_s``. So a request that
    arrived in ``(t_done, t_done + retry_after_s)`` was sent during the pause, unless the client had sent it
    before it read the 429. Those can arrive after ``t_done`` too, and the server bounds them two ways:
    fewer than ``concurrency`` of them (the requests that were in flight), and arriving within
    IN_FLIGHT_LAG_S, unless the server itself was frozen (two busy cores: it happens). The log shows a
    freeze: requests that were already in the server when it answered the 429, and need only a few ms,
    finished late. An arrival logged no later than those is the server catching up, not a late send.

    Exactly when the client sends is the unit tests' business (tests/test_limits.py, on virtual time);
    this checks that the real thing, over the wire, behaves the same.
    """
    arrivals = sorted(e["t_arrival"] for e in log)
    quick = [e for e in log if e["fault"] != "stall" and e["status"] is not None and e["status"] != 499]
    problems = []
    for e in log:
        hint = e.get("retry_after_s")
        if e["status"] != 429 or not hint:
            continue
        t = e["t_done"]
        lo = bisect.bisect_right(arrivals, t)
        lag_end = bisect.bisect_right(arrivals, t + IN_FLIGHT_LAG_S)
        hi = bisect.bisect_left(arrivals, t + hint)
        if lag_end - lo > concurrency - 1:
            problems.append(f"429 at {t:.3f}: {lag_end - lo} requests in the {IN_FLIGHT_LAG_S} s after it, "
                            "more than could have been in flight")
        if lag_end == hi:
            continue
        backlog_until = max((q["t_done"] for q in quick if q["t_arrival"] <= t + IN_FLIGHT_LAG_S <= q["t_done"]),
                            default=0.0)
        late = [round(a - t, 3) for a in arrivals[lag_end:hi] if a > backlog_until]
        if late:
            problems.append(f"429 at {t:.3f} (Retry-After {hint}): requests {late} s after it")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def sim_on_port(port: int, *flags: str, timeout_s: float = 10.0) -> Iterator[SimHandle]:
    """serve-sim on a chosen port (start_sim picks its own), so a rerun can use the same --base-url."""
    cmd = [sys.executable, "-m", "gptoss_batch.sim", *flags, "--port", str(port)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else b""
            assert line.startswith(LISTENING_PREFIX), f"serve-sim did not start on port {port}: {line!r}"
            yield SimHandle(proc, port)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the fault matrix ------------------------------------------------------------------------------


def test_fault_matrix_every_row_ends_ok_once_within_the_deadline_and_pauses_are_honoured(tmp_path: Path) -> None:
    """1,000 rows at concurrency 32; about 40% of attempts fail: 20% 429 (half with Retry-After),
    10% 5xx, 5% resets, 5% stalls, 2% malformed bodies."""
    log_path = tmp_path / "requests.log"
    faults = ("--fail-429-rate", "0.2", "--retry-after-share", "0.5", "--retry-after-s", "0.2",
              "--fail-500-rate", "0.05", "--fail-503-rate", "0.05", "--reset-rate", "0.05",
              "--stall-rate", "0.05", "--malformed-rate", "0.02")
    inp, out = prompts(tmp_path / "in.jsonl", 1000), tmp_path / "out.jsonl"
    deadline_s = 60
    with start_sim(*QUICK, *faults, "--request-log", str(log_path)) as sim:
        t0 = time.monotonic()
        proc = gptoss(*run_args(sim.base_url, inp, out, "--concurrency", "32", "--max-attempts", "15",
                                "--backoff-initial", "0.05", "--backoff-max", "0.5", "--read-timeout", "0.5",
                                "--request-timeout", "2", "--deadline", str(deadline_s)), timeout=deadline_s + 30)
        wall_s = time.monotonic() - t0
        stats = sim.stats()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert wall_s < deadline_s

    lines = read_jsonl(out)
    assert len(lines) == 1000 and len({r["id"] for r in lines}) == 1000  # no row written twice
    assert all(r["status"] == "ok" for r in lines)

    # Every failed attempt is in its row's attempt log, and the server agrees on what it did.
    logged = Counter((a["kind"], a.get("status")) for r in lines for a in r.get("attempt_log", []))
    by_fault = stats["by_fault"]
    assert logged[("http", 429)] == by_fault["http_429"] > 0
    assert logged[("http", 500)] == by_fault["http_500"] > 0
    assert logged[("http", 503)] == by_fault["http_503"] > 0
    assert logged[("connect", None)] == by_fault["reset"] > 0
    assert logged[("timeout", None)] == by_fault["stall"] > 0
    assert logged[("protocol", None)] == by_fault["malformed"] > 0
    failed_share = sum(logged.values()) / stats["requests_total"]
    assert 0.3 < failed_share < 0.45
    assert sum(r["attempts"] for r in lines) == stats["requests_total"]
    hinted = [a for r in lines for a in r.get("attempt_log", []) if a.get("status") == 429 and a["wait_s"] == 0.2]
    assert len(hinted) == sum(1 for e in read_jsonl(log_path) if e.get("retry_after_s"))
    assert all(a["wait_s"] >= 0 and a["message"] for r in lines for a in r.get("attempt_log", []))

    summary = summary_of(out)
    assert summary["retries_by_cause"] == {
        (f"{kind}:{status}" if status else kind): n for (kind, status), n in logged.items()}
    assert summary["attempts"] == stats["requests_total"]
    # Read back from the output alone (`summary`, and a resumed run's overall figures), the same causes.
    recomputed = gptoss("summary", str(out), "--json")
    assert recomputed.returncode == 0, recomputed.stderr.decode()
    assert orjson.loads(recomputed.stdout)["retries_by_cause"] == summary["retries_by_cause"]

    assert cooldown_violations(read_jsonl(log_path), concurrency=32) == []


def test_a_429_with_retry_after_pauses_every_worker(tmp_path: Path) -> None:
    log_path = tmp_path / "requests.log"
    inp, out = prompts(tmp_path / "in.jsonl", 40), tmp_path / "out.jsonl"
    with start_sim(*QUICK, "--fail-429-rate", "0.1", "--retry-after-share", "1", "--retry-after-s", "0.5",
                   "--request-log", str(log_path)) as sim:
        proc = gptoss(*run_args(sim.base_url, inp, out, "--concurrency", "8"))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    log = read_jsonl(log_path)
    pauses = [e for e in log if e["status"] == 429]
    assert pauses and all(e["retry_after_s"] == 0.5 for e in pauses)
    assert cooldown_violations(log, concurrency=8) == []
    waits = [a["wait_s"] for r in read_jsonl(out) for a in r.get("attempt_log", [])]
    assert waits and all(w == 0.5 for w in waits)  # the hint, not the backoff


# -- overload --------------------------------------------------------------------------------------


def test_overload_that_fails_30_percent_without_retries_ends_100_percent_ok_by_default(tmp_path: Path) -> None:
    """The tutorial's server at concurrency 12: about 70% success when every refusal is final. 10 sequences
    run, 2 may wait; beyond that it answers 429 with Retry-After at once."""
    inp = prompts(tmp_path / "in.jsonl", 300)
    once, default = tmp_path / "once.jsonl", tmp_path / "default.jsonl"
    with start_sim("--max-num-seqs", "10", "--overload-queue-limit", "2", "--retry-after-s", "0.2",
                   "--decode-base-s", "0.0015") as sim:
        no_retries = gptoss(*run_args(sim.base_url, inp, once, "--concurrency", "12", "--max-attempts", "1",
                                      "--max-tokens", "16"))
        refused_before = sim.stats()["by_fault"].get("overload", 0)
        ours = gptoss(*run_args(sim.base_url, inp, default, "--concurrency", "12", "--max-tokens", "16"))
        refused_during = sim.stats()["by_fault"].get("overload", 0) - refused_before
    assert no_retries.returncode == 1
    ok_share = summary_of(once)["rows"]["ok"] / 300
    assert 0.5 <= ok_share <= 0.9, ok_share
    assert ours.returncode == 0, ours.stderr.decode()[-2000:]
    assert summary_of(default)["rows"] == {"total": 300, "done": 300, "ok": 300, "failed": 0}
    assert refused_during > 0  # the server did refuse us too; the retries and pauses absorbed it


# -- a server that is down -------------------------------------------------------------------------

WINDOW_S = 3.0
DOWN_POLICY = RetryPolicy(backoff_initial_s=0.1, backoff_max_s=0.5, unavailable_after_s=WINDOW_S)
DOWN_FLAGS = ("--concurrency", "32", "--unavailable-after", str(WINDOW_S), "--backoff-initial", "0.1",
              "--backoff-max", "0.5")
# The first wave (one request per worker, sent before any failure came back) plus probes on the backoff:
# a number set by the window and the backoff, not by the 1,000 rows or the 32 workers beyond the first wave.
MAX_ATTEMPTS_WHILE_DOWN = 32 + BREAKER_OPEN_AFTER_FAILURES + probe_bound(DOWN_POLICY, WINDOW_S)


def assert_ended_as_unreachable(proc: subprocess.CompletedProcess[bytes], out: Path, wall_s: float) -> int:
    """Exit 1 within about the window, with a clear message; returns the attempts the run says it sent."""
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert WINDOW_S <= wall_s < WINDOW_S + 5  # + interpreter start-up and a loaded machine
    reason = summary_of(out)["stop_reason"]
    assert re.match(r"server unreachable since \d\d:\d\d:\d\d: no answer for 3s \(\d+ attempts sent\)", reason), reason
    assert b"server unreachable since" in proc.stderr
    m = re.search(r"\((\d+) attempts sent\)", reason)
    assert m is not None
    return int(m.group(1))


def assert_resumes_to_completion(proc: subprocess.CompletedProcess[bytes], out: Path) -> None:
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    latest = latest_by_id(out)
    assert len(latest) == 1000 and all(r["status"] == "ok" for r in latest.values())
    assert sum(r["status"] == "ok" for r in read_jsonl(out)) == 1000  # each row ok exactly once


def test_nothing_listening_ends_the_run_with_bounded_attempts_and_it_resumes(tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    inp, out = prompts(tmp_path / "in.jsonl", 1000), tmp_path / "out.jsonl"
    t0 = time.monotonic()
    proc = gptoss(*run_args(base_url, inp, out, *DOWN_FLAGS))
    sent = assert_ended_as_unreachable(proc, out, time.monotonic() - t0)
    assert sent <= MAX_ATTEMPTS_WHILE_DOWN
    assert b"Connection refused" in proc.stderr
    assert len(read_jsonl(out)) <= sent  # no row was started just to be written as failed
    with sim_on_port(port, *QUICK):
        again = gptoss(*run_args(base_url, inp, out, *DOWN_FLAGS))
    assert_resumes_to_completion(again, out)


def test_a_server_answering_503_to_everything_is_not_hammered_and_the_run_resumes(tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    inp, out = prompts(tmp_path / "in.jsonl", 1000), tmp_path / "out.jsonl"
    with sim_on_port(port, *QUICK, "--fail-503-rate", "1") as sim:
        t0 = time.monotonic()
        proc = gptoss(*run_args(base_url, inp, out, *DOWN_FLAGS))
        wall_s = time.monotonic() - t0
        stats = sim.stats()
    sent = assert_ended_as_unreachable(proc, out, wall_s)
    assert sent == stats["requests_total"] <= MAX_ATTEMPTS_WHILE_DOWN
    with sim_on_port(port, *QUICK):
        again = gptoss(*run_args(base_url, inp, out, *DOWN_FLAGS))
    assert_resumes_to_completion(again, out)

