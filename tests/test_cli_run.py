"""`gptoss-batch run` end to end: the real CLI as a subprocess against serve-sim on a loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gptoss_batch.sim.testing import SimHandle, start_sim
from tests.cli_helpers import gptoss, read_jsonl, write_jsonl

FAST = ("--decode-base-s", "0.0005", "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim(*FAST, "--max-model-len", "2048") as handle:
        yield handle


def run_args(sim: SimHandle, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--base-url", sim.base_url, "--model", "gpt-oss-20b",
            "--max-tokens", "16", "--progress", "plain", *extra]


def test_thousand_rows_at_concurrency_32_end_with_one_ok_line_each(sim: SimHandle, tmp_path: Path) -> None:
    ids = [f"id-{i}" for i in range(1000)]
    inp = write_jsonl(tmp_path / "in.jsonl", ({"id": i, "prompt": f"question {i}"} for i in ids))
    out = tmp_path / "out.jsonl"
    proc = gptoss(*run_args(sim, inp, out, "--concurrency", "32"))
    assert proc.returncode == 0, proc.stderr.decode()
    lines = read_jsonl(out)
    assert len(lines) == 1000
    assert sorted(r["id"] for r in lines) == sorted(ids)
    assert all(r["status"] == "ok" and r["text"] and r["usage"]["completion_tokens"] > 0 for r in lines)
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["rows"] == {"total": 1000, "done": 1000, "ok": 1000, "failed": 0}
    assert summary["latency_s"]["p50"] > 0 and summary["requests_per_s"] > 0
    assert summary["output_tokens"] == sum(r["usage"]["completion_tokens"] for r in lines)
    assert proc.stdout == b""  # results never go to stdout unless -o -


def test_server_sees_at_most_n_requests_in_flight_and_reaches_n(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"q{i}"} for i in range(120)))
    # Slow decoding and many slots: requests overlap for long enough that the bound is what limits them.
    with start_sim("--decode-base-s", "0.004", "--max-num-seqs", "64") as server:
        proc = gptoss(*run_args(server, inp, tmp_path / "out.jsonl", "--concurrency", "12"))
        assert proc.returncode == 0, proc.stderr.decode()
        assert server.stats()["max_in_flight"] == 12


def test_existing_output_is_resumed_not_truncated(sim: SimHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"id": f"r{i}", "prompt": f"q{i}"} for i in range(30)))
    out = tmp_path / "out.jsonl"
    assert gptoss(*run_args(sim, inp, out)).returncode == 0
    before = out.read_bytes()
    proc = gptoss(*run_args(sim, inp, out))
    assert proc.returncode == 0
    assert out.read_bytes() == before  # every row was already ok: nothing re-sent, nothing rewritten
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["skipped"] == 30 and summary["rows"]["done"] == 0


def test_overwrite_moves_the_old_results_aside(sim: SimHandle, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"q{i}"} for i in range(5)))
    out = tmp_path / "out.jsonl"
    assert gptoss(*run_args(sim, inp, out)).returncode == 0
    old = out.read_bytes()
    assert gptoss(*run_args(sim, inp, out, "--overwrite")).returncode == 0
    backups = list(tmp_path.glob("out.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == old
    assert len(read_jsonl(out)) == 5


def test_per_row_overrides_and_routes_reach_the_server(tmp_path: Path) -> None:
    rows = [
        {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        {"id": "completion", "prompt": "Once upon", "route": "completions", "max_tokens": 5},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, log = tmp_path / "out.jsonl", tmp_path / "requests.log"
    # Answers of at least 10 tokens unless max_tokens stops them: a row's own max_tokens shows exactly.
    with start_sim(*FAST, "--min-tokens", "10", "--request-log", str(log)) as server:
        assert gptoss(*run_args(server, inp, out)).returncode == 0
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert by_id["chat"]["usage"]["completion_tokens"] == 3
    assert by_id["completion"]["usage"]["completion_tokens"] == 5
    assert sorted(e["path"] for e in read_jsonl(log)) == ["/v1/chat/completions", "/v1/completions"]


def test_openai_batch_file_rows_pick_their_route(sim: SimHandle, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = gptoss(*run_args(sim, Path("sample_prompts/batch_api.jsonl"), out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(r["id"] for r in read_jsonl(out)) == ["b0", "b1", "b2", "b3"]


def test_csv_template_fills_columns(sim: SimHandle, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = gptoss(*run_args(sim, Path("sample_prompts/products.csv"), out, "--template", "Ad for {name}: {feature}",
                            "--id-column", "sku"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"sku-{i}" for i in range(6)]


def test_stdin_input_and_stdout_output(sim: SimHandle, tmp_path: Path) -> None:
    data = b"".join(orjson.dumps({"id": f"s{i}", "prompt": "x"}) + b"\n" for i in range(7))
    proc = gptoss("run", "-", "-o", "-", "--base-url", sim.base_url, "--progress", "none", input=data)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(orjson.loads(line)["id"] for line in proc.stdout.splitlines()) == [f"s{i}" for i in range(7)]


def test_failed_rows_give_exit_1_with_the_servers_message(sim: SimHandle, tmp_path: Path) -> None:
    rows = [{"id": "ok", "prompt": "x"}, {"id": "too-long", "prompt": "x", "max_tokens": 100000}]
    out = tmp_path / "out.jsonl"
    proc = gptoss(*run_args(sim, write_jsonl(tmp_path / "in.jsonl", rows), out))
    assert proc.returncode == 1
    bad = {r["id"]: r for r in read_jsonl(out)}["too-long"]
    assert bad["status"] == "error" and bad["error"]["status"] == 400 and bad["attempts"] == 1
    assert bad["error"]["message"]


def test_max_error_rate_stops_early_and_leaves_a_resumable_output(sim: SimHandle, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": "x", "max_tokens": 100000} for i in range(300)]
    out = tmp_path / "out.jsonl"
    proc = gptoss(*run_args(sim, write_jsonl(tmp_path / "in.jsonl", rows), out, "--max-error-rate", "0.2",
                            "--concurrency", "2"))
    assert proc.returncode == 1
    assert b"max-error-rate" in proc.stderr
    assert 20 <= len(read_jsonl(out)) < 100


def test_config_file_supplies_defaults_and_flags_win(sim: SimHandle, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'base_url = "{sim.base_url}"\nmodel = "from-config"\nmax_tokens = 4\nconcurrency = 3\n')
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    out = tmp_path / "out.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--config", str(cfg), "--model", "from-flag")
    assert proc.returncode == 0, proc.stderr.decode()
    (r,) = read_jsonl(out)
    assert r["model"] == "from-flag" and r["usage"]["completion_tokens"] <= 4
    summary = orjson.loads((tmp_path / "out.jsonl.summary.json").read_bytes())
    assert summary["config"]["concurrency"] == 3


def test_the_api_key_never_appears_in_any_output(sim: SimHandle, tmp_path: Path) -> None:
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x", "max_tokens": 100000}]
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": secret}
    proc = gptoss(*run_args(sim, write_jsonl(tmp_path / "in.jsonl", rows), out), env=env)
    assert proc.returncode == 1
    bad_cfg = gptoss("run", str(tmp_path / "in.jsonl"), "-o", str(out), "--api-key", secret, "--concurrency", "0")
    assert bad_cfg.returncode == 2
    for blob in [proc.stdout, proc.stderr, bad_cfg.stderr, bad_cfg.stdout,
                 *(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())]:
        assert secret.encode() not in blob


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for args in (["--concurrency", "0"], ["--base-url", "ftp://x"], ["--temperature", "-1"],
                 ["--input-format", "xml"], ["--config", str(tmp_path / "missing.toml")]):
        proc = gptoss("run", str(inp), "-o", str(tmp_path / "o.jsonl"), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"error" in proc.stderr.lower()


def test_python_dash_m_runs_the_cli_and_help_documents_exit_codes() -> None:
    proc = gptoss("run", "--help")
    assert proc.returncode == 0 and b"--concurrency" in proc.stdout
    assert b"Exit codes" in proc.stdout and b"[env:" in proc.stdout  # not eaten as rich markup


def test_error_messages_with_brackets_are_printed_as_they_are(tmp_path: Path) -> None:
    """A path like 'x[/y]' in a message once crashed rich's markup parser with a traceback."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    missing = tmp_path / "conf[/y].toml"
    proc = gptoss("run", str(inp), "-o", str(tmp_path / "o.jsonl"), "--config", str(missing))
    assert proc.returncode == 2
    assert str(missing).encode() in proc.stderr and b"Traceback" not in proc.stderr
