"""Reading prompt files: JSONL, OpenAI Batch JSONL and CSV, from files, pipes and stdin."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from gptoss_batch.errors import ConfigError, InputError
from gptoss_batch.inputs import InputOptions, InputSource, open_input, read_rows
from gptoss_batch.records import Row

Method = Literal["check", "rows"]
METHODS: tuple[Method, ...] = ("check", "rows")
GOOD = '{"prompt": "fine"}\n'


def write(tmp_path: Path, content: str | bytes, name: str = "in.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def consume(source: InputSource, method: Method) -> list[Row]:
    if method == "check":
        source.check()
        return []
    return list(source.rows())


def rows_of(tmp_path: Path, content: str | bytes, name: str = "in.jsonl", **options: Any) -> list[Row]:
    return list(open_input(write(tmp_path, content, name), InputOptions(**options)).rows())


class FakeStdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def assert_input_error(exc: InputError, path: str, line: int | None, fragment: str) -> None:
    assert exc.path == path
    assert exc.line == line
    assert str(exc).startswith(f"{path}:{line}: " if line is not None else f"{path}: ")
    assert fragment in exc.message, exc.message


# --- bad input: every case names the file and the line, from check() and rows() alike ---------------------

JSONL_BAD: list[tuple[str, str | bytes, int, str]] = [
    ("malformed_json", GOOD + '{"prompt": "a"\n', 2, "invalid JSON: "),
    ("not_an_object", GOOD + "\n[1, 2]\n", 3, "expected a JSON object, got list"),
    ("a_bare_string", '"hello"\n', 1, "expected a JSON object, got str"),
    ("neither_prompt_nor_messages", GOOD + '{"text": "a"}\n', 2, "row needs 'prompt' or 'messages'"),
    ("both_prompt_and_messages", '{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n', 1,
     "both 'prompt' and 'messages'"),
    ("prompt_not_a_string", '{"prompt": ["a"]}\n', 1, "field 'prompt' must be a string, got list"),
    ("messages_not_a_list", '{"messages": "hi"}\n', 1, "field 'messages' must be a non-empty list"),
    ("messages_empty", '{"messages": []}\n', 1, "field 'messages' must not be empty"),
    ("message_not_an_object", '{"messages": ["hi"]}\n', 1, "messages[0] must be an object, got str"),
    ("message_without_role", '{"messages": [{"content": "hi"}]}\n', 1, "messages[0] needs a string 'role'"),
    ("message_content_a_number", '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}',
     1, "messages[1].content must be a string or a list of parts, got int"),
    ("message_content_missing", '{"messages": [{"role": "user"}]}', 1, "got null"),
    ("max_tokens_a_string", GOOD + '{"prompt": "a", "max_tokens": "ten"}\n', 2,
     "field 'max_tokens' must be an integer, got str"),
    ("max_tokens_a_bool", '{"prompt": "a", "max_tokens": true}\n', 1,
     "field 'max_tokens' must be an integer, got bool"),
    ("temperature_a_string", '{"prompt": "a", "temperature": "hot"}\n', 1,
     "field 'temperature' must be a number, got str"),
    ("top_p_null", '{"prompt": "a", "top_p": null}\n', 1, "field 'top_p' must be a number, got null"),
    ("stop_list_of_numbers", '{"prompt": "a", "stop": [1]}\n', 1, "field 'stop' must be a string or a list of strings"),
    ("seed_a_float", '{"prompt": "a", "seed": 1.5}\n', 1, "field 'seed' must be an integer, got float"),
    ("model_a_number", '{"prompt": "a", "model": 7}\n', 1, "field 'model' must be a string, got int"),
    ("id_a_list", '{"id": [1], "prompt": "a"}\n', 1, "field 'id' must be a string or an integer, got list"),
    ("id_empty", '{"id": "", "prompt": "a"}\n', 1, "field 'id' must not be empty"),
    ("id_and_custom_id", '{"id": "a", "custom_id": "b", "prompt": "a"}\n', 1, "both 'id' and 'custom_id'"),
    ("unknown_route", '{"prompt": "a", "route": "embeddings"}\n', 1, "field 'route' must be 'chat' or 'completions'"),
    ("messages_on_completions_route", '{"messages": [{"role": "user", "content": "a"}], "route": "completions"}', 1,
     "route 'completions' needs 'prompt'"),
    ("invalid_utf8", (GOOD + GOOD).encode() + b'{"prompt": "caf\xe9"}\n', 3, "invalid UTF-8 at byte 16"),
    ("duplicate_id", '{"id": "x", "prompt": "a"}\n\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n', 4,
     "duplicate id 'x' (first seen on line 1)"),
    ("duplicate_int_and_str_id", '{"id": 7, "prompt": "a"}\n{"id": "7", "prompt": "b"}\n', 2,
     "duplicate id '7' (first seen on line 1)"),
    ("duplicate_custom_id_alias", '{"id": "k", "prompt": "a"}\n{"custom_id": "k", "prompt": "b"}\n', 2,
     "duplicate id 'k'"),
    ("line_numbers_count_blank_lines", "\n\n" + GOOD + "\n  \n{}\n", 6, "row needs 'prompt' or 'messages'"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("content", "line", "fragment"), [c[1:] for c in JSONL_BAD], ids=[c[0] for c in JSONL_BAD])
def test_bad_jsonl_row_raises_with_file_and_line(
    tmp_path: Path, method: Method, content: str | bytes, line: int, fragment: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(InputError) as info:
        consume(open_input(path, InputOptions(format="jsonl")), method)
    assert_input_error(info.value, path, line, fragment)


def batch_line(body: Any = None, *, custom_id: Any = "r1", url: Any = "/v1/chat/completions", **extra: Any) -> str:
    obj: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "url": url, **extra}
    if body is not None:
        obj["body"] = body
    return orjson.dumps({k: v for k, v in obj.items() if v is not None}).decode() + "\n"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
BATCH_GOOD = batch_line(CHAT, custom_id="good")

BATCH_BAD: list[tuple[str, str, int, str]] = [
    ("malformed_json", BATCH_GOOD + '{"custom_id": \n', 2, "invalid JSON"),
    ("missing_custom_id", BATCH_GOOD + batch_line(CHAT, custom_id=None), 2, "missing field 'custom_id'"),
    ("custom_id_a_number", batch_line(CHAT, custom_id=5), 1, "field 'custom_id' must be a non-empty string"),
    ("custom_id_empty", batch_line(CHAT, custom_id=""), 1, "field 'custom_id' must be a non-empty string"),
    ("method_get", batch_line(CHAT, method="GET"), 1, "field 'method' must be 'POST'"),
    ("embeddings_url", batch_line({"input": "x"}, url="/v1/embeddings"), 1, "unsupported url '/v1/embeddings'"),
    ("missing_url", batch_line(CHAT, url=None), 1, "missing field 'url'"),
    ("missing_body", batch_line(None), 1, "missing field 'body'"),
    ("body_a_list", batch_line([1]), 1, "field 'body' must be an object, got list"),
    ("chat_body_without_messages", batch_line({"model": "m"}), 1, "needs 'messages'"),
    ("chat_body_with_prompt", batch_line({**CHAT, "prompt": "x"}), 1, "chat requests take 'messages' only"),
    ("chat_body_bad_message", batch_line({"messages": [{"role": 1, "content": "x"}]}), 1,
     "messages[0] needs a string 'role'"),
    ("completions_body_without_prompt", batch_line({"model": "m"}, url="/v1/completions"), 1, "needs 'prompt'"),
    ("completions_body_prompt_not_a_string", batch_line({"prompt": 3}, url="/v1/completions"), 1,
     "field 'prompt' must be a string, got int"),
    ("completions_body_with_messages", batch_line({**CHAT, "prompt": "x"}, url="/v1/completions"), 1,
     "completion requests take 'prompt' only"),
    ("body_override_wrong_type", batch_line({**CHAT, "max_tokens": "ten"}), 1,
     "field 'max_tokens' must be an integer, got str"),
    ("duplicate_custom_id", BATCH_GOOD + "\n" + BATCH_GOOD, 3, "duplicate id 'good' (first seen on line 1)"),
    ("not_an_object", BATCH_GOOD + "3\n", 2, "expected a JSON object, got int"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("content", "line", "fragment"), [c[1:] for c in BATCH_BAD], ids=[c[0] for c in BATCH_BAD])
def test_bad_batch_row_raises_with_file_and_line(
    tmp_path: Path, method: Method, content: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(InputError) as info:
        consume(open_input(path, InputOptions(format="batch")), method)
    assert_input_error(info.value, path, line, fragment)


CSV_BAD: list[tuple[str, bytes, dict[str, Any], int, str]] = [
    ("missing_prompt_column", b"id,text\n1,hello\n", {}, 1, "no prompt column 'prompt' (columns: 'id', 'text')"),
    ("missing_named_prompt_column", b"id,text\n1,hello\n", {"prompt_column": "body"}, 1,
     "no prompt column 'body' (columns: 'id', 'text')"),
    ("template_names_missing_column", b"id,title\n1,a\n", {"template": "{title}: {body}"}, 1,
     "template names column 'body'"),
    ("missing_id_column", b"key,prompt\n1,a\n", {"id_column": "ref"}, 1, "no id column 'ref'"),
    ("duplicated_prompt_column", b"prompt,prompt\na,b\n", {}, 1, "appears more than once"),
    ("too_many_fields", b"id,prompt\n1,a\n2,b,c\n", {}, 3, "expected 2 fields as in the header, got 3"),
    ("too_few_fields", b"id,prompt\n\n1,a\n2\n", {}, 4, "expected 2 fields as in the header, got 1"),
    ("duplicate_id", b"id,prompt\n1,a\n2,b\n1,c\n", {}, 4, "duplicate id '1' (first seen on line 2)"),
    ("invalid_utf8", b"id,prompt\n1,a\n2,caf\xe9\n", {}, 3, "invalid UTF-8 at byte 6"),
    ("invalid_utf8_in_header", b"id,pr\xffompt\n1,a\n", {}, 1, "invalid UTF-8"),
    ("unterminated_quote", b'id,prompt\n1,a\n2,"open\nstill open\n', {}, 3, "malformed CSV"),
    ("text_after_closing_quote", b'id,prompt\n1,"a"b\n', {}, 2, "malformed CSV"),
    ("template_format_spec_mismatch", b"id,n\n1,5\n", {"template": "{n:d}"}, 2, "template cannot be filled"),
    ("error_line_is_where_a_multiline_record_starts", b'id,prompt\n1,"a\nb"\n2\n', {}, 4, "got 1"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("content", "options", "line", "fragment"), [c[1:] for c in CSV_BAD],
                         ids=[c[0] for c in CSV_BAD])
def test_bad_csv_raises_with_file_and_line(
    tmp_path: Path, method: Method, content: bytes, options: dict[str, Any], line: int, fragment: str
) -> None:
    path = write(tmp_path, content, "in.csv")
    with pytest.raises(InputError) as info:
        consume(open_input(path, InputOptions(**options)), method)
    assert_input_error(info.value, path, line, fragment)


def test_csv_header_problems_are_reported_when_the_file_is_opened(tmp_path: Path) -> None:
    path = write(tmp_path, b"id,text\n1,a\n", "in.csv")
    with pytest.raises(InputError, match="no prompt column"):
        open_input(path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n  \n\r\n"),
    ("bom_only.jsonl", b"\xef\xbb\xbf"),
    ("batch.jsonl", b"\n"),
    ("empty.csv", b""),
    ("header_only.csv", b"id,prompt\n\n"),
])
def test_input_without_rows_is_an_error(tmp_path: Path, method: Method, name: str, content: bytes) -> None:
    path = write(tmp_path, content, name)
    with pytest.raises(InputError) as info:
        consume(open_input(path, InputOptions(on_invalid="skip")), method)
    assert_input_error(info.value, path, None, "file has no rows")


@pytest.mark.parametrize("path", ["missing.jsonl", "missing.csv"])
def test_missing_file_is_an_input_error(tmp_path: Path, path: str) -> None:
    with pytest.raises(InputError, match="cannot read: No such file"):
        open_input(str(tmp_path / path))


def test_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        open_input(str(tmp_path))


# --- on_invalid="skip" -----------------------------------------------------------------------------------


def test_skip_yields_invalid_rows_with_messages_and_keeps_going(tmp_path: Path) -> None:
    content = (b'{"id": "a", "prompt": "one"}\n'
               b"not json\n"
               b"\n"
               b'{"id": "a", "prompt": "dup"}\n'
               b'{"prompt": "caf\xe9"}\n'
               b'{"prompt": "last", "max_tokens": 3}\n')
    path = write(tmp_path, content)
    source = open_input(path, InputOptions(on_invalid="skip"))
    rows = list(source.rows())
    assert [(r.index, r.line) for r in rows] == [(0, 1), (1, 2), (2, 4), (3, 5), (4, 6)]
    assert [r.invalid is None for r in rows] == [True, False, False, False, True]
    assert rows[1].invalid is not None and rows[1].invalid.startswith("invalid JSON")
    assert rows[2].invalid == "duplicate id 'a' (first seen on line 1)"
    assert rows[3].invalid is not None and "invalid UTF-8" in rows[3].invalid
    # Invalid rows never reuse an explicit id: theirs is derived, so results cannot collide.
    assert rows[2].id.startswith("row2-") and not rows[2].explicit_id and rows[2].payload == {}
    assert rows[4].payload == {"prompt": "last", "max_tokens": 3}
    assert source.check() == 5


def test_skip_in_csv_marks_bad_records_and_keeps_going(tmp_path: Path) -> None:
    path = write(tmp_path, b"id,prompt\n1,a\n2,b,extra\n3,caf\xe9\n1,again\n4,d\n", "in.csv")
    source = open_input(path, InputOptions(on_invalid="skip"))
    rows = list(source.rows())
    assert [r.id for r in rows if r.invalid is None] == ["1", "4"]
    messages = [r.invalid for r in rows if r.invalid]
    assert messages[0] == "expected 2 fields as in the header, got 3"
    assert messages[1] is not None and messages[1].startswith("invalid UTF-8")
    assert messages[2] == "duplicate id '1' (first seen on line 2)"
    assert source.check() == 5


def test_skip_in_batch_marks_bad_requests_and_keeps_going(tmp_path: Path) -> None:
    content = BATCH_GOOD + batch_line({"input": "x"}, custom_id="e", url="/v1/embeddings") + batch_line(
        {"prompt": "p"}, custom_id="c", url="/completions")
    rows = rows_of(tmp_path, content, on_invalid="skip")
    assert [(r.id, r.route, r.invalid is None) for r in rows] == [
        ("good", "chat", True), (rows[1].id, None, False), ("c", "completions", True)]
    assert rows[1].invalid is not None and "unsupported url" in rows[1].invalid


def test_skip_still_stops_at_a_csv_quoting_error(tmp_path: Path) -> None:
    path = write(tmp_path, b'id,prompt\n1,"a"b\n2,c\n', "in.csv")
    with pytest.raises(InputError, match="malformed CSV"):
        list(open_input(path, InputOptions(on_invalid="skip")).rows())


# --- payloads and routes ---------------------------------------------------------------------------------


def test_jsonl_payload_is_the_row_without_id_and_route(tmp_path: Path) -> None:
    content = ('{"id": 12, "prompt": "p", "max_tokens": 5, "temperature": 0, "top_p": 0.9, "stop": ["x"], '
               '"seed": 1, "model": "m", "logprobs": true, "route": "completions"}\n'
               '{"custom_id": "c", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, '
               '{"role": "assistant", "content": null, "tool_calls": []}], "stop": "END"}\n')
    first, second = rows_of(tmp_path, content)
    assert first == Row("12", 0, 1, {"prompt": "p", "max_tokens": 5, "temperature": 0, "top_p": 0.9,
                                     "stop": ["x"], "seed": 1, "model": "m", "logprobs": True},
                        "completions", True)
    assert second.id == "c" and second.explicit_id and second.route is None
    assert "custom_id" not in second.payload and second.payload["stop"] == "END"


def test_prompt_row_may_pick_the_chat_route(tmp_path: Path) -> None:
    (row,) = rows_of(tmp_path, '{"prompt": "p", "route": "chat"}\n')
    assert row.route == "chat" and row.payload == {"prompt": "p"}


@pytest.mark.parametrize(("url", "route"), [
    ("/v1/chat/completions", "chat"), ("/chat/completions", "chat"),
    ("/v1/completions", "completions"), ("/completions", "completions"),
])
def test_batch_url_picks_the_route_and_body_is_the_payload(tmp_path: Path, url: str, route: str) -> None:
    body = CHAT if route == "chat" else {"model": "m", "prompt": "p", "max_tokens": 4}
    (row,) = rows_of(tmp_path, batch_line(body, custom_id="req-1", url=url), format="batch")
    assert row == Row("req-1", 0, 1, body, route, True)  # type: ignore[arg-type]


def test_csv_payload_is_a_prompt_and_leaves_the_route_open(tmp_path: Path) -> None:
    (row,) = rows_of(tmp_path, "id,prompt,extra\nq1,hello,ignored\n", "in.csv")
    assert row == Row("q1", 0, 2, {"prompt": "hello"}, None, True)


def test_csv_prompt_column_option_picks_the_column(tmp_path: Path) -> None:
    (row,) = rows_of(tmp_path, "question,prompt\nasked,unused\n", "in.csv", prompt_column="question")
    assert row.payload == {"prompt": "asked"}


def test_csv_header_names_are_trimmed(tmp_path: Path) -> None:
    (row,) = rows_of(tmp_path, "id, prompt\n1, hi\n", "in.csv")
    assert row.payload == {"prompt": " hi"}


def test_csv_records_may_span_lines_and_keep_their_start_line(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, 'id,prompt\n1,"first\nsecond"\n\n2,"x ""quoted"""\n3,plain\n', "in.csv")
    assert [(r.id, r.line, r.index, r.payload["prompt"]) for r in rows] == [
        ("1", 2, 0, "first\nsecond"), ("2", 5, 1, 'x "quoted"'), ("3", 6, 2, "plain")]


