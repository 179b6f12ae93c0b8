"""Input files as a stream of rows: plain JSONL, OpenAI Batch JSONL and CSV, from a file or stdin.

Files are read line by line in binary mode, so memory stays flat whatever their size; ``check()`` is the
fast validating first pass and ``rows()`` the stream the runner consumes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from string import Formatter
from typing import Any, BinaryIO, Final, Literal, cast

import orjson

from .duplicates import Duplicate, IdCheck
from .errors import ConfigError, InputError
from .records import Route, Row

InputFormat = Literal["auto", "jsonl", "batch", "csv"]
ResolvedFormat = Literal["jsonl", "batch", "csv"]
OnInvalid = Literal["error", "skip"]

STDIN_PATH: Final = "-"
STDIN_NAME: Final = "<stdin>"
FINGERPRINT_CHUNK_BYTES: Final = 64 * 1024
# Prompts for long-context models easily pass csv's default 128 KiB field limit; 2**31 - 1 fits a C long
# everywhere (sys.maxsize overflows on Windows).
CSV_FIELD_LIMIT_CHARS: Final = 2**31 - 1

_BOM: Final = b"\xef\xbb\xbf"
_JSON_EXTENSIONS: Final = frozenset({".jsonl", ".json", ".ndjson"})
_ROUTES: Final = ("chat", "completions")
_BATCH_URLS: Final[dict[str, Route]] = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completions",
}


@dataclass(frozen=True, slots=True)
class InputOptions:
    format: InputFormat = "auto"
    prompt_column: str | None = None  # CSV: column holding the prompt (default: "prompt")
    template: str | None = None  # CSV: "Summarise {title}: {body}", filled from the row's columns
    id_column: str | None = None  # CSV: column holding the id (default: "id", else "custom_id")
    on_invalid: OnInvalid = "error"

    def __post_init__(self) -> None:
        if self.format not in ("auto", "jsonl", "batch", "csv"):
            raise ConfigError(f"unknown input format {self.format!r} (choose auto, jsonl, batch or csv)")
        if self.on_invalid not in ("error", "skip"):
            raise ConfigError(f"on_invalid must be 'error' or 'skip', got {self.on_invalid!r}")
        if self.template is not None and self.prompt_column is not None:
            raise ConfigError("give either a prompt column or a template, not both")
        if self.template is not None:
            _template_columns(self.template)


class _Invalid(Exception):
    """A row that cannot be used; the scanner adds the file and line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# Row validation: pure functions of one parsed line. Hot path, so plain type() checks and no regexes.


