"""The one writer of results: append-only JSONL, one write call per line, fsync policy, advisory lock,
the resume scan that tells which rows already have a final ``ok`` line, and the optional reorder buffer.

Nothing already written is ever rewritten or deleted: a torn last line from a crash is copied aside to
``<output>.partial-<timestamp>`` before the file is cut back to its last complete line, and
``--overwrite`` moves the old file (with its sidecars) aside instead of truncating it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import anyio
import orjson

from gptoss_batch.errors import LockedError, OutputError, ResumeMismatchError
from gptoss_batch.records import Result, Row

SCAN_BLOCK_BYTES = 8 << 20
FSYNC_INTERVAL_S = 1.0
# --ordered: finished results that may wait in memory for an earlier, slower row.
ORDERED_WINDOW_MIN_ROWS = 1024
ORDERED_WINDOW_PER_WORKER = 8


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.localtime()) + f"-{os.getpid()}"


def _os_message(exc: OSError) -> str:
    return exc.strerror or str(exc)


# -- the resume scan -------------------------------------------------------------------------------

@dataclass
class ScanResult:
    """What an existing output holds: the status of each id's latest line (True = ok)."""

    latest: dict[str, bool] = field(default_factory=dict)
    lines: int = 0
    partial_path: str | None = None
    partial_bytes: int = 0
    bad_lines: int = 0

    def is_done(self, row_id: str, retry_failed: bool) -> bool:
        """Whether a resumed run skips this id: its latest line is ok, or is an error that is kept."""
        status = self.latest.get(row_id)
        return status is not None and (status or not retry_failed)

    def done_count(self, retry_failed: bool) -> int:
        """How many ids a resumed run skips (``is_done`` over them all, without a call per id)."""
        return sum(1 for ok in self.latest.values() if ok or not retry_failed)


# Our own lines start {"id":"...","index":N,"status":"ok"|"error" (records.Result.to_json's key order).
# Matched from the newline before each line, so every match owns a distinct line: when a block has as
# many matches as lines, every line is ours and the per-line Python loop is skipped. A JSON string never
# holds a raw quote or newline, so the id group ends exactly at its closing quote; ids with escapes take
# the slow path.
_OUR_LINE = re.compile(rb'\n\{"id":"([^"\\\n]*)","index":-?\d+,"status":"(ok|error)"')