def test_csv_fields_larger_than_the_csv_module_default_are_read(tmp_path: Path) -> None:
    big = "x" * 300_000
    (row,) = rows_of(tmp_path, f"prompt\n{big}\n", "in.csv")
    assert row.payload["prompt"] == big


# --- templates -------------------------------------------------------------------------------------------


def test_template_fills_placeholders_from_columns(tmp_path: Path) -> None:
    content = 'title,body,n\nNews,"Line one\nline two",7\n'
    (row,) = rows_of(tmp_path, content, "in.csv", template="Summarise {title}: {body} [{n:>3}] {{literal}}")
    assert row.payload == {"prompt": "Summarise News: Line one\nline two [  7] {literal}"}


@pytest.mark.parametrize("template", ["{}", "{0}", "{title.upper}", "{title[0]}", "{title", "}"])
def test_template_that_cannot_name_columns_is_a_config_error(template: str) -> None:
    with pytest.raises(ConfigError, match="template"):
        InputOptions(template=template)


@pytest.mark.parametrize("options", [
    {"template": "{prompt}", "prompt_column": "prompt"},
    {"format": "xml"},
    {"on_invalid": "ignore"},
])
def test_contradictory_or_unknown_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        InputOptions(**options)


@pytest.mark.parametrize("option", ["template", "prompt_column", "id_column"])
def test_csv_only_options_on_json_input_are_config_errors(tmp_path: Path, option: str) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="apply to CSV input"):
        open_input(path, InputOptions(**{option: "prompt"}))  # type: ignore[arg-type]