def _tname(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(v: object) -> bool:
    return type(v) is int  # orjson gives bool its own type, so True is not an int here


def _is_number(v: object) -> bool:
    return type(v) is int or type(v) is float


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_stop(v: object) -> bool:
    return type(v) is str or (type(v) is list and all(type(s) is str for s in v))


# Typed per-row overrides; any other field is passed to the server as-is.
_FIELD_CHECKS: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "max_tokens": (_is_int, "an integer"),
    "max_completion_tokens": (_is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "stop": (_is_stop, "a string or a list of strings"),
    "seed": (_is_int, "an integer"),
    "model": (_is_str, "a string"),
}


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(_json_error(raw, exc)) from None


def _json_error(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as uexc:
        return f"invalid UTF-8 at byte {uexc.start + 1} of the line"
    return f"invalid JSON: {exc.msg} (column {exc.colno})"


def _check_messages(messages: object) -> None:
    if type(messages) is not list or not messages:
        raise _Invalid(f"field 'messages' must be a non-empty list of messages, got {_tname(messages)}"
                       if type(messages) is not list else "field 'messages' must not be empty")
    for i, m in enumerate(messages):
        if type(m) is not dict:
            raise _Invalid(f"messages[{i}] must be an object, got {_tname(m)}")
        if type(m.get("role")) is not str:
            raise _Invalid(f"messages[{i}] needs a string 'role', got {_tname(m.get('role'))}")
        content = m.get("content")
        if type(content) is not str and type(content) is not list:
            # An assistant turn that only calls tools legitimately has no content.
            if content is None and "tool_calls" in m:
                continue
            raise _Invalid(f"messages[{i}].content must be a string or a list of parts, got {_tname(content)}")


def _check_fields(body: dict[str, Any]) -> None:
    for key in body:
        check = _FIELD_CHECKS.get(key)
        if check is not None and not check[0](body[key]):
            raise _Invalid(f"field {key!r} must be {check[1]}, got {_tname(body[key])}")


def _check_request(body: dict[str, Any], route: Route | None) -> None:
    """A plain JSONL row: ``prompt`` or ``messages``; a prompt may go to either route, messages to chat."""
    if "prompt" in body:
        if "messages" in body:
            raise _Invalid("row has both 'prompt' and 'messages'; give one")
        if type(body["prompt"]) is not str:
            raise _Invalid(f"field 'prompt' must be a string, got {_tname(body['prompt'])}")
    elif "messages" in body:
        _check_messages(body["messages"])
        if route == "completions":
            raise _Invalid("route 'completions' needs 'prompt', not 'messages'")
    else:
        raise _Invalid("row needs 'prompt' or 'messages'")
    _check_fields(body)


def _parse_jsonl(raw: bytes) -> tuple[str | None, dict[str, Any], Route | None]:
    obj = _loads(raw)
    if type(obj) is not dict:
        raise _Invalid(f"expected a JSON object, got {_tname(obj)}")
    rid = obj.pop("id", None)
    custom_id = obj.pop("custom_id", None)
    if custom_id is not None:
        if rid is not None:
            raise _Invalid("row has both 'id' and 'custom_id'; give one")
        rid = custom_id
    if rid is not None:
        if type(rid) is int:
            rid = str(rid)
        elif type(rid) is not str:
            raise _Invalid(f"field 'id' must be a string or an integer, got {_tname(rid)}")
        elif not rid:
            raise _Invalid("field 'id' must not be empty")
    route = obj.pop("route", None)
    if route is not None and route not in _ROUTES:
        raise _Invalid(f"field 'route' must be 'chat' or 'completions', got {route!r}")
    _check_request(obj, route)
    return rid, obj, route


def _parse_batch(raw: bytes) -> tuple[str | None, dict[str, Any], Route | None]:
    obj = _loads(raw)
    if type(obj) is not dict:
        raise _Invalid(f"expected a JSON object, got {_tname(obj)}")
    custom_id = obj.get("custom_id")
    if type(custom_id) is not str or not custom_id:
        raise _Invalid("missing field 'custom_id'" if custom_id is None
                       else f"field 'custom_id' must be a non-empty string, got {custom_id!r}")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Invalid(f"field 'method' must be 'POST', got {method!r}")
    url = obj.get("url")
    if url is None:
        raise _Invalid("missing field 'url'")
    route = _BATCH_URLS.get(url) if type(url) is str else None
    if route is None:
        raise _Invalid(f"unsupported url {url!r} (supported: /v1/chat/completions, /v1/completions)")
    body = obj.get("body")
    if type(body) is not dict:
        raise _Invalid("missing field 'body'" if body is None
                       else f"field 'body' must be an object, got {_tname(body)}")
    # The Batch API sends each body to its url verbatim, so the body must suit that endpoint.
    if route == "chat":
        if "messages" not in body:
            raise _Invalid(f"body for {url} needs 'messages'")
        if "prompt" in body:
            raise _Invalid(f"body for {url} has 'prompt'; chat requests take 'messages' only")
        _check_messages(body["messages"])
    else:
        if "prompt" not in body:
            raise _Invalid(f"body for {url} needs 'prompt'")
        if "messages" in body:
            raise _Invalid(f"body for {url} has 'messages'; completion requests take 'prompt' only")
        if type(body["prompt"]) is not str:
            raise _Invalid(f"field 'prompt' must be a string, got {_tname(body['prompt'])}")
    _check_fields(body)
    return custom_id, body, route


def _derived_id(index: int, content: bytes) -> str:
    """The id of a row without one: its position plus a hash of its content, so an edited input shows."""
    return f"row{index}-{hashlib.blake2b(content.rstrip(), digest_size=8).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------------------
# CSV


def _template_columns(template: str) -> list[str]:
    """The column names a template fills; ConfigError for a template that cannot work on any file."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"invalid template {template!r}: {exc}") from None
    names: list[str] = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if not field_name or field_name.isdigit() or "." in field_name or "[" in field_name:
            raise ConfigError(f"template placeholder {{{field_name}}} must name a CSV column, like {{title}}")
        names.append(field_name)
    return names


@dataclass(frozen=True, slots=True)
class _CsvPlan:
    """How to turn one CSV record into a prompt and an id, resolved from the header."""

    header: tuple[str, ...]
    prompt_index: int | None
    template: str | None
    id_index: int | None

    def prompt(self, rec: list[str]) -> str:
        if self.template is None:
            return rec[cast(int, self.prompt_index)]
        try:
            return self.template.format_map(dict(zip(self.header, rec, strict=True)))
        except (KeyError, ValueError, IndexError) as exc:
            raise _Invalid(f"template cannot be filled: {exc}") from None


def _csv_plan(header_row: list[str], options: InputOptions, path: str, line: int, *,
              guessed: bool = False) -> _CsvPlan:
    header = tuple(name.strip() for name in header_row)
    available = ", ".join(repr(name) for name in header)

    def index_of(column: str, what: str) -> int:
        if header.count(column) > 1:
            raise InputError(path, line, f"{what} column {column!r} appears more than once in the header")
        return header.index(column)

    prompt_index: int | None = None
    if options.template is not None:
        for column in _template_columns(options.template):
            if column not in header:
                raise InputError(path, line, f"template names column {column!r}, which the header lacks "
                                             f"(columns: {available})")
            index_of(column, "template")
    else:
        column = options.prompt_column or "prompt"
        if column not in header:
            how = "" if options.prompt_column else "; choose one with --prompt-column or use --template"
            if guessed:
                how += "; read as CSV because the first line is not a JSON object (--format decides)"
            raise InputError(path, line, f"no prompt column {column!r} (columns: {available}){how}")
        prompt_index = index_of(column, "prompt")
    id_index: int | None = None
    if options.id_column is not None:
        if options.id_column not in header:
            raise InputError(path, line, f"no id column {options.id_column!r} (columns: {available})")
        id_index = index_of(options.id_column, "id")
    elif "id" in header:
        id_index = index_of("id", "id")
    elif "custom_id" in header:
        id_index = index_of("custom_id", "id")
    return _CsvPlan(header, prompt_index, options.template, id_index)


# ---------------------------------------------------------------------------------------------------------
# Files


@contextmanager
def _os_errors(name: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise InputError(name, None, f"cannot read: {exc.strerror or exc}") from exc


def _strip_bom(first: bytes) -> bytes:
    return first[len(_BOM):] if first.startswith(_BOM) else first


def _peek(stream: Iterable[bytes]) -> tuple[list[bytes], bytes | None]:
    """Lines up to and including the first non-blank one (BOM removed), and that line (None at EOF)."""
    lines: list[bytes] = []
    for raw in stream:
        if not lines:
            raw = _strip_bom(raw)
        lines.append(raw)
        if raw and not raw.isspace():
            return lines, raw
    return lines, None


def _detect(extension: str, first: bytes | None) -> tuple[ResolvedFormat, str]:
    """The format from the extension, then from the first non-blank line; and how it was decided."""
    if extension == ".csv":
        return "csv", "extension"
    if extension not in _JSON_EXTENSIONS and first is not None and not first.lstrip().startswith(b"{"):
        return "csv", "content"
    if first is not None:
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError:
            return "jsonl", "content"  # reported with its line when the rows are read
        if type(obj) is dict and "custom_id" in obj and "body" in obj:
            return "batch", "content"
    return "jsonl", "extension" if extension in _JSON_EXTENSIONS else "content"


class InputSource:
    """One input, ready to be checked and streamed. Made by :func:`open_input`.

    ``path`` is as given ("-" for stdin); ``name`` is what messages show ("<stdin>" for stdin); ``format``
    is the resolved format. A stream (stdin, or a pipe such as ``<(zcat prompts.jsonl.gz)``) can be read
    only once: ``check()`` and ``fingerprint()`` return None for it and its rows are validated as they stream.
    """

    __slots__ = ("_detected_by", "_duplicates", "_peeked", "_row_count", "_stream", "_used", "format", "name",
                 "options", "path")

    def __init__(self, path: str, fmt: ResolvedFormat, options: InputOptions, *,
                 stream: BinaryIO | None = None, peeked: list[bytes] | None = None,
                 detected_by: str = "option") -> None:
        self.path = path
        self.name = STDIN_NAME if path == STDIN_PATH else path
        self.format: ResolvedFormat = fmt
        self.options = options
        self._stream = stream
        self._peeked = peeked or []
        self._detected_by = detected_by
        self._row_count: int | None = None
        # Line -> message for each duplicate id a completed check() found (kept with on_invalid="skip"),
        # so the rows() pass after it flags them without remembering every id again.
        self._duplicates: dict[int, str] = {}
        self._used = False

    def __repr__(self) -> str:
        return f"InputSource({self.path!r}, format={self.format!r})"

    @property
    def single_pass(self) -> bool:
        """True for stdin and pipes: no check(), no fingerprint, and rows() only once."""
        return self._stream is not None

    def check(self) -> int | None:
        """Validate every row as ``rows()`` would, duplicate ids included, and return the row count.

        Raises InputError at the first problem; with ``on_invalid="skip"`` bad rows are counted instead.
        Returns None for a stream (stdin, a pipe), which can be read only once: it is validated as it streams.
        """
        if self.single_pass:
            return None
        for _ in self._scan(emit=False):
            pass
        assert self._row_count is not None
        return self._row_count

    def rows(self) -> Iterator[Row]:
        """Stream the rows. Bad rows raise InputError, or with ``on_invalid="skip"`` come as
        ``Row(invalid=message)`` with a derived id."""
        return self._scan(emit=True)

    def fingerprint(self) -> dict[str, object] | None:
        """What a resumed run compares to know the input is unchanged; None for a stream.

        ``rows`` is the count from ``check()``, None if it has not run: compare size and hashes.
        """
        if self.single_pass:
            return None
        with _os_errors(self.name), open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(FINGERPRINT_CHUNK_BYTES)
            if size > FINGERPRINT_CHUNK_BYTES:
                f.seek(size - FINGERPRINT_CHUNK_BYTES)
                tail = f.read(FINGERPRINT_CHUNK_BYTES)
            else:
                tail = head
        return {"size": size, "head_sha256": hashlib.sha256(head).hexdigest(),
                "tail_sha256": hashlib.sha256(tail).hexdigest(), "rows": self._row_count}

    @contextmanager
    def _lines(self) -> Iterator[Iterator[bytes]]:
        """The raw lines, BOM removed: a fresh pass over a file, the one pass over a stream."""
        if self._stream is not None:
            if self._used:
                raise InputError(self.name, None, "a stream can be read only once")
            self._used = True
            stream, peeked, self._peeked = self._stream, self._peeked, []
            try:
                with _os_errors(self.name):
                    yield chain(peeked, stream)
            finally:
                if stream is not sys.stdin.buffer:
                    stream.close()
            return
        with _os_errors(self.name), open(self.path, "rb") as f:
            first = _strip_bom(f.readline())
            yield chain((first,), f) if first else iter(f)

    def _scan(self, *, emit: bool) -> Iterator[Row]:
        # The check pass (never a stream) remembers ids in bounded memory (see duplicates.py); a pass after a
        # completed check remembers none (the check's findings are in _duplicates); a pass without one (a
        # stream, or rows() alone) keeps them in memory, since it cannot read the input again to confirm a
        # candidate.
        ids = IdCheck(spill=True) if not emit else None if self._row_count is not None else IdCheck(spill=False)
        return self._pass(emit, ids, self._duplicates if ids is None else {})

    def _pass(self, emit: bool, ids: IdCheck | None, dups: dict[int, str]) -> Iterator[Row]:
        """One pass over the rows. ``ids`` tracks explicit ids (derived ones are unique by construction);
        None: ``dups`` (line -> message) already says which rows are duplicates."""
        try:
            if self.format == "csv":
                count = yield from self._scan_csv_rows(emit, ids, dups)
            else:
                count = yield from self._scan_json_rows(emit, ids, dups)
            if count == 0:
                raise self._no_rows()
            if not emit:
                if ids is not None:
                    self._finish_ids(ids)
                self._row_count = count
        finally:
            if ids is not None:
                ids.close()

    def _finish_ids(self, ids: IdCheck) -> None:
        """End of the check pass: the duplicates found among spilled ids fail it, or are kept for rows()."""
        found = ids.finish(self._ids_at)
        if found and self.options.on_invalid == "error":
            raise InputError(self.name, found[0].line, found[0].message)
        for dup in found:
            self._duplicates[dup.line] = dup.message

    def _ids_at(self, lines: set[int]) -> dict[int, str]:
        """The explicit ids on ``lines``, read again: the duplicate check's confirmation pass."""
        return {row.line: row.id for row in self._pass(True, None, {})
                if row.line in lines and row.explicit_id and row.invalid is None}

    def _no_rows(self) -> InputError:
        return InputError(self.name, None, f"{'input' if self.single_pass else 'file'} has no rows")

    def _scan_json_rows(self, emit: bool, ids: IdCheck | None,
                        dups: dict[int, str]) -> Generator[Row, None, int]:
        """The rows of a JSON lines pass; returns their count."""
        parse = _parse_batch if self.format == "batch" else _parse_jsonl
        strict = self.options.on_invalid == "error"
        name = self.name
        index = 0
        with self._lines() as lines:
            for lineno, raw in enumerate(lines, 1):
                if raw.isspace():
                    continue
                try:
                    rid, payload, route = parse(raw)
                    if rid is not None:
                        self._check_id(rid, lineno, emit, ids, dups)
                except _Invalid as exc:
                    if strict:
                        raise InputError(name, lineno, exc.message) from None
                    if emit:
                        yield Row(_derived_id(index, raw), index, lineno, {}, invalid=exc.message)
                else:
                    if emit:
                        if rid is None:
                            yield Row(_derived_id(index, raw), index, lineno, payload, route)
                        else:
                            yield Row(rid, index, lineno, payload, route, True)
                index += 1
        return index

    def _check_id(self, rid: str, line: int, emit: bool, ids: IdCheck | None, dups: dict[int, str]) -> None:
        """An explicit id: remembered by ``ids`` while it checks, or looked up in duplicates found earlier."""
        if ids is not None:
            if (first := ids.add(rid, line)) is not None:
                message = Duplicate(line, rid, first).message
                if not emit:
                    self._duplicates[line] = message  # for the rows() pass after this check (on_invalid="skip")
                raise _Invalid(message)
        elif dups and line in dups:
            raise _Invalid(dups[line])

    def _scan_csv_rows(self, emit: bool, ids: IdCheck | None, dups: dict[int, str],
                       header_only: bool = False) -> Generator[Row, None, int]:
        """The rows of a CSV pass; returns their count (0 with ``header_only``)."""
        strict = self.options.on_invalid == "error"
        name = self.name
        # The first undecodable line of the record being read; csv.reader reads no further than the
        # record it returns, so this belongs to that record.
        bad: list[tuple[int, str]] = []

        def decoded(lines: Iterator[bytes]) -> Iterator[str]:
            for lineno, raw in enumerate(lines, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if not bad:
                        bad.append((lineno, f"invalid UTF-8 at byte {exc.start + 1} of the line"))
                    text = raw.decode("utf-8", "replace")
                yield text

        if csv.field_size_limit() < CSV_FIELD_LIMIT_CHARS:
            csv.field_size_limit(CSV_FIELD_LIMIT_CHARS)
        plan: _CsvPlan | None = None
        index = 0
        end = 0  # the last physical line of the previous record
        with self._lines() as lines:
            reader = csv.reader(decoded(lines), strict=True)
            try:
                for rec in reader:
                    start, end = end + 1, reader.line_num
                    if not rec or (len(rec) == 1 and not rec[0].strip()):
                        bad.clear()
                        continue
                    if plan is None:
                        if bad:
                            raise InputError(name, bad[0][0], bad[0][1])
                        plan = _csv_plan(rec, self.options, name, start, guessed=self._detected_by == "content")
                        if header_only:
                            return 0
                        continue
                    lineno = start
                    try:
                        if bad:
                            lineno, message = bad.pop()
                            raise _Invalid(message)
                        if len(rec) != len(plan.header):
                            raise _Invalid(f"expected {len(plan.header)} fields as in the header, "
                                           f"got {len(rec)}")
                        prompt = plan.prompt(rec)
                        rid = rec[plan.id_index] if plan.id_index is not None else None
                        if rid:
                            self._check_id(rid, start, emit, ids, dups)
                    except _Invalid as exc:
                        if strict:
                            raise InputError(name, lineno, exc.message) from None
                        if emit:
                            yield Row(_record_id(index, rec), index, start, {}, invalid=exc.message)
                    else:
                        if emit:
                            if rid:
                                yield Row(rid, index, start, {"prompt": prompt}, None, True)
                            else:
                                yield Row(_record_id(index, rec), index, start, {"prompt": prompt})
                    index += 1
            except csv.Error as exc:
                # Record boundaries are lost after a quoting error, so it ends the pass even with skip.
                raise InputError(name, end + 1, f"malformed CSV: {exc}") from None
        return index

    def _check_header(self) -> None:
        for _ in self._scan_csv_rows(False, None, {}, header_only=True):
            pass


def _record_id(index: int, rec: list[str]) -> str:
    # Hash the fields rather than the raw lines: a record may span lines, and quoting or line-ending
    # changes should not change its id.
    return _derived_id(index, "\x1f".join(rec).encode("utf-8", "surrogatepass"))


def open_input(path: str, options: InputOptions = InputOptions()) -> InputSource:
    """Open ``path`` ("-" for stdin), resolve its format and, for CSV files, check the header.

    Auto-detection: ``.csv`` is CSV; ``.jsonl``/``.json``/``.ndjson`` are JSON lines; otherwise (stdin
    included) a first non-blank line that starts with ``{`` means JSON lines and anything else CSV. JSON
    lines whose first row has ``custom_id`` and ``body`` are OpenAI Batch requests.
    """
    stream: BinaryIO | None = None
    if path == STDIN_PATH:
        stream, extension = sys.stdin.buffer, ""
    else:
        extension = os.path.splitext(path)[1].lower()
        with _os_errors(path):
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise InputError(path, None, "is a directory, not a file")
            if not stat.S_ISREG(mode):
                # A pipe or device (/dev/fd/63 from a shell's <(...)) can be read once: keep it open.
                stream = open(path, "rb")  # noqa: SIM115 - closed by InputSource._lines
    peeked: list[bytes] = []
    first: bytes | None = None
    if stream is not None:
        with _os_errors(path if stream is not sys.stdin.buffer else STDIN_NAME):
            peeked, first = _peek(stream)
    elif options.format == "auto" and extension != ".csv":
        with _os_errors(path), open(path, "rb") as f:
            _, first = _peek(f)
    fmt: ResolvedFormat
    if options.format == "auto":
        fmt, detected_by = _detect(extension, first)
    else:
        fmt, detected_by = options.format, "option"
    if fmt != "csv" and (options.template or options.prompt_column or options.id_column):
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
        raise ConfigError(f"--template, --prompt-column and --id-column apply to CSV input; "
                          f"{path} is read as {fmt}")
    source = InputSource(path, fmt, options, stream=stream, peeked=peeked, detected_by=detected_by)
    if fmt == "csv" and stream is None:
        source._check_header()
    return source


def read_rows(path: str, options: InputOptions = InputOptions()) -> Iterator[Row]:
    """Shorthand for ``open_input(path, options).rows()``."""
    return open_input(path, options).rows()
