"""The duplicate-id check keeps working, with the same messages, once the ids no longer fit in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptoss_batch import duplicates
from gptoss_batch.duplicates import IdCheck
from gptoss_batch.errors import InputError
from gptoss_batch.inputs import InputOptions, open_input


@pytest.fixture(autouse=True)
def small_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spill after 5 ids, so a 60-row file takes the on-disk path."""
    monkeypatch.setattr(duplicates, "SPILL_AFTER_IDS", 5)


def jsonl(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f'{{"id": "{i}", "prompt": "p"}}\n' for i in ids))
    return path


def test_a_duplicate_past_the_memory_bound_fails_the_check_at_its_line(tmp_path: Path) -> None:
    ids = [f"r{n}" for n in range(60)]
    ids[41] = "r2"  # line 42 repeats line 3
    source = open_input(str(jsonl(tmp_path / "in.jsonl", ids)))
    with pytest.raises(InputError) as err:
        source.check()
    assert err.value.line == 42
    assert "duplicate id 'r2' (first seen on line 3)" in str(err.value)


def test_the_earliest_duplicate_is_reported_when_there_are_several(tmp_path: Path) -> None:
    ids = [f"r{n}" for n in range(60)]
    ids[50], ids[30] = "r1", "r7"
    with pytest.raises(InputError) as err:
        open_input(str(jsonl(tmp_path / "in.jsonl", ids))).check()
    assert err.value.line == 31 and "duplicate id 'r7' (first seen on line 8)" in str(err.value)


def test_with_skip_the_rows_after_the_check_mark_spilled_duplicates_invalid(tmp_path: Path) -> None:
    ids = [f"r{n}" for n in range(60)]
    ids[2] = "r1"  # found while the ids are still in memory
    ids[41] = "r4"  # found after the pass, among the spilled ids
    source = open_input(str(jsonl(tmp_path / "in.jsonl", ids)), InputOptions(on_invalid="skip"))
    assert source.check() == 60
    invalid = {row.line: row.invalid for row in source.rows() if row.invalid}
    assert invalid == {3: "duplicate id 'r1' (first seen on line 2)", 42: "duplicate id 'r4' (first seen on line 5)"}


def test_csv_duplicates_past_the_memory_bound_name_the_record_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,prompt\n" + "".join(f"k{n},p\n" for n in range(40)) + "k5,again\n")
    with pytest.raises(InputError) as err:
        open_input(str(path)).check()
    assert err.value.line == 42 and "duplicate id 'k5' (first seen on line 7)" in str(err.value)


def test_equal_hashes_are_not_duplicates_unless_the_ids_are_equal(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duplicates, "hash", lambda _: 42, raising=False)  # every id collides
    source = open_input(str(jsonl(tmp_path / "in.jsonl", [f"r{n}" for n in range(30)])))
    assert source.check() == 30


def test_unique_ids_pass_and_the_spill_files_are_removed(tmp_path: Path) -> None:
    check = IdCheck(spill=True)
    for n in range(50):
        assert check.add(f"id{n}", n + 1) is None
    assert check.spilled
    spill_dir = check._dir
    assert spill_dir is not None and spill_dir.exists()
    assert check.finish(lambda lines: {}) == []
    check.close()
    assert not spill_dir.exists()


def test_a_stream_keeps_every_id_in_memory_and_reports_duplicates_at_once() -> None:
    check = IdCheck(spill=False)
    for n in range(50):
        check.add(f"id{n}", n + 1)
    assert not check.spilled
    assert check.add("id3", 51) == 4