# --- ids -------------------------------------------------------------------------------------------------


def test_derived_ids_are_stable_across_runs(tmp_path: Path) -> None:
    content = GOOD + '{"prompt": "other"}\n'
    first = [r.id for r in rows_of(tmp_path, content)]
    again = [r.id for r in rows_of(tmp_path, content)]
    assert first == again
    assert first[0].startswith("row0-") and first[1].startswith("row1-")
    assert all(len(i.split("-")[1]) == 8 for i in first)


def test_derived_id_changes_when_the_content_changes(tmp_path: Path) -> None:
    before = rows_of(tmp_path, GOOD + '{"prompt": "other"}\n')
    after = rows_of(tmp_path, GOOD + '{"prompt": "edited"}\n')
    assert before[0].id == after[0].id
    assert before[1].id != after[1].id


def test_derived_id_ignores_line_endings(tmp_path: Path) -> None:
    lf = rows_of(tmp_path, GOOD + GOOD)
    crlf = rows_of(tmp_path, (GOOD + GOOD).replace("\n", "\r\n"))
    assert [r.id for r in lf] == [r.id for r in crlf]


def test_derived_id_depends_on_position(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, GOOD + GOOD)
    assert rows[0].id != rows[1].id and rows[0].id.split("-")[1] == rows[1].id.split("-")[1]


