"""The writer and the resume scan: append-only lines, torn tails set aside, the lock, the input check,
the reorder buffer of --ordered, and the verify/summary rules (verify.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from gptoss_batch import sink as sink_mod
from gptoss_batch.errors import LockedError, OutputError, ResumeMismatchError
from gptoss_batch.records import ErrorInfo, Result, Row, Usage
from gptoss_batch.sink import (
    JsonlSink,
    OrderedSink,
    OutputLock,
    check_resume,
    move_aside,
    scan_output,
    write_json_atomic,
)
from gptoss_batch.verify import _final_line, index_output, summarize_output, verify
from tests.cli_helpers import write_jsonl
from tests.fakes import FakeClock, MemorySink


def ok(rid: str, index: int = 0, run: int = 1, text: str = "fine") -> Result:
    return Result(id=rid, index=index, status="ok", text=text, usage=Usage(3, 5, 8), latency_s=0.5, run=run)


def err(rid: str, index: int = 0, run: int = 1) -> Result:
    return Result(id=rid, index=index, status="error", error=ErrorInfo("http", "boom", 500), run=run)


def write_lines(path: Path, *items: Result | bytes) -> bytes:
    data = b"".join(x if isinstance(x, bytes) else x.to_line() for x in items)
    with path.open("ab") as f:
        f.write(data)
    return data


# -- the resume scan ---------------------------------------------------------------------------------

def test_scan_keeps_the_latest_line_of_each_id(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, err("a"), ok("b"), ok("a"), err("c"), ok("d"), err("d"))
    res = scan_output(out)
    assert res.latest == {"a": True, "b": True, "c": False, "d": False}
    assert res.lines == 6 and res.bad_lines == 0 and res.partial_path is None
    assert res.is_done("a", retry_failed=True) and not res.is_done("c", retry_failed=True)
    assert res.is_done("c", retry_failed=False) and not res.is_done("zzz", retry_failed=False)
    assert res.done_count(retry_failed=True) == 2 and res.done_count(retry_failed=False) == 4


def test_scan_of_a_missing_output_is_empty(tmp_path: Path) -> None:
    res = scan_output(tmp_path / "nothing.jsonl")
    assert res.latest == {} and res.lines == 0


def test_fast_and_slow_paths_agree_across_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Escaped and non-ASCII ids, foreign lines and blank lines fall back to the full parse, block by block."""
    rng = random.Random(3)
    out = tmp_path / "out.jsonl"
    ids = [f"r{i}" for i in range(300)] + ['quo"te', "back\\slash", "ünï©ode", "tab\tid"]
    expected: dict[str, bool] = {}
    items: list[Result | bytes] = []
    for i in range(900):
        rid = rng.choice(ids)
        good = rng.random() < 0.7
        items.append(ok(rid, i, text="x" * rng.randint(0, 200)) if good else err(rid, i))
        expected[rid] = good
        if i % 97 == 0:
            items.append(b'{"not": "ours"}\n' if i % 2 else b"\n")
    write_lines(out, *items)
    monkeypatch.setattr(sink_mod, "SCAN_BLOCK_BYTES", 1000)
    res = scan_output(out)
    assert res.latest == expected
    assert res.lines == 900 and res.bad_lines == sum(1 for x in items if x == b'{"not": "ours"}\n')


