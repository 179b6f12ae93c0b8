"""The duplicate-id check of an input's validating first pass, in memory that does not grow with the file.

Up to ``SPILL_AFTER_IDS`` explicit ids are kept in a dict (id -> first line), so a duplicate in an ordinary
file is reported at its own line during the pass, like any other bad row. Past that (a dict costs ~150 bytes
per id: 1.5 GB for 10,000,000 ids), each id is reduced to a 64-bit hash and spilled with its line to one of
``PARTITIONS`` files in a temporary directory. After the pass each partition is sorted on its own (about
1.5 MB per 10,000,000 ids) and equal hashes are the candidates. Candidates are confirmed by comparing the
ids themselves, read again from the input: a second pass that happens only when there is a candidate (a real
duplicate, or a hash collision: about one chance in 400,000 for 10,000,000 ids).
"""

from __future__ import annotations

import shutil
import tempfile
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SPILL_AFTER_IDS = 20_000
PARTITIONS = 256
BUFFER_PAIRS = 256  # (hash, line) pairs held per partition before they are appended to its file: 1 MB in all
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Duplicate:
    line: int  # a later occurrence
    id: str
    first_line: int

    @property
    def message(self) -> str:
        return f"duplicate id {self.id!r} (first seen on line {self.first_line})"


class IdCheck:
    """Explicit ids seen so far. ``spill=False`` keeps them all in memory (a stream read once: there is no
    second pass to confirm candidates with)."""

    __slots__ = ("_buffers", "_dir", "_seen", "_spill")

    def __init__(self, *, spill: bool) -> None:
        self._spill = spill
        self._seen: dict[str, int] | None = {}
        self._buffers: list[array[int]] = []
        self._dir: Path | None = None

    @property
    def spilled(self) -> bool:
        return self._seen is None

    def add(self, rid: str, line: int) -> int | None:
        """The line ``rid`` was first seen on, when it is a duplicate known now; else None (once spilled,
        duplicates are known only at ``finish``)."""
        seen = self._seen
        if seen is not None:
            first = seen.setdefault(rid, line)
            if first != line:
                return first
            if self._spill and len(seen) > SPILL_AFTER_IDS:
                self._start_spilling(seen)
            return None
        h = hash(rid) & _MASK64  # str hashes are stable within a process, which is all this needs
        buf = self._buffers[h % PARTITIONS]
        buf.append(h)
        buf.append(line)
        if len(buf) >= 2 * BUFFER_PAIRS:
            self._flush(h % PARTITIONS)
        return None

    def _start_spilling(self, seen: dict[str, int]) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="gptoss-batch-ids-"))
        self._buffers = [array("Q") for _ in range(PARTITIONS)]
        self._seen = None
        for rid, line in seen.items():
            self.add(rid, line)

    def _flush(self, partition: int) -> None:
        assert self._dir is not None
        buf = self._buffers[partition]
        if buf:
            with (self._dir / f"{partition}.bin").open("ab") as f:
                buf.tofile(f)
            self._buffers[partition] = array("Q")

    def finish(self, ids_at: Callable[[set[int]], dict[int, str]]) -> list[Duplicate]:
        """After the pass: the duplicates among spilled ids, in line order. ``ids_at(lines)`` reads the
        ids on those lines again (line -> id), to confirm candidates and name them."""
        if self._dir is None:
            return []  # everything stayed in memory, and add() reported each duplicate as it came
        candidates: dict[int, list[int]] = {}
        for partition in range(PARTITIONS):
            self._flush(partition)
            path = self._dir / f"{partition}.bin"
            if not path.exists():
                continue
            pairs = array("Q")
            pairs.frombytes(path.read_bytes())
            path.unlink()
            repeated = {a for a, b in pairwise(sorted(pairs[0::2])) if a == b}
            if repeated:
                for i in range(0, len(pairs), 2):
                    if pairs[i] in repeated:
                        candidates.setdefault(pairs[i], []).append(pairs[i + 1])
        if not candidates:
            return []
        ids = ids_at({line for lines in candidates.values() for line in lines})
        return sorted((d for lines in candidates.values() for d in _confirmed(lines, ids)),
                      key=lambda d: d.line)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _confirmed(lines: Iterable[int], ids: dict[int, str]) -> list[Duplicate]:
    """Lines whose hashes matched, grouped by the ids really on them: every occurrence after the first."""
    by_id: dict[str, list[int]] = {}
    for line in sorted(lines):
        rid = ids.get(line)
        if rid is not None:
            by_id.setdefault(rid, []).append(line)
    return [Duplicate(line, rid, occ[0]) for rid, occ in by_id.items() for line in occ[1:]]