def test_blank_lines_do_not_shift_derived_ids(tmp_path: Path) -> None:
    assert [r.id for r in rows_of(tmp_path, GOOD + GOOD)] == [r.id for r in rows_of(tmp_path, GOOD + "\n" + GOOD)]


def test_mixed_explicit_and_derived_ids(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, '{"id": "a", "prompt": "x"}\n' + GOOD)
    assert [(r.id, r.explicit_id) for r in rows] == [("a", True), (rows[1].id, False)]
    assert rows[1].id.startswith("row1-")


@pytest.mark.parametrize(("header", "options", "expected"), [
    ("id,prompt", {}, ["k1", "k2"]),
    ("custom_id,prompt", {}, ["k1", "k2"]),
    ("ref,prompt", {"id_column": "ref"}, ["k1", "k2"]),
    ("ref,prompt", {}, None),
])
def test_csv_id_column(tmp_path: Path, header: str, options: dict[str, Any], expected: list[str] | None) -> None:
    rows = rows_of(tmp_path, f"{header}\nk1,a\nk2,b\n", "in.csv", **options)
    if expected is None:
        assert [r.explicit_id for r in rows] == [False, False]
        assert rows[0].id.startswith("row0-") and rows[1].id.startswith("row1-")
    else:
        assert [r.id for r in rows] == expected and all(r.explicit_id for r in rows)