def test_torn_last_line_is_set_aside_then_cut_off(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = write_lines(out, ok("a"), ok("b"))
    torn = ok("c").to_line()[:37]
    write_lines(out, torn)
    res = scan_output(out)
    assert res.latest == {"a": True, "b": True}  # the torn row is not done: it runs again
    assert res.partial_bytes == len(torn)
    assert res.partial_path is not None and Path(res.partial_path).read_bytes() == torn
    assert Path(res.partial_path).name.startswith("out.jsonl.partial-")
    assert out.read_bytes() == whole  # cut back to the last complete line, nothing else touched
    assert scan_output(out).partial_path is None


def test_a_torn_line_that_is_the_whole_file_is_set_aside(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, b'{"id":"a","ind')
    res = scan_output(out)
    assert res.latest == {} and res.partial_bytes == 14 and out.read_bytes() == b""


def test_scan_without_repair_leaves_the_file_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    data = write_lines(out, ok("a"), b'{"id":"b"')
    res = scan_output(out, repair=False)
    assert res.partial_bytes == 9 and res.partial_path is None and out.read_bytes() == data
    assert list(tmp_path.iterdir()) == [out]


# -- the writer ---------------------------------------------------------------------------------------

def test_each_result_is_one_complete_line_appended(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "dir" / "out.jsonl"
    s = JsonlSink(out, fsync="always")
    s.open()
    s.write(ok("a"))
    s.write(err("b"))
    s.close()
    s.close()  # closing twice is harmless
    s2 = JsonlSink(out)
    s2.open()
    s2.write(ok("c"))
    s2.close()
    lines = out.read_bytes().splitlines(keepends=True)
    assert [orjson.loads(x)["id"] for x in lines] == ["a", "b", "c"] and all(x.endswith(b"\n") for x in lines)


def test_after_a_short_write_the_sink_writes_nothing_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torn line must stay the last bytes of the file, for the next run's scan to set aside."""
    out = tmp_path / "out.jsonl"
    s = JsonlSink(out)
    s.open()
    s.write(ok("a"))
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data[:10])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OutputError, match="short write"):
        s.write(ok("b"))
    with pytest.raises(OutputError, match="short write"):
        s.write(ok("c"))
    assert len(calls) == 1
    monkeypatch.undo()
    s.close()
    assert scan_output(out).latest == {"a": True}


