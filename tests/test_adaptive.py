"""``--concurrency auto`` end to end: the real CLI against serve-sim (knees, a capacity halving, 429s, a crash
budget), and the driver's handling of /metrics pages it cannot use."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from gptoss_batch.adaptive import AdaptiveDriver
from gptoss_batch.config import build_config
from gptoss_batch.errors import ConnectError
from gptoss_batch.runner import Runner
from gptoss_batch.sim.testing import start_sim
from tests.cli_helpers import gptoss, read_jsonl, write_jsonl
from tests.fakes import FakeTransport, MemorySink

RUN_TIMEOUT_S = 120


def prompts(path: Path, n: int, max_tokens: int = 48) -> Path:
    return write_jsonl(path, ({"id": f"r{i}", "prompt": f"Say something about {i}.", "max_tokens": max_tokens}
                              for i in range(n)))


def auto_run(tmp_path: Path, base_url: str, n: int, *extra: str) -> tuple[Any, list[dict[str, Any]],
                                                                          list[dict[str, Any]]]:
    """Run n rows with --concurrency auto; returns (process, result lines, controller log)."""
    out, log = tmp_path / "out.jsonl", tmp_path / "controller.jsonl"
    proc = gptoss("run", str(prompts(tmp_path / "in.jsonl", n)), "-o", str(out), "--base-url", base_url,
                  "--concurrency", "auto", "--log-controller", str(log), "--progress", "plain", *extra,
                  timeout=RUN_TIMEOUT_S)
    return proc, read_jsonl(out), read_jsonl(log)


def limit_at(log: list[dict[str, Any]], t_s: float) -> int:
    limit = log[0]["limit"]
    for entry in log:
        if entry["t_s"] > t_s:
            break
        if "limit" in entry:
            limit = entry["limit"]
    return int(limit)


def test_auto_grows_to_the_knee_and_records_the_limit_everywhere(tmp_path: Path) -> None:
    with start_sim("--max-num-seqs", "16", "--decode-base-s", "0.004", "--decode-slope", "0.016") as sim:
        proc, results, log = auto_run(tmp_path, sim.base_url, 400)
        stats = sim.stats()
    assert proc.returncode == 0, proc.stderr.decode()
    assert all(r["status"] == "ok" for r in results) and len(results) == 400
    assert all(isinstance(r["concurrency"], int) for r in results)
    events = [e["event"] for e in log]
    assert events[0] == "start" and events[-1] == "end" and "grow" in events
    assert any(e["event"] == "metrics" and e["status"].startswith("reading") for e in log)
    assert 12 <= limit_at(log, log[-1]["t_s"]) <= 20
    # With /metrics, slow start stops within a quarter past the knee (a ramp waits for each clean poll).
    assert max(e["limit"] for e in log if e.get("phase") == "startup") <= 16 * 1.25 + 1
    assert stats["max_in_flight"] <= 16 * 1.5
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["adaptive"]["final_limit"] == log[-1]["limit"]
    assert summary["config"]["auto_concurrency"] is True
    stderr = proc.stderr.decode()
    assert "limit=" in stderr and "(" in stderr.split("limit=")[-1]  # the limit and why it last changed


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics", "latency-only"])
def test_the_limit_follows_a_capacity_halving_within_ten_seconds(tmp_path: Path, metrics: bool) -> None:
    change_s = 6.0
    args = ["--max-num-seqs", "16", "--decode-base-s", "0.006", "--decode-slope", "0.016",
            "--capacity-change-after-s", str(change_s), "--capacity-change-slots", "8"]
    with start_sim(*args, *([] if metrics else ["--no-metrics"])) as sim:
        sim_started = time.time()
        proc, results, log = auto_run(tmp_path, sim.base_url, 550)
    assert proc.returncode == 0, proc.stderr.decode()
    assert all(r["status"] == "ok" for r in results) and len(results) == 550  # no request fails
    change_at = sim_started + change_s - log[0]["unix_time"]  # on the log's clock
    end = log[-1]["t_s"]
    assert end >= change_at + 3, "the run ended too soon to judge"
    assert limit_at(log, change_at - 0.1) >= 12
    followed = [e["t_s"] for e in log if "limit" in e and change_at <= e["t_s"] and e["limit"] <= 8 * 1.25]
    assert followed and followed[0] - change_at <= 10
    assert limit_at(log, end) <= 8 * 1.25


def test_429s_drop_the_limit_at_once(tmp_path: Path) -> None:
    """serve-sim answers 429 while 4 or more requests wait: the first one cuts the limit, at once."""
    request_log = tmp_path / "requests.jsonl"
    with start_sim("--max-num-seqs", "16", "--decode-base-s", "0.004", "--decode-slope", "0.016",
                   "--overload-queue-limit", "4", "--overload-status", "429", "--retry-after-s", "0.2",
                   "--request-log", str(request_log), "--no-metrics") as sim:
        proc, results, log = auto_run(tmp_path, sim.base_url, 400)
    assert proc.returncode == 0, proc.stderr.decode()
    assert all(r["status"] == "ok" for r in results)
    first_429 = min(e["t_done"] for e in read_jsonl(request_log) if e["status"] == 429) - log[0]["unix_time"]
    cut = next(e for e in log if e["event"] == "congestion")
    assert "HTTP 429" in cut["reason"] and cut["limit"] <= cut["previous"] // 2
    assert cut["t_s"] - first_429 < 0.5  # the answer's trip back and this machine's load, nothing more


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_never_trips_a_crash_budget_of_twice_the_knee(tmp_path: Path, seed: int) -> None:
    """Without /metrics (the harder case: only latency warns of the knee), over 3 seeded runs."""
    with start_sim("--max-num-seqs", "8", "--decode-base-s", "0.003", "--decode-slope", "0.03",
                   "--crash-above-running", "16", "--seed", str(seed), "--no-metrics") as sim:
        proc, results, _log = auto_run(tmp_path, sim.base_url, 250, "--max-concurrency", "256")
        stats = sim.stats()
    assert not stats["crashed"]
    assert proc.returncode == 0, proc.stderr.decode()
    assert all(r["status"] == "ok" for r in results)


# -- the driver's /metrics handling (fake pool, no network) ---------------------------------------------

class FakePool:
    def __init__(self, answers: list[tuple[int, str] | Exception]) -> None:
        self.answers = answers
        self.urls: list[str] = []
        self.sizes: list[int] = []

    async def get_text(self, url: str, timeout_s: float = 5.0) -> tuple[int, str]:
        self.urls.append(url)
        if not self.answers:  # a driver that kept polling would spin here (its sleep is instant): fail instead
            raise AssertionError("polled past the scripted answers")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def resize(self, limit: int) -> None:
        self.sizes.append(limit)


async def _no_sleep(_seconds: float) -> None:
    return None


def driver_with(pool: FakePool, **flags: Any) -> AdaptiveDriver:
    cfg = build_config({"concurrency": "auto", "base_url": "http://127.0.0.1:9/v1", **flags}, environ={})
    runner = Runner(cfg, FakeTransport(), MemorySink())
    driver = AdaptiveDriver(cfg, runner, pool, sleep=_no_sleep)
    driver.attach()
    return driver


@pytest.mark.parametrize("answer", [
    (404, "Not Found"),
    (200, "<html>a dashboard, not Prometheus</html>"),
    (200, "# HELP other_metric Something else.\nother_metric 1.0\n"),
    ConnectError("cannot connect"),
], ids=["404", "garbage", "other-gauges", "unreachable"])
@pytest.mark.anyio
async def test_a_metrics_page_without_known_gauges_is_read_once_and_dropped(answer: Any) -> None:
    pool = FakePool([answer])
    driver = driver_with(pool)
    assert pool.urls == []
    await driver._poll(pool)  # returns: polling ends after the first useless answer
    assert pool.urls == ["http://127.0.0.1:9/metrics"]
    assert driver.metrics_status.startswith("not used")
    assert driver.summary()["server_metrics"].startswith("not used")


@pytest.mark.anyio
async def test_the_first_limit_is_applied_to_the_runner_and_the_pool() -> None:
    pool = FakePool([(404, "")])
    driver = driver_with(pool, min_concurrency=2, max_concurrency=64)
    assert driver.runner.limiter.total_tokens == 4
    assert driver.runner.state.limit_reason.startswith("auto: slow start")
    assert pool.sizes == [5]  # one connection to spare for /metrics


@pytest.mark.anyio
async def test_metrics_url_defaults_to_the_server_root() -> None:
    assert driver_with(FakePool([(404, "")])).metrics_url == "http://127.0.0.1:9/metrics"
    custom = driver_with(FakePool([(404, "")]), metrics_url="http://127.0.0.1:9/custom")
    assert custom.metrics_url == "http://127.0.0.1:9/custom"