def test_csv_empty_id_cell_gets_a_derived_id(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, "id,prompt\n,a\n,b\n", "in.csv")
    assert [r.explicit_id for r in rows] == [False, False] and rows[0].id != rows[1].id


def test_csv_derived_id_changes_with_content(tmp_path: Path) -> None:
    (a,) = rows_of(tmp_path, "prompt\nhello\n", "in.csv")
    (b,) = rows_of(tmp_path, "prompt\nhello!\n", "in.csv")
    (c,) = rows_of(tmp_path, "prompt\r\nhello\r\n", "in.csv")
    assert a.id != b.id and a.id == c.id


# --- line endings and BOM --------------------------------------------------------------------------------


def test_crlf_jsonl(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, b'{"id": "a", "prompt": "x"}\r\n\r\n{"prompt": "y"}\r\n')
    assert [(r.line, r.payload) for r in rows] == [(1, {"prompt": "x"}), (3, {"prompt": "y"})]


def test_crlf_csv(tmp_path: Path) -> None:
    rows = rows_of(tmp_path, b'id,prompt\r\n1,"two\r\nlines"\r\n2,b\r\n', "in.csv")
    assert [(r.id, r.line, r.payload["prompt"]) for r in rows] == [("1", 2, "two\r\nlines"), ("2", 4, "b")]