def test_fsync_interval_syncs_at_most_once_a_second_and_at_close(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    clock = FakeClock()
    s = JsonlSink(tmp_path / "out.jsonl", fsync="interval", clock=clock)
    s.open()
    for i in range(10):
        s.write(ok(f"r{i}"))
        clock.now += 0.25
    assert len(syncs) == 2  # at 1.0 s and 2.0 s
    s.close()
    assert len(syncs) == 3


def test_fsync_never_does_not_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    s = JsonlSink(tmp_path / "out.jsonl", fsync="never")
    s.open()
    s.write(ok("a"))
    s.close()
    assert syncs == []


def test_json_sidecars_are_replaced_whole(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert orjson.loads(p.read_bytes()) == {"a": 2} and sorted(x.name for x in tmp_path.iterdir()) == ["x.json"]
    with pytest.raises(OutputError, match="cannot write"):
        write_json_atomic(tmp_path / "missing-dir" / "x.json", {})


def test_overwrite_moves_the_output_and_its_sidecars_aside(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    data = write_lines(out, ok("a"))
    write_json_atomic(f"{out}.meta.json", {"runs": 3})
    aside = move_aside(out)
    assert aside is not None and aside.read_bytes() == data and not out.exists()
    assert [p.name for p in tmp_path.glob("out.jsonl.meta.json.bak-*")] == [f"out.jsonl.meta.json.bak-"
                                                                            f"{aside.name.split('.bak-')[1]}"]
    assert move_aside(out) is None


# -- the lock -----------------------------------------------------------------------------------------

def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    first = OutputLock(out)
    first.acquire()
    try:
        with pytest.raises(LockedError, match=f"PID {os.getpid()}"):
            OutputLock(out).acquire()
    finally:
        first.release()
    assert not (tmp_path / "out.jsonl.lock").exists()
    again = OutputLock(out)
    again.acquire()
    again.release()


def test_a_stale_lock_file_without_a_live_holder_is_taken_over(tmp_path: Path) -> None:
    lock_file = tmp_path / "out.jsonl.lock"
    lock_file.write_text("4194304\n")  # left by a killed run: the file stays, its flock died with it
    lock = OutputLock(tmp_path / "out.jsonl")
    lock.acquire()
    assert lock_file.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_lock_that_cannot_be_created_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot create the output's lock"):
        OutputLock(tmp_path / "no" / "such" / "out.jsonl").acquire()


# -- the input check ------------------------------------------------------------------------------------

FP = {"size": 100, "head_sha256": "h", "tail_sha256": "t", "rows": 10}


def test_resume_against_a_different_input_is_refused_with_both_described(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, ok("a"))
    write_json_atomic(f"{out}.meta.json", {"input": {"path": "old.jsonl", **FP}})
    new = {**FP, "size": 120, "rows": 12}
    with pytest.raises(ResumeMismatchError) as info:
        check_resume(out, new, force=False, input_path="new.jsonl")
    message = str(info.value)
    assert "different input" in message and "old.jsonl (100 bytes, 10 rows)" in message
    assert "new.jsonl (120 bytes, 12 rows)" in message and "--force-resume" in message and "--overwrite" in message
    assert check_resume(out, new, force=True) is True
    assert check_resume(out, dict(FP), force=False) is False


@pytest.mark.parametrize("case", ["no output", "empty output", "no sidecar", "stdin input"])
def test_there_is_nothing_to_compare_when(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    if case != "no output":
        out.write_bytes(b"" if case == "empty output" else ok("a").to_line())
    if case != "no sidecar":
        write_json_atomic(f"{out}.meta.json", {"input": {"path": "old.jsonl", **FP}})
    fingerprint: dict[str, Any] | None = None if case == "stdin input" else {**FP, "size": 1}
    assert check_resume(out, fingerprint, force=False) is False


# -- ordered output ---------------------------------------------------------------------------------------

class ListWriter:
    def __init__(self) -> None:
        self.mem = MemorySink()
        self.lines_written = 0
        self.closed = False

    def open(self) -> None:
        pass

    def write(self, result: Result) -> None:
        self.mem.write(result)
        self.lines_written += 1

    def close(self) -> None:
        self.closed = True


def rows(n: int) -> list[Row]:
    return [Row(f"r{i}", i, i + 1, {"prompt": str(i)}) for i in range(n)]


@pytest.mark.anyio
async def test_ordered_sink_writes_in_input_order_whatever_the_finishing_order() -> None:
    inner = ListWriter()
    s = OrderedSink(inner, window=1000)
    rs = rows(200)
    for r in rs:
        await s.admit(r)
    order = list(range(200))
    random.Random(5).shuffle(order)
    for i in order:
        s.write(ok(f"r{i}", i))
    assert [r.index for r in inner.mem.results] == list(range(200)) and s.buffered == 0


@pytest.mark.anyio
async def test_ordered_sink_holds_the_producer_back_when_its_window_is_full() -> None:
    """Backpressure, not growth: no row beyond the window starts until the oldest one is written."""
    inner = ListWriter()
    s = OrderedSink(inner, window=4)
    rs = rows(10)
    admitted: list[int] = []

    async def producer() -> None:
        for r in rs:
            await s.admit(r)
            admitted.append(r.index)

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        assert admitted == [0, 1, 2, 3]
        for i in (3, 2, 1):  # finished, but row 0 is still running: they wait, and so does the producer
            s.write(ok(f"r{i}", i))
        await anyio.wait_all_tasks_blocked()
        assert admitted == [0, 1, 2, 3] and s.buffered == 3 and inner.mem.results == []
        s.write(ok("r0", 0))
        await anyio.wait_all_tasks_blocked()
        assert [r.index for r in inner.mem.results] == [0, 1, 2, 3] and admitted == list(range(8))
        for i in range(4, 8):
            s.write(ok(f"r{i}", i))
        await anyio.wait_all_tasks_blocked()
        s.write(ok("r9", 9))
        s.write(ok("r8", 8))
    assert [r.index for r in inner.mem.results] == list(range(10)) and s.max_buffered <= 3


@pytest.mark.anyio
async def test_a_stopped_ordered_run_writes_what_it_holds_in_index_order() -> None:
    inner = ListWriter()
    s = OrderedSink(inner, window=10)
    for r in rows(5):
        await s.admit(r)
    for i in (4, 2, 1):  # row 0 and 3 never finish (the run was stopped)
        s.write(ok(f"r{i}", i))
    assert inner.mem.results == []
    s.close()
    assert [r.index for r in inner.mem.results] == [1, 2, 4] and inner.closed


# -- verify and summary -------------------------------------------------------------------------------

def test_verify_sorts_rows_into_ok_missing_duplicated_errored_and_extra(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"id": f"r{i}", "prompt": "p"} for i in range(7)))
    out = tmp_path / "out.jsonl"
    write_lines(out,
                ok("r0"),              # ok
                err("r1"), ok("r1"),   # ok: the final line is ok and it is the only ok line
                ok("r2"), ok("r2"),    # duplicated: two ok lines
                ok("r3"), err("r3"),   # ok, then an error: the final line wins -> errored
                err("r4"),             # errored
                ok("zz"),              # extra: not in the input
                b"garbage\n",          # corrupt
                ok("r6"), b'{"id":"r5"')  # r5's only line is torn -> missing
    report = verify(str(inp), out)
    assert not report.passed
    assert (report.ok.count, report.missing.examples, report.duplicated.examples, report.errored.examples,
            report.extra.examples) == (3, ["r5"], ["r2"], ["r3", "r4"], ["zz"])
    assert report.corrupt_lines == 1 and report.torn_tail_bytes == 10 and report.input_rows == 7


def test_verify_passes_when_every_row_has_exactly_one_final_ok(tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", ({"prompt": f"p{i}"} for i in range(3)))
    from gptoss_batch.inputs import open_input

    ids = [r.id for r in open_input(str(inp)).rows()]
    out = tmp_path / "out.jsonl"
    write_lines(out, err(ids[2]), ok(ids[1]), ok(ids[2]), ok(ids[0]))
    report = verify(str(inp), out)
    assert report.passed and report.ok.count == 3 and report.to_json()["passed"] is True


def test_summary_counts_each_row_once_from_its_final_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, err("a", run=1), ok("b", run=1), err("c", run=1), ok("a", run=2), err("c", run=2))
    write_json_atomic(f"{out}.meta.json", {"runs": 2, "wall_s_total": 4.0, "input": {"rows": 3}})
    s = summarize_output(out)
    assert s["rows"] == {"total": 3, "done": 3, "ok": 2, "failed": 1}
    assert s["runs"] == {"1": 1, "2": 2} and s["runs_total"] == 2 and s["wall_s"] == 4.0
    assert s["errors_by_kind"] == {"http": 1} and s["output_tokens"] == 10
    only = summarize_output(out, only_ids={"a", "b"})
    assert only["rows"]["done"] == 2


def test_index_counts_ok_lines_per_id(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, ok("a"), ok("a"), ok("a"), err("b"))
    idx = index_output(out)
    assert idx.lines == 4 and idx.ids.keys() == {"a", "b"}
    assert _final_line(idx.ids["a"]) == 2 and _final_line(idx.ids["b"]) == 3


def test_a_second_torn_line_from_the_same_second_gets_its_own_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_mod, "_stamp", lambda: "20260101T000000-1")
    out = tmp_path / "out.jsonl"
    write_lines(out, ok("a"), b'{"id":"b"')
    first = scan_output(out).partial_path
    write_lines(out, b'{"id":"c"')
    second = scan_output(out).partial_path
    assert first is not None and second is not None and first != second
    assert (Path(first).read_bytes(), Path(second).read_bytes()) == (b'{"id":"b"', b'{"id":"c"')


def test_verify_splits_lines_on_newlines_only(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    write_lines(out, ok("a"), b'{"id":"x\ry","status":"ok"}\n', ok("b"))
    idx = index_output(out)
    assert idx.lines == 2 and idx.corrupt_lines == 1 and _final_line(idx.ids["b"]) == 2
