"""gptoss-batch against Hugging Face ``transformers serve --continuous-batching`` serving a tiny random model.

Its OpenAI dialect differs from vLLM's and llama.cpp's: no ``data: [DONE]`` at the end of a stream, usage on
the chunk that carries finish_reason (``stream_options`` is ignored), FastAPI's ``{"detail": ...}`` error
bodies, 422 for unknown fields, no /metrics, and a server pinned to one model name. The random model's text is
noise, so every check is on structure and counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.real_servers import ROOT, TINY_MAX_POSITIONS, ServerHandle
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

MAX_TOKENS = 8


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_rows_come_back_ok_with_usage_on_both_routes_plain_and_streamed(
        hf: ServerHandle, tmp_path: Path, route: str, stream: bool) -> None:
    """The stream has no [DONE]: it ends after the chunk with finish_reason and usage, and that is complete."""
    rows = prompts(12, chat=route == "chat")
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run(hf, inp, out, "--route", route, "--max-tokens", str(MAX_TOKENS), "-n", "4",
               "--stream" if stream else "--no-stream")
    assert_clean_run(proc, out, [r["id"] for r in rows], max_tokens=MAX_TOKENS, model=hf.model, stream=stream)


def test_the_transformers_serve_preset_works_as_it_is_given_the_servers_address(
        hf: ServerHandle, tmp_path: Path) -> None:
    """The preset sends no model name: the pinned server answers with its own."""
    rows = prompts(8, chat=True)
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--config", str(ROOT / "configs" / "transformers-serve.toml"),
                  "--base-url", hf.base_url, "--progress", "none", timeout=CLI_TIMEOUT_S)
    assert_clean_run(proc, out, [r["id"] for r in rows], max_tokens=128, model=hf.model, stream=False)


def test_a_run_killed_mid_way_resumes_to_exactly_one_ok_line_per_row(hf: ServerHandle, tmp_path: Path) -> None:
    assert_a_killed_run_resumes(hf, tmp_path, 300, 20,
                                "--route", "completions", "--max-tokens", "16", "-n", "2", "--fsync", "always")


def test_an_unknown_parameter_is_a_clear_error_line_not_retried(hf: ServerHandle, tmp_path: Path) -> None:
    inp = write_prompts(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    out = tmp_path / "out.jsonl"
    proc = run(hf, inp, out, "--route", "completions", "--max-tokens", "4", "--param", "no_such_parameter=1")
    assert proc.returncode == 1
    err = error_line(out, "a")
    assert err["status"] == 422 and err["attempts"] == 1
    assert "no_such_parameter" in err["message"]  # from FastAPI's {"detail": ...}


def test_another_model_name_is_a_clear_error_line_naming_the_pinned_model(hf: ServerHandle, tmp_path: Path) -> None:
    inp = write_prompts(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello", "model": "gpt-oss-20b"}])
    out = tmp_path / "out.jsonl"
    proc = run(hf, inp, out, "--route", "completions", "--max-tokens", "4")
    assert proc.returncode == 1
    err = error_line(out, "a")
    assert err["status"] == 400 and err["attempts"] == 1
    assert hf.model in err["message"] and "gpt-oss-20b" in err["message"]


def test_a_prompt_longer_than_the_models_positions_is_answered_not_refused(hf: ServerHandle, tmp_path: Path) -> None:
    """transformers serve checks no context length (unlike llama-server): the row is one ok line, the server
    counting every prompt token. Nothing for the client to catch; docs/servers.md says so."""
    inp = write_prompts(tmp_path / "in.jsonl", [{"id": "long", "prompt": "fox " * (4 * TINY_MAX_POSITIONS)}])
    out = tmp_path / "out.jsonl"
    proc = run(hf, inp, out, "--route", "completions", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr.decode()
    [line] = results(out)
    assert line["status"] == "ok" and line["attempts"] == 1
    assert line["usage"]["prompt_tokens"] > TINY_MAX_POSITIONS


def test_concurrency_auto_runs_without_metrics_on_latency_alone(hf: ServerHandle, tmp_path: Path) -> None:
    """No /metrics (404): --concurrency auto says so in the summary and tunes from latency alone."""
    rows = prompts(120)
    inp, out = write_prompts(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    proc = run(hf, inp, out, "--route", "completions", "--max-tokens", "8", "--concurrency", "auto",
               "--max-concurrency", "32")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    s = summary_of(out)
    assert s["rows"]["ok"] == len(rows)
    assert s["adaptive"]["server_metrics"] == f"not used: {hf.root_url}/metrics: HTTP 404"
