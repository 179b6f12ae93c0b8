"""The one writer of results: append-only JSONL, one write call per line, fsync policy, advisory lock,
and the resume scan that tells which rows already have a final ``ok`` line.

Nothing already written is ever rewritten or deleted: a torn last line from a crash is copied aside to
``<output>.partial-<timestamp>`` before the file is cut back to its last complete line, and
``--overwrite`` moves the old file aside instead of truncating it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from gptoss_batch.errors import LockedError, OutputError, ResumeMismatchError
from gptoss_batch.records import Result

SCAN_BLOCK_BYTES = 8 << 20
FSYNC_INTERVAL_S = 1.0


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.localtime()) + f"-{os.getpid()}"


@dataclass
class ScanResult:
    """What an existing output holds: the latest status of each id (True = ok)."""

    latest: dict[str, bool] = field(default_factory=dict)
    lines: int = 0
    partial_path: str | None = None
    partial_bytes: int = 0
    bad_lines: int = 0

    @property
    def ok_ids(self) -> Iterator[str]:
        return (k for k, v in self.latest.items() if v)

    def done_ids(self, retry_failed: bool) -> set[str]:
        """Ids a resumed run skips: those ending ok, plus failed ones unless failures are retried."""
        if retry_failed:
            return {k for k, v in self.latest.items() if v}
        return set(self.latest)


_ID_PREFIX = b'{"id":'
_INDEX_KEY = b',"index":'
_STATUS_KEY = b',"status":"'


def _id_and_status(line: bytes) -> tuple[str, bool] | None:
    """Fast path for our own lines ({"id":..,"index":..,"status":..}); full parse otherwise."""
    if line.startswith(_ID_PREFIX):
        # Inside a JSON string a quote is always escaped, so the first ',"index":' ends the id.
        i = line.find(_INDEX_KEY, 6)
        if i > 0:
            j = line.find(_STATUS_KEY, i)
            if j > 0 and line[6:7] == b'"':
                try:
                    key = orjson.loads(line[6:i])
                except orjson.JSONDecodeError:
                    key = None
                if isinstance(key, str):
                    return key, line[j + 11:j + 14] == b'ok"'
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "id" not in data:
        return None
    return str(data["id"]), data.get("status") == "ok"


def scan_output(path: str | Path, *, repair: bool = True) -> ScanResult:
    """Read an existing output once, block by block. With ``repair``, a torn last line is copied
    aside and cut off so appends start on a line boundary."""
    p = Path(path)
    res = ScanResult()
    try:
        f = p.open("rb")
    except FileNotFoundError:
        return res
    latest = res.latest
    with f:
        rest = b""
        offset = 0  # file offset of the first byte of `rest`
        while block := f.read(SCAN_BLOCK_BYTES):
            data = rest + block if rest else block
            lines = data.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if not line:
                    continue
                parsed = _id_and_status(line)
                if parsed is None:
                    res.bad_lines += 1
                    continue
                latest[parsed[0]] = parsed[1]
                res.lines += 1
            offset += len(data) - len(rest)
    if rest:
        # A last line without its newline was torn by a crash (we write whole lines only).
        res.partial_bytes = len(rest)
        if repair:
            aside = f"{p}.partial-{_stamp()}"
            with open(aside, "wb") as out:
                out.write(rest)
                out.flush()
                os.fsync(out.fileno())
            os.truncate(p, offset)
            res.partial_path = aside
    return res


def iter_results(path: str | Path) -> Iterator[Result]:
    """Every complete result line of an output file, in file order (torn or foreign lines skipped)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                yield Result.from_line(line)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue


def latest_results(path: str | Path) -> dict[str, Result]:
    """id -> its final line (the latest one wins)."""
    out: dict[str, Result] = {}
    for r in iter_results(path):
        out[r.id] = r
    return out


# -- the run's metadata sidecar ----------------------------------------------------------------------

def meta_path(output: str | Path) -> Path:
    return Path(f"{output}.meta.json")


def read_meta(output: str | Path) -> dict[str, Any]:
    try:
        raw = meta_path(output).read_bytes()
    except FileNotFoundError:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON next to the target and rename over it, so readers never see half a file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    os.replace(tmp, p)


def fingerprints_match(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("size", "head_sha256", "tail_sha256")
    return all(old.get(k) == new.get(k) for k in keys) and (
        old.get("rows") is None or new.get("rows") is None or old.get("rows") == new.get("rows"))


def check_resume(output: str | Path, fingerprint: Mapping[str, Any] | None, *, force: bool) -> None:
    """Refuse to resume an output that was produced from a different input."""
    if fingerprint is None or force:
        return
    old = read_meta(output).get("input")
    if isinstance(old, dict) and old and not fingerprints_match(old, fingerprint):
        raise ResumeMismatchError(
            f"{output} was written from a different input ({old.get('path')}: {old.get('size')} bytes, "
            f"{old.get('rows')} rows; now {fingerprint.get('size')} bytes, {fingerprint.get('rows')} rows). "
            "Resuming would mix results of two inputs. Use another -o, --overwrite to start afresh, "
            "or --force-resume to keep the results whose ids still exist.")


# -- the writer ------------------------------------------------------------------------------------

class OutputLock:
    """An advisory flock on ``<output>.lock`` holding the owner's PID. The kernel drops the lock when its
    process dies, so a stale lock from a killed run is simply taken over."""

    def __init__(self, output: str | Path) -> None:
        self.path = Path(f"{output}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"{str(self.path)[:-5]} is being written by another gptoss-batch run (PID {pid}); "
                    f"wait for it or stop it (lock file {self.path})") from None
            # The file may have been unlinked by the previous holder between our open and flock.
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
        raise LockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


class JsonlSink:
    """Satisfies ``runner.Sink``: appends each result as one line with one ``write`` call."""

    def __init__(self, path: str | Path, *, fsync: str = "interval",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._clock = clock
        self._fd: int | None = None
        self._last_sync = 0.0
        self._dirty = False
        self.lines_written = 0

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open for writing: {exc.strerror}") from None
        self._last_sync = self._clock()

    def write(self, result: Result) -> None:
        self.write_line(result.to_line())

    def write_line(self, line: bytes) -> None:
        fd = self._fd
        assert fd is not None, "JsonlSink.open() first"
        try:
            n = os.write(fd, line)
            if n != len(line):
                # A short write on a regular file means the disk is full: the torn line is moved
                # aside by the next run's scan, never silently kept.
                raise OSError(errno.ENOSPC, "short write (disk full?)")
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed: {exc.strerror or exc}") from None
        self.lines_written += 1
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "interval":
            self._dirty = True
            now = self._clock()
            if now - self._last_sync >= FSYNC_INTERVAL_S:
                self._last_sync = now
                self._sync()

    def _sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"{self.path}: fsync failed: {exc.strerror}") from None
            self._dirty = False

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
        except OSError as exc:
            raise OutputError(f"stdout: write failed: {exc.strerror or exc}") from None
        self.lines_written += 1

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def move_aside(path: str | Path) -> Path | None:
    """``--overwrite``: keep the old results under a new name instead of destroying them."""
    p = Path(path)
    if not p.exists():
        return None
    aside = Path(f"{p}.bak-{_stamp()}")
    os.replace(p, aside)
    with contextlib.suppress(FileNotFoundError):
        meta_path(p).unlink()
    return aside