@pytest.mark.parametrize(("name", "content", "format"), [
    ("in.jsonl", b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\n', "jsonl"),
    ("in.jsonl", b"\xef\xbb\xbf" + BATCH_GOOD.encode(), "batch"),
    ("in.csv", b"\xef\xbb\xbfid,prompt\nz,x\n", "csv"),
    ("in.txt", b"\xef\xbb\xbfid,prompt\nz,x\n", "csv"),
])
def test_utf8_bom_at_file_start_is_tolerated(tmp_path: Path, name: str, content: bytes, format: str) -> None:
    source = open_input(write(tmp_path, content, name))
    assert source.format == format
    (row,) = source.rows()
    assert row.line == 1 + (format == "csv") and row.invalid is None
    assert row.id in ("a", "good", "z")


# --- auto-detection --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "options", "expected"), [
    ("in.jsonl", GOOD, {}, "jsonl"),
    ("in.json", GOOD, {}, "jsonl"),
    ("in.ndjson", GOOD, {}, "jsonl"),
    ("in.jsonl", BATCH_GOOD, {}, "batch"),
    ("in.JSONL", "\n\n" + BATCH_GOOD, {}, "batch"),
    ("in.jsonl", '{"custom_id": "a", "prompt": "x"}\n', {}, "jsonl"),
    ("in.csv", "prompt\nx\n", {}, "csv"),
    ("in.CSV", "prompt\nx\n", {}, "csv"),
    ("in.txt", "prompt\nx\n", {}, "csv"),
    ("noext", "  " + GOOD, {}, "jsonl"),
    ("noext", BATCH_GOOD, {}, "batch"),
    ("in.jsonl", "not json\n", {}, "jsonl"),
    ("in.jsonl", BATCH_GOOD, {"format": "jsonl"}, "jsonl"),
    ("in.txt", "prompt\nx\n", {"format": "csv"}, "csv"),
    ("in.data", BATCH_GOOD, {"format": "batch"}, "batch"),
])
def test_format_detection(tmp_path: Path, name: str, content: str, options: dict[str, Any], expected: str) -> None:
    assert open_input(write(tmp_path, content, name), InputOptions(**options)).format == expected