def _id_and_status(line: bytes) -> tuple[str, bool] | None:
    """A full parse of one line: (id, ok?) or None when the line is not a result line."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "id" not in data:
        return None
    return str(data["id"]), data.get("status") == "ok"


def _scan_lines(body: bytes, res: ScanResult) -> None:
    """The slow path for one block: parse line by line (foreign lines, escaped ids, damage)."""
    latest = res.latest
    for line in body.split(b"\n"):
        if not line:
            continue
        parsed = _id_and_status(line)
        if parsed is None:
            res.bad_lines += 1
            continue
        latest[parsed[0]] = parsed[1]
        res.lines += 1


def scan_output(path: str | Path, *, repair: bool = True) -> ScanResult:
    """Read an existing output once, block by block: the latest line of each id wins.

    With ``repair``, a torn last line (bytes after the last newline: we write whole lines only, so these
    come from a crash or a full disk) is copied to ``<output>.partial-<timestamp>`` and fsynced, then the
    output is cut back to its last complete line so appends start on a line boundary.
    """
    p = Path(path)
    res = ScanResult()
    try:
        f = p.open("rb")
    except FileNotFoundError:
        return res
    except OSError as exc:
        raise OutputError(f"{p}: cannot read the existing output: {_os_message(exc)}") from None
    latest = res.latest
    consumed = 0
    with f:
        carry = b"\n"  # a sentinel newline, then the bytes after the last newline seen so far
        try:
            while block := f.read(SCAN_BLOCK_BYTES):
                consumed += len(block)
                data = carry + block
                cut = data.rfind(b"\n")  # data[:cut] is a newline, then complete lines without their last newline
                lines = data.count(b"\n", 0, cut)
                if lines:
                    found = _OUR_LINE.findall(data, 0, cut)
                    if len(found) == lines:
                        for key, status in found:
                            latest[key.decode()] = status == b"ok"
                        res.lines += lines
                    else:
                        _scan_lines(data[:cut], res)
                carry = data[cut:]
        except OSError as exc:
            raise OutputError(f"{p}: cannot read the existing output: {_os_message(exc)}") from None
    torn = carry[1:]
    if torn:
        res.partial_bytes = len(torn)
        if repair:
            res.partial_path = _set_aside(p, torn, consumed - len(torn))
    return res


def _set_aside(p: Path, torn: bytes, keep_bytes: int) -> str:
    stamp = _stamp()
    aside = f"{p}.partial-{stamp}"
    try:
        for n in range(1, 1000):  # never over an earlier one
            if not os.path.lexists(aside):
                break
            aside = f"{p}.partial-{stamp}-{n}"
        with open(aside, "xb") as out:
            out.write(torn)
            out.flush()
            os.fsync(out.fileno())
        # Only once the torn bytes are safe elsewhere is the output cut back.
        os.truncate(p, keep_bytes)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{p}: cannot set aside its torn last line ({len(torn)} bytes) to {aside}: "
                          f"{_os_message(exc)}") from None
    return aside


# -- the run's metadata sidecar ----------------------------------------------------------------------

def meta_path(output: str | Path) -> Path:
    return Path(f"{output}.meta.json")


def read_meta(output: str | Path) -> dict[str, Any]:
    try:
        raw = meta_path(output).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise OutputError(f"{meta_path(output)}: cannot read: {_os_message(exc)}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON next to the target and rename over it, so readers never see half a file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{p}: cannot write: {_os_message(exc)}") from None


def fingerprints_match(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("size", "head_sha256", "tail_sha256")
    return all(old.get(k) == new.get(k) for k in keys) and (
        old.get("rows") is None or new.get("rows") is None or old.get("rows") == new.get("rows"))


def check_resume(output: str | Path, fingerprint: Mapping[str, Any] | None, *, force: bool,
                 input_path: str = "") -> bool:
    """Refuse to resume an output that was written from a different input (``ResumeMismatchError``).

    Returns True when the input differs and ``force`` lets the run go on anyway. Nothing is compared
    when there is nothing to resume (no output, or an empty one), when either side is a stream (no
    fingerprint), or when the output has no sidecar (written by hand or by another tool).
    """
    p = Path(output)
    try:
        if fingerprint is None or p.stat().st_size == 0:
            return False
    except FileNotFoundError:
        return False
    old = read_meta(p).get("input")
    if not isinstance(old, dict) or not old or fingerprints_match(old, fingerprint):
        return False
    if force:
        return True

    def describe(fp: Mapping[str, Any], path: object) -> str:
        rows = fp.get("rows")
        return f"{path} ({fp.get('size')} bytes" + (f", {rows} rows)" if rows is not None else ")")

    raise ResumeMismatchError(
        f"{p} was written from a different input: {describe(old, old.get('path'))} then, "
        f"{describe(fingerprint, input_path or 'the input')} now. Resuming would mix the results of two "
        "inputs. Use another -o, or --overwrite to move the old results aside and start afresh, or "
        "--force-resume to keep every result whose row id is still in the input and run the rest (rows "
        "without an explicit id are keyed by position and content, so edited rows run again).")


# -- the lock ----------------------------------------------------------------------------------------

class OutputLock:
    """An advisory flock on ``<output>.lock`` holding the owner's PID. The kernel drops the lock when its
    process dies, so a stale lock from a killed run is simply taken over."""

    def __init__(self, output: str | Path) -> None:
        self.output = str(output)
        self.path = Path(f"{output}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the output's lock: {_os_message(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"{self.output} is being written by another gptoss-batch run (PID {pid}); wait for it to "
                    f"finish or stop it, then rerun (lock file {self.path})") from None
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"{self.path}: cannot lock: {_os_message(exc)}") from None
            # The previous holder may have unlinked the file between our open and flock: then we hold a
            # lock on a file nobody else will see, so try again with the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise LockedError(f"could not take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


# -- the writers -------------------------------------------------------------------------------------

class ResultWriter(Protocol):
    """What ``OrderedSink`` wraps: ``JsonlSink`` or ``StreamSink``."""

    lines_written: int

    def open(self) -> None: ...
    def write(self, result: Result) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Satisfies ``runner.Sink``: appends each result as one line with one ``write`` call.

    After a failed or short write the sink is broken: every later write raises the same error without
    touching the file, so a torn line is never followed by more data (the next run sets it aside).
    """

    def __init__(self, path: str | Path, *, fsync: str = "interval",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._clock = clock
        self._fd: int | None = None
        self._last_sync = 0.0
        self._error: OutputError | None = None
        self.lines_written = 0

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open for writing: {_os_message(exc)}") from None
        self._last_sync = self._clock()

    def write(self, result: Result) -> None:
        self.write_line(result.to_line())

    def write_line(self, line: bytes) -> None:
        if self._error is not None:
            raise self._error
        fd = self._fd
        assert fd is not None, "JsonlSink.open() first"
        try:
            n = os.write(fd, line)
            if n != len(line):
                # A short write on a regular file means the disk (or a size limit) is full; the torn
                # line stays until the next run's scan moves it aside.
                raise OSError(errno.ENOSPC, f"short write, {n} of {len(line)} bytes (disk full?)")
        except OSError as exc:
            self._error = OutputError(f"{self.path}: write failed: {_os_message(exc)}")
            raise self._error from None
        self.lines_written += 1
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "interval":
            now = self._clock()
            if now - self._last_sync >= FSYNC_INTERVAL_S:
                self._last_sync = now
                self._sync()

    def _sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._error = OutputError(f"{self.path}: fsync failed: {_os_message(exc)}")
                raise self._error from None

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            if self.fsync != "never":
                self._sync()
        finally:
            os.close(self._fd)
            self._fd = None


class StreamSink:
    """Results to an already-open binary stream (``-o -``: stdout), flushed per line."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self.lines_written = 0

    def open(self) -> None:
        return None

    def write(self, result: Result) -> None:
        try:
            self._stream.write(result.to_line())
            self._stream.flush()
        except (OSError, ValueError) as exc:
            raise OutputError(f"stdout: write failed: {exc}") from None
        self.lines_written += 1

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def ordered_window(workers: int) -> int:
    """How many rows --ordered lets run ahead of the oldest unwritten one (the memory bound in --help)."""
    return max(ORDERED_WINDOW_MIN_ROWS, ORDERED_WINDOW_PER_WORKER * workers)


class OrderedSink:
    """``--ordered``: results go to ``inner`` in input order through a bounded reorder buffer.

    The runner awaits ``admit(row)`` before it starts a row. At most ``window`` rows may be admitted and
    not yet written, so at most ``window - 1`` finished results wait in memory for an earlier row; when
    the window is full, ``admit`` waits (backpressure on reading) instead of letting the buffer grow.
    A row admitted but never finished (the run was stopped) leaves a gap: ``close`` writes what waits
    behind it in index order, and a resumed run appends the missing rows at the end.
    """

    def __init__(self, inner: ResultWriter, window: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.inner = inner
        self.window = window
        self._pending: deque[int] = deque()  # admitted row indices, in input order, not yet written
        self._ready: dict[int, Result] = {}
        self._room = anyio.Event()
        self.max_buffered = 0

    @property
    def lines_written(self) -> int:
        return self.inner.lines_written

    @property
    def buffered(self) -> int:
        return len(self._ready)

    def open(self) -> None:
        self.inner.open()

    async def admit(self, row: Row) -> None:
        while len(self._pending) >= self.window:
            if self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()
        self._pending.append(row.index)

    def write(self, result: Result) -> None:
        pending, ready = self._pending, self._ready
        ready[result.index] = result
        while pending and pending[0] in ready:
            self.inner.write(ready.pop(pending.popleft()))
        self.max_buffered = max(self.max_buffered, len(ready))
        if len(pending) < self.window:
            self._room.set()

    def close(self) -> None:
        """Write whatever still waits (in index order) and close ``inner``."""
        try:
            for index in sorted(self._ready):
                self.inner.write(self._ready.pop(index))
        finally:
            self._pending.clear()
            self.inner.close()


def move_aside(path: str | Path) -> Path | None:
    """``--overwrite``: keep the old results, and their sidecars, under a new name instead of destroying
    them."""
    p = Path(path)
    if not p.exists():
        return None
    stamp = _stamp()
    aside = Path(f"{p}.bak-{stamp}")
    try:
        os.replace(p, aside)
        for suffix in (".meta.json", ".summary.json"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{p}{suffix}", f"{p}{suffix}.bak-{stamp}")
    except OSError as exc:
        raise OutputError(f"{p}: cannot move the old results aside: {_os_message(exc)}") from None
    return aside
