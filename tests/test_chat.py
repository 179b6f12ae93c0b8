"""`gptoss-batch chat`: one prompt streamed to stdout as it is generated, the same config as `run`, and
exit codes 0/1/2."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from gptoss_batch.chat import ChatOutcome, build_request, format_timing, read_prompt
from gptoss_batch.config import RunConfig, build_config
from gptoss_batch.errors import ConfigError
from gptoss_batch.records import Completion, Usage
from gptoss_batch.sim.testing import SimHandle, start_sim
from tests.cli_helpers import gptoss

READ_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    # Unambiguous timing: the first token at 50 ms, the last of six 2 s later.
    with start_sim("--ttft-s", "0.05", "--itl-s", "0.4", "--min-tokens", "6", "--strict-model") as handle:
        yield handle


def chat_args(sim: SimHandle, *extra: str) -> list[str]:
    return ["chat", "--base-url", sim.base_url, "--model", "gpt-oss-20b", "--max-tokens", "6", *extra]


def test_tokens_reach_stdout_as_they_are_generated(sim: SimHandle) -> None:
    """A reader of the pipe sees the first token seconds before the stream ends, then the rest piece by piece."""
    cmd = [sys.executable, "-m", "gptoss_batch", *chat_args(sim, "Tell me a story.")]
    reads: list[tuple[float, bytes]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + READ_TIMEOUT_S
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "chat printed nothing for too long"
            data = os.read(fd, 65536)
            if not data:
                break
            reads.append((time.monotonic(), data))
        assert proc.wait(timeout=10) == 0
    text = b"".join(d for _, d in reads)
    assert reads[0][1].strip() and text.startswith(reads[0][1])
    assert len(reads) >= 4  # arrived in pieces, not at the end
    assert reads[-1][0] - reads[0][0] >= 1.2  # the first token was out while ~2 s of stream remained
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    whole = gptoss(*chat_args(sim, "Tell me a story.", "--no-stream"))
    assert whole.returncode == 0 and whole.stdout == text  # same answer, printed at once


def test_dash_reads_the_prompt_from_stdin_and_verbose_puts_timing_on_stderr(sim: SimHandle) -> None:
    proc = gptoss(*chat_args(sim, "-", "-v", "--max-tokens", "2"), input=b"What is 2+2?\n")
    assert proc.returncode == 0, proc.stderr
    stderr = proc.stderr.decode()
    assert "TTFT" in stderr and "2 output tokens (usage)" in stderr and "tok/s" in stderr
    assert b"TTFT" not in proc.stdout and proc.stdout.strip()
    asked = gptoss(*chat_args(sim, "What is 2+2?\n", "--max-tokens", "2"))
    assert asked.stdout == proc.stdout  # the same prompt, whether from stdin or the argument


def test_config_file_sets_the_connection_and_flags_win(sim: SimHandle, tmp_path: Path) -> None:
    config = tmp_path / "chat.toml"
    config.write_text(f'base_url = "{sim.base_url}"\nmodel = "gpt-oss-20b"\nmax_tokens = 1\nconcurrency = 9\n')
    ok = gptoss("chat", "hello", "--config", str(config), "--no-stream")
    assert ok.returncode == 0, ok.stderr
    wrong = gptoss("chat", "hello", "--config", str(config), "--model", "other-model")
    assert wrong.returncode == 1  # serve-sim --strict-model: 404 for any other name
    assert "other-model" in wrong.stderr.decode() and "does not exist" in wrong.stderr.decode()


@pytest.mark.parametrize(("args", "stdin", "code", "message"), [
    (["chat", "hi", "--base-url", "http://127.0.0.1:9/v1", "--connect-timeout", "2"], None, 1, "cannot connect"),
    (["chat", "-"], b"  \n", 2, "prompt is empty"),
    (["chat", "hi", "--temperature", "-1"], None, 2, "temperature"),
    (["chat", "hi", "--config", "/nonexistent/chat.toml"], None, 2, "config file not found"),
])
def test_exit_codes(args: list[str], stdin: bytes | None, code: int, message: str) -> None:
    proc = gptoss(*args, input=stdin)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.decode() and proc.stdout == b""


def test_a_stream_cut_midway_exits_1_with_the_reason(tmp_path: Path) -> None:
    with start_sim("--ttft-s", "0.01", "--itl-s", "0.01", "--min-tokens", "8", "--stream-cut-rate", "1") as cut:
        proc = gptoss("chat", "hi", "--base-url", cut.base_url, "--max-tokens", "8")
    assert proc.returncode == 1
    assert "cut short" in proc.stderr.decode()


class _JsonOnly(BaseHTTPRequestHandler):
    """A server that ignores "stream": true and answers with one JSON body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "plain answer"},
                                          "finish_reason": "stop"}], "model": "m"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


def test_a_server_that_answers_a_stream_with_plain_json_still_gets_its_answer_printed() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), _JsonOnly) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            proc = gptoss("chat", "hi", "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1")
        finally:
            server.shutdown()
            thread.join(timeout=5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"plain answer\n"


# -- the library ----------------------------------------------------------------------------------------


def test_the_request_is_built_like_a_run_row_with_the_system_message_first() -> None:
    cfg = build_config({"model": "m", "max_tokens": 5, "param": ["seed=7"], "stream": True}, environ={})
    route, body = build_request(cfg, "Hi", system="Be brief.")
    assert route == "chat"
    assert orjson.loads(body) == {
        "model": "m", "max_tokens": 5, "seed": 7, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


def test_a_completions_route_from_the_config_sends_a_prompt() -> None:
    route, body = build_request(RunConfig(route="completions"), "Once upon a time")
    assert route == "completions" and orjson.loads(body) == {"prompt": "Once upon a time"}


def test_read_prompt() -> None:
    assert read_prompt("-", io.StringIO("from stdin\n")) == "from stdin\n"
    assert read_prompt("as given", io.StringIO("ignored")) == "as given"
    with pytest.raises(ConfigError, match="nothing on stdin"):
        read_prompt("-", io.StringIO(""))


def test_timing_line() -> None:
    streamed = ChatOutcome(Completion("x", "stop", Usage(3, 20, 23), "m"), None, 0.6,
                           {"ttft_s": 0.2, "tpot_s": 0.02, "output_tokens": 20, "output_tokens_source": "usage"})
    assert format_timing(streamed) == "TTFT 200 ms · 20 output tokens (usage) · TPOT 20.0 ms · 33.3 tok/s · " \
                                      "0.60 s · finish stop"
    plain = ChatOutcome(Completion("x", None, None, "m"), None, 1.5)
    assert format_timing(plain) == "1.50 s"