def test_csv_guessed_from_content_says_so_when_the_prompt_column_is_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "just a line of text\n", "prompts.txt")
    with pytest.raises(InputError, match="read as CSV because the first line is not a JSON object"):
        open_input(path)


# --- stdin and pipes -------------------------------------------------------------------------------------


def test_stdin_streams_rows_without_losing_the_peeked_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(("\n" + BATCH_GOOD + batch_line(CHAT, custom_id="b")).encode()))
    source = open_input("-")
    assert source.format == "batch" and source.single_pass
    assert [(r.id, r.line) for r in source.rows()] == [("good", 2), ("b", 3)]


@pytest.mark.parametrize(("data", "options", "expected"), [
    (b'{"prompt": "x"}\n', {}, "jsonl"),
    (b"\xef\xbb\xbf" + BATCH_GOOD.encode(), {}, "batch"),
    (b"id,prompt\n1,x\n", {}, "csv"),
    (b"id,prompt\n1,x\n", {"format": "csv"}, "csv"),
])
def test_stdin_format_detection_uses_the_first_non_blank_line(
    monkeypatch: pytest.MonkeyPatch, data: bytes, options: dict[str, Any], expected: str
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    source = open_input("-", InputOptions(**options))
    assert source.format == expected
    (row,) = source.rows()
    assert row.invalid is None and row.payload["prompt" if expected != "batch" else "messages"]


def test_stdin_has_no_check_or_fingerprint_and_reads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(GOOD.encode()))
    source = open_input("-")
    assert source.check() is None and source.fingerprint() is None
    assert len(list(source.rows())) == 1
    with pytest.raises(InputError, match="read only once"):
        list(source.rows())


