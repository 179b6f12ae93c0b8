"""Each timeout fires where it should, with a message that says which limit and which flag.

--connect-timeout: no connection. --read-timeout: no byte for that long (aiohttp's sock_read, measured from
the request being sent and reset by every read: it catches a stalled stream, and for a non-streamed request
it bounds the silent wait for the whole answer, so by default it equals the request timeout).
--request-timeout: the whole attempt, even while bytes keep coming. --deadline: the whole run.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gptoss_batch.sim.testing import start_sim
from tests.cli_helpers import gptoss, read_jsonl, write_jsonl


def one_row(tmp_path: Path, base_url: str, *flags: str) -> tuple[int, dict[str, Any]]:
    """Run one row with one attempt; the exit code and its result line."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "tell me a story"}])
    out = tmp_path / "out.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--base-url", base_url, "--model", "m", "--max-attempts", "1",
                  "--progress", "none", *flags)
    (line,) = read_jsonl(out)
    return proc.returncode, line


def assert_timeout(line: dict[str, Any], words: list[str], after_s: float) -> None:
    assert line["status"] == "error" and line["error"]["kind"] == "timeout", line
    message = line["error"]["message"]
    for w in words:
        assert w in message, message
    # On time (the event loop may fire a timer a clock tick early), not at some other limit.
    assert after_s - 0.01 <= line["latency_s"] < after_s + 1.0


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port whose listen queue is full, so a connect hangs (SYNs are dropped) until it times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)  # let the handshakes that fit complete
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


def test_connect_timeout_fires_when_no_connection_is_made(tmp_path: Path, unaccepting_port: int) -> None:
    code, line = one_row(tmp_path, f"http://127.0.0.1:{unaccepting_port}/v1", "--connect-timeout", "0.5")
    assert code == 1
    assert_timeout(line, ["connect timeout", "0.5s", "--connect-timeout", str(unaccepting_port)], 0.5)


def test_read_timeout_fires_when_the_server_goes_silent(tmp_path: Path) -> None:
    with start_sim("--stall-rate", "1") as sim:
        code, line = one_row(tmp_path, sim.base_url, "--read-timeout", "0.5", "--request-timeout", "30")
    assert code == 1
    assert_timeout(line, ["read timeout", "no data", "0.5s", "--read-timeout"], 0.5)


def test_read_timeout_catches_a_stream_that_stalls_midway(tmp_path: Path) -> None:
    """The first tokens come at once, then the next one would take 3 s: idle time, not total, fires."""
    with start_sim("--ttft-s", "0.05", "--itl-s", "3", "--min-tokens", "4") as sim:
        code, line = one_row(tmp_path, sim.base_url, "--stream", "--read-timeout", "0.5", "--max-tokens", "4")
    assert code == 1
    assert_timeout(line, ["read timeout", "0.5s", "--read-timeout"], 0.5)


def test_request_timeout_fires_even_while_bytes_keep_coming(tmp_path: Path) -> None:
    """A token every 0.1 s never trips the 0.5 s read timeout; the 1 s limit on the whole attempt does."""
    with start_sim("--ttft-s", "0.05", "--itl-s", "0.1", "--min-tokens", "40") as sim:
        code, line = one_row(tmp_path, sim.base_url, "--stream", "--read-timeout", "0.5", "--request-timeout", "1",
                             "--max-tokens", "40")
    assert code == 1
    assert_timeout(line, ["request timeout", "1s", "--request-timeout"], 1.0)


def test_request_timeout_bounds_a_slow_first_byte(tmp_path: Path) -> None:
    with start_sim("--slow-first-byte-s", "5") as sim:
        code, line = one_row(tmp_path, sim.base_url, "--read-timeout", "10", "--request-timeout", "0.7")
    assert code == 1
    assert_timeout(line, ["request timeout", "0.7s"], 0.7)


def test_a_long_silent_non_streamed_answer_is_not_a_read_timeout_by_default(tmp_path: Path) -> None:
    """Non-streamed, nothing arrives until the whole generation is done: the default read timeout is the
    request timeout, not a shorter idle limit that would cut every long generation."""
    with start_sim("--slow-first-byte-s", "0.8") as sim:
        code, line = one_row(tmp_path, sim.base_url, "--request-timeout", "5")
    assert code == 0 and line["status"] == "ok" and line["latency_s"] >= 0.8


def test_deadline_ends_the_run_and_leaves_it_resumable(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(60)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", "m", "--concurrency", "4", "--progress", "none"]
    with start_sim("--ttft-s", "0.2", "--itl-s", "0") as sim:  # 60 rows at 4 x 5/s: 3 s
        t0 = time.monotonic()
        stopped = gptoss(*args, "--base-url", sim.base_url, "--deadline", "1")
        wall_s = time.monotonic() - t0
        assert stopped.returncode == 1
        assert b"deadline of 1s reached" in stopped.stderr
        assert wall_s < 1 + 3  # + interpreter start-up
        first = read_jsonl(out)
        assert 0 < len(first) < 60 and all(r["status"] == "ok" for r in first)
        resumed = gptoss(*args, "--base-url", sim.base_url)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    lines = read_jsonl(out)
    assert len(lines) == 60 and sorted(r["id"] for r in lines) == sorted(r["id"] for r in rows)
