"""Bad input: a clear error naming the file and line, exit 2, and no request sent for a bad file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gptoss_batch.sim.testing import SimHandle, start_sim
from tests.cli_helpers import gptoss, read_jsonl

GOOD = b'{"id": "a", "prompt": "fine"}\n'


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim("--decode-base-s", "0.0005") as handle:
        yield handle


# name, file name, contents, the line the error must name, a word the message must contain
CASES = [
    ("malformed JSON", "in.jsonl", GOOD + b'{"prompt": "x"\n', 2, "JSON"),
    ("neither prompt nor messages", "in.jsonl", GOOD + GOOD.replace(b"a", b"b") + b'{"id": "c"}\n', 3, "prompt"),
    ("wrongly typed field", "in.jsonl", GOOD + b'{"prompt": "x", "max_tokens": "ten"}\n', 2, "max_tokens"),
    ("invalid UTF-8", "in.jsonl", GOOD + b'{"prompt": "caf\xe9"}\n', 2, "UTF-8"),
    ("duplicate id", "in.jsonl", GOOD + GOOD, 2, "duplicate"),
    ("CSV without the prompt column", "in.csv", b"id,question\n1,what\n", 1, "prompt"),
    ("empty file", "in.jsonl", b"", None, "no rows"),
    ("batch row with an unsupported url", "in.jsonl",
     b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}\n', 1, "url"),
]


@pytest.mark.parametrize(("name", "filename", "content", "line", "word"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_rejected_before_any_request(sim: SimHandle, tmp_path: Path, name: str, filename: str,
                                                 content: bytes, line: int | None, word: str) -> None:
    inp = tmp_path / filename
    inp.write_bytes(content)
    out = tmp_path / "out.jsonl"
    before = sim.stats()["requests_total"]
    proc = gptoss("run", str(inp), "-o", str(out), "--base-url", sim.base_url, "--progress", "none")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert str(inp) in err
    if line is not None:
        assert f"{inp}:{line}" in err
    assert word.lower() in err.lower()
    assert sim.stats()["requests_total"] == before  # the first pass caught it: no request was sent
    assert not out.exists() or out.read_bytes() == b""


def test_stdin_stops_at_the_first_invalid_row_and_keeps_what_was_written(sim: SimHandle) -> None:
    data = b"".join(orjson.dumps({"id": f"s{i}", "prompt": "x"}) + b"\n" for i in range(5)) + b"{oops\n" + GOOD
    proc = gptoss("run", "-", "-o", "-", "--base-url", sim.base_url, "--progress", "none", input=data)
    assert proc.returncode == 2
    assert b"<stdin>:6" in proc.stderr
    assert sorted(orjson.loads(x)["id"] for x in proc.stdout.splitlines()) == [f"s{i}" for i in range(5)]


def test_on_invalid_skip_records_error_lines_and_carries_on(sim: SimHandle, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(GOOD + b'{"prompt": 3}\n' + b'{"id": "z", "prompt": "ok"}\n')
    out = tmp_path / "out.jsonl"
    proc = gptoss("run", str(inp), "-o", str(out), "--base-url", sim.base_url, "--on-invalid", "skip",
                  "--progress", "none")
    assert proc.returncode == 1  # a row failed (as invalid input), the rest ran
    lines = read_jsonl(out)
    assert len(lines) == 3
    bad = [r for r in lines if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["error"]["kind"] == "invalid_input" and "prompt" in bad[0]["error"]["message"]