@pytest.mark.parametrize(("data", "fmt", "line", "fragment"), [
    (b'{"prompt": "x"}\n{"prompt": 1}\n', "auto", 2, "field 'prompt' must be a string"),
    (b'{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "auto", 2, "first seen on line 1"),
    (b"id,prompt\n1,x\n2\n", "csv", 3, "got 1"),
])
def test_stdin_is_validated_as_it_streams(
    monkeypatch: pytest.MonkeyPatch, data: bytes, fmt: Literal["auto", "csv"], line: int, fragment: str
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    with pytest.raises(InputError) as info:
        list(open_input("-", InputOptions(format=fmt)).rows())
    assert_input_error(info.value, "<stdin>", line, fragment)


def test_empty_stdin_has_no_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"\n"))
    with pytest.raises(InputError, match="<stdin>: input has no rows"):
        list(open_input("-").rows())


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_a_pipe_path_is_read_once_like_stdin() -> None:
    """A shell's <(zcat prompts.jsonl.gz) hands over /dev/fd/N: peeking must not lose its first line."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b'{"prompt": "a"}\n{"prompt": "b"}\n')
        os.close(write_fd)
        source = open_input(f"/dev/fd/{read_fd}")
        assert source.single_pass and source.check() is None and source.fingerprint() is None
        assert [r.payload["prompt"] for r in source.rows()] == ["a", "b"]
    finally:
        os.close(read_fd)


# --- check() and fingerprint() ---------------------------------------------------------------------------


def test_check_counts_rows_and_agrees_with_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join(f'{{"id": "{i}", "prompt": "p{i}"}}' for i in range(50)) + "\n\n")
    source = open_input(path)
    assert source.check() == 50 == len(list(source.rows()))


def test_fingerprint_hashes_head_and_tail_and_reports_the_checked_count(tmp_path: Path) -> None:
    line = '{"prompt": "' + "x" * 1000 + '"}\n'
    path = write(tmp_path, line * 200)
    source = open_input(path)
    before = source.fingerprint()
    assert before is not None and before["rows"] is None and before["size"] == len(line) * 200
    assert source.check() == 200
    after = source.fingerprint()
    assert after == {**before, "rows": 200}
    Path(path).write_bytes((line * 200)[:-3].encode() + b'y"}\n')
    changed = open_input(path).fingerprint()
    assert changed is not None
    assert changed["head_sha256"] == before["head_sha256"] and changed["tail_sha256"] != before["tail_sha256"]


def test_fingerprint_of_a_small_file_uses_the_whole_file_for_both_hashes(tmp_path: Path) -> None:
    fp = open_input(write(tmp_path, GOOD)).fingerprint()
    assert fp is not None and fp["head_sha256"] == fp["tail_sha256"] and fp["size"] == len(GOOD)


def test_read_rows_is_open_input_then_rows(tmp_path: Path) -> None:
    assert [r.payload for r in read_rows(write(tmp_path, GOOD))] == [{"prompt": "fine"}]


def test_rows_stream_lazily(tmp_path: Path) -> None:
    """The first row arrives before a bad row further down is read."""
    rows = open_input(write(tmp_path, GOOD + "broken\n")).rows()
    assert next(rows).payload == {"prompt": "fine"}
    with pytest.raises(InputError, match=":2: invalid JSON"):
        next(rows)


# --- memory ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, n: int) -> None:
    with path.open("wb") as f:
        f.writelines(b'{"prompt": "Tell me about the number %d", "max_tokens": 64}\n' % i for i in range(n))


def _peak_bytes_while_streaming(path: Path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = 0
        for row in open_input(str(path)).rows():
            count += row.index >= 0
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rows_memory_stays_flat_as_the_file_grows(tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    _write_jsonl(small, 10_000)
    _write_jsonl(large, 300_000)
    started = time.perf_counter()
    n_small, peak_small = _peak_bytes_while_streaming(small)
    n_large, peak_large = _peak_bytes_while_streaming(large)
    assert (n_small, n_large) == (10_000, 300_000)
    assert peak_large < 5 * 1024 * 1024
    assert peak_large <= 1.2 * peak_small + 64 * 1024, (peak_small, peak_large)
    assert time.perf_counter() - started < 30


def test_a_slow_writer_on_stdin_is_streamed_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows arrive while stdin is still open: nothing waits for EOF."""
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": reader})())
    os.write(write_fd, GOOD.encode())
    try:
        rows = open_input("-").rows()
        assert next(rows).payload == {"prompt": "fine"}

        def write_later() -> None:
            os.write(write_fd, b'{"prompt": "later"}\n')
            os.close(write_fd)

        writer = threading.Thread(target=write_later)
        writer.start()
        assert next(rows).payload == {"prompt": "later"}
        assert list(rows) == []
        writer.join()
    finally:
        reader.close()
