"""gptoss-batch against llama.cpp's llama-server serving Gemma 3 270M (--parallel 4, 2048 tokens a slot).

Generated text is random, so the checks are on structure and counts; text is compared only at temperature 0
with one request in flight, where llama-server is deterministic (with several in flight the batch it lands in
changes the numbers, and at temperature 0 the text with them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from scripts.real_servers import LLAMA_PARALLEL, ROOT, ServerHandle
from tests.cli_helpers import gptoss, summary_of
from tests.e2e.runs import (
    CLI_TIMEOUT_S,
    assert_a_killed_run_resumes,
    assert_clean_run,
    error_line,
    prompts,
    results,
    run,
    write_prompts,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_rows_come_back_ok_with_usage_on_both_routes_plain_and_streamed(
        llama: ServerHandle, tmp_path: Path, route: str, stream: bool) -> None:
    rows = prompts(6, chat=route == "chat")
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run(llama, inp, out, "--route", route, "--max-tokens", str(MAX_TOKENS), "-n", str(LLAMA_PARALLEL),
               "--stream" if stream else "--no-stream")
    assert_clean_run(proc, out, [r["id"] for r in rows], max_tokens=MAX_TOKENS, model=llama.model, stream=stream)


def test_at_temperature_zero_with_one_slot_the_text_is_the_same_plain_streamed_and_rerun(
        llama: ServerHandle, tmp_path: Path) -> None:
    inp = write_prompts(tmp_path / "in.jsonl", [{"id": "paris", "prompt": "The capital of France is"}])
    texts = []
    for i, mode in enumerate(["--no-stream", "--stream", "--no-stream"]):
        out = tmp_path / f"out{i}.jsonl"
        proc = run(llama, inp, out, "--route", "completions", "--temperature", "0", "--max-tokens", "10", "-n", "1",
                   mode)
        assert proc.returncode == 0, proc.stderr.decode()
        [line] = results(out)
        texts.append(line["text"])
    assert texts[0] and texts[0] == texts[1] == texts[2]


def test_a_run_killed_mid_way_resumes_to_exactly_one_ok_line_per_row(llama: ServerHandle, tmp_path: Path) -> None:
    assert_a_killed_run_resumes(llama, tmp_path, 12, 3,
                                "--route", "completions", "--max-tokens", "16", "-n", "2", "--stream",
                                "--fsync", "always")


def test_a_prompt_longer_than_the_slot_context_is_one_clear_error_line_not_retried(
        llama: ServerHandle, tmp_path: Path) -> None:
    rows = [{"id": "short", "prompt": "Hello"}, {"id": "long", "prompt": "word " * 3000}]
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run(llama, inp, out, "--route", "completions", "--max-tokens", "4")
    assert proc.returncode == 1
    err = error_line(out, "long")
    assert err["kind"] == "http" and err["status"] == 400 and err["attempts"] == 1
    assert "exceeds the available context size" in err["message"]
    assert [r["status"] for r in results(out) if r["id"] == "short"] == ["ok"]
    assert summary_of(out)["rows"]["failed"] == 1


def test_an_unknown_parameter_is_ignored_and_a_mistyped_one_is_a_clear_error_line(
        llama: ServerHandle, tmp_path: Path) -> None:
    """llama-server ignores body fields it does not know (so a typo passes silently) and validates the types of
    those it knows, answering 400 with the field's name."""
    inp = write_prompts(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    unknown = run(llama, inp, tmp_path / "unknown.jsonl", "--route", "completions", "--max-tokens", "4",
                  "--param", "no_such_parameter=1")
    assert unknown.returncode == 0, unknown.stderr.decode()

    mistyped = run(llama, inp, tmp_path / "mistyped.jsonl", "--route", "completions", "--max-tokens", "4",
                   "--param", "seed=not-a-number")
    assert mistyped.returncode == 1
    err = error_line(tmp_path / "mistyped.jsonl", "a")
    assert err["status"] == 400 and err["attempts"] == 1
    assert "seed" in err["message"] and "must be number" in err["message"]


def test_the_llama_server_preset_works_as_it_is_given_the_servers_address(llama: ServerHandle, tmp_path: Path) -> None:
    rows = prompts(4, chat=True)
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--config", str(ROOT / "configs" / "llama-server.toml"),
                  "--base-url", llama.base_url, "--progress", "none", timeout=CLI_TIMEOUT_S)
    assert_clean_run(proc, out, [r["id"] for r in rows], max_tokens=128, model=llama.model, stream=False)


def _gauge_names(body: bytes) -> set[str]:
    return {line.split()[0] for line in body.decode().splitlines() if line and not line.startswith("#")}


def test_metrics_has_the_gauges_concurrency_auto_and_sweep_read(llama: ServerHandle) -> None:
    status, body = llama.get("/metrics")
    assert status == 200
    assert {"llamacpp:requests_processing", "llamacpp:requests_deferred"} <= _gauge_names(body)


def test_sweep_shows_the_server_running_at_most_its_four_slots_and_queueing_the_rest(
        llama: ServerHandle, tmp_path: Path) -> None:
    inp = write_prompts(tmp_path / "in.jsonl", prompts(16))
    report = tmp_path / "sweep"
    proc = gptoss("sweep", str(inp), "--base-url", llama.base_url, "--model", llama.model, "--route", "completions",
                  "--max-tokens", "16", "--param", "ignore_eos=true", "--levels", "2,4,8", "--requests-per-level",
                  "8", "--warmup", "0", "--report-dir", str(report), "--progress", "none", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    doc: dict[str, Any] = orjson.loads((report / "sweep.json").read_bytes())
    levels = {int(r["level"]): r for r in doc["levels"]}
    assert sorted(levels) == [2, 4, 8]
    for rec in levels.values():
        assert rec["summary"]["rows"]["ok"] == rec["summary"]["rows"]["done"] >= 8
    # Past --parallel 4 the extra requests wait in llama-server's queue instead of running: throughput cannot
    # grow with them. The gauges say so directly, whatever the noise on the machine does to timings.
    eight = levels[8]["server"]
    assert eight is not None, "the sweep should have read llama-server's /metrics"
    assert eight["requests_running_mean"] <= LLAMA_PARALLEL + 0.01
    assert eight["requests_waiting_mean"] > 0
    assert doc["recommendation"] is not None


def test_concurrency_auto_settles_within_one_doubling_of_the_four_slots(llama: ServerHandle, tmp_path: Path) -> None:
    rows = prompts(48)
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run(llama, inp, out, "--route", "completions", "--max-tokens", "16", "--param", "ignore_eos=true",
               "--concurrency", "auto", "--max-concurrency", "64", timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    s = summary_of(out)
    assert s["rows"]["ok"] == len(rows)
    adaptive = s["adaptive"]
    assert LLAMA_PARALLEL / 2 <= adaptive["final_limit"] <= LLAMA_PARALLEL * 2, adaptive
    assert adaptive["server_metrics"] == f"reading {llama.root_url}/metrics", adaptive
