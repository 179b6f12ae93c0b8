"""An "instant" OpenAI-compatible server on loopback, so benchmarks measure the client and nothing else.

Every request gets the same prebuilt answer with no model, no parsing of the request body and no per-request
allocation worth the name. nginx serves it when installed (``return 200 '<body>'``); otherwise a raw
``asyncio.Protocol`` server in a child process does. Either way the server is pinned to one CPU and
``ServerInfo.pin_client()`` pins the benchmark to another, so the two do not share a core.

Routes (any method; the request body is read and discarded):

    {base_url}/chat/completions          chat completion JSON          (base_url = http://127.0.0.1:PORT/v1)
    {base_url}/completions               text completion JSON
    {base_url}/models                    model list JSON
    {stream_base_url}/chat/completions   chat SSE stream               (stream_base_url = {base_url}/stream)
    {stream_base_url}/completions        text completion SSE stream

Streaming is chosen by path, not by ``"stream": true`` in the body, because nginx cannot look into the
body cheaply. A stream is one role chunk, ``stream_chunks`` content chunks, a finish chunk, a usage chunk
and ``data: [DONE]``, sent as one Content-Length body (clients cannot tell it from a chunked stream that
happened to arrive at once).

Run ``python -m benchmarks.instant_server [--kind nginx|asyncio] [--stream-chunks N]`` to serve by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import orjson

HOST = "127.0.0.1"
MODEL = "instant"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
DEFAULT_STREAM_CHUNKS = 64

ServerKind = Literal["nginx", "asyncio"]
ServerChoice = Literal["auto", "nginx", "asyncio"]

# -- the fixed answers ---------------------------------------------------------------------------------

_USAGE_NON_STREAM = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


def chat_completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-instant",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE_NON_STREAM,
        }
    )


def completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "cmpl-instant",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "text": "ok.", "logprobs": None, "finish_reason": "stop"}],
            "usage": _USAGE_NON_STREAM,
        }
    )


def models_body() -> bytes:
    return orjson.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
    )


def _sse(event: object) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def chat_stream_body(chunks: int) -> bytes:
    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
        return {
            "id": "chatcmpl-instant",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events: list[object] = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": f" t{i}"}, None) for i in range(chunks)]
    events.append(chunk({}, "stop"))
    events.append(
        {
            "id": "chatcmpl-instant",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
        }
    )
    return b"".join(_sse(e) for e in events) + b"data: [DONE]\n\n"


def completion_stream_body(chunks: int) -> bytes:
    def chunk(text: str, finish: str | None) -> dict[str, object]:
        return {
            "id": "cmpl-instant",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    events: list[object] = [chunk(f" t{i}", None) for i in range(chunks)]
    events.append(chunk("", "stop"))
    events.append(
        {
            "id": "cmpl-instant",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
        }
    )
    return b"".join(_sse(e) for e in events) + b"data: [DONE]\n\n"


_JSON = "application/json"
_SSE = "text/event-stream"


def routes(stream_chunks: int) -> dict[str, tuple[str, bytes]]:
    """Path -> (content type, body): the whole behaviour of the server, shared by both implementations."""
    return {
        "/v1/chat/completions": (_JSON, chat_completion_body()),
        "/v1/completions": (_JSON, completion_body()),
        "/v1/models": (_JSON, models_body()),
        "/v1/stream/chat/completions": (_SSE, chat_stream_body(stream_chunks)),
        "/v1/stream/completions": (_SSE, completion_stream_body(stream_chunks)),
    }


# -- CPU placement -------------------------------------------------------------------------------------


def _allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_client(server_cpu: int | None = 0) -> int | None:
    """Pin this process to one allowed CPU other than ``server_cpu`` (CPU 1 on a plain 2-core machine).

    Returns the CPU, or None when fewer than two CPUs are allowed (then nothing is pinned).
    """
    others = [c for c in _allowed_cpus() if c != server_cpu]
    if not others or len(_allowed_cpus()) < 2:
        return None
    os.sched_setaffinity(0, {others[0]})
    return others[0]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    kind: ServerKind
    port: int
    pid: int
    cpu: int | None  # the CPU the server is pinned to, None if not pinned
    stream_chunks: int

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def stream_base_url(self) -> str:
        return f"{self.base_url}/stream"

    def pin_client(self) -> int | None:
        """Pin the calling process to a CPU other than the server's; returns it (None if not pinned)."""
        return pin_client(self.cpu)


# -- nginx ---------------------------------------------------------------------------------------------


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _nginx_quote(body: bytes) -> str:
    text = body.decode()
    # `return` text is a complex value: a `$` would be read as a variable, and there is no escape for it.
    if "$" in text:
        raise ValueError("nginx `return` bodies cannot contain '$'")
    for raw, escaped in (("\\", "\\\\"), ("'", "\\'"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(raw, escaped)
    return f"'{text}'"


# nginx reads at most 4096 bytes per config token, so a long body cannot be a `return` string.
_NGINX_MAX_TOKEN = 4000


def _nginx_location(path: str, ctype: str, body: bytes, body_file: Path) -> str:
    quoted = _nginx_quote(body)
    if len(quoted) <= _NGINX_MAX_TOKEN:
        action = f"return 200 {quoted};"
    else:
        # The static module answers POST with 405; `error_page 405 =200 $uri` re-enters as GET and serves the
        # file with status 200 (the request body has been discarded by then, so keep-alive is preserved).
        action = f"alias {body_file};\n            error_page 405 =200 $uri;"
    return (
        f"        location = {path} {{\n            default_type {ctype};\n            {action}\n        }}"
    )


def nginx_conf(workdir: Path, port: int, stream_chunks: int) -> tuple[str, dict[Path, bytes]]:
    """The config and the body files it names.

    One foreground process, no logs, keep-alive that outlasts any benchmark, temp files in ``workdir``.
    """
    files: dict[Path, bytes] = {}
    locations: list[str] = []
    for path, (ctype, body) in routes(stream_chunks).items():
        body_file = workdir / ("body" + path.replace("/", "_"))
        files[body_file] = body
        locations.append(_nginx_location(path, ctype, body, body_file))
    temp = "\n".join(
        f"    {name}_temp_path {workdir / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    location_block = "\n".join(locations)
    conf = f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;

events {{
    worker_connections 16384;
    multi_accept on;
}}

http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
    sendfile on;
    etag off;
    types {{}}
    open_file_cache max=64 inactive=600s;
    open_file_cache_valid 600s;
{temp}

    server {{
        listen {HOST}:{port} backlog=4096;
{location_block}
        location / {{
            default_type {_JSON};
            return 404 '{{"error": {{"message": "not found", "type": "invalid_request_error"}}}}';
        }}
    }}
}}
"""
    return conf, files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], describe: str) -> None:
    # nginx has no readiness signal, so connect until it answers (bounded; this is startup, not a hot path).
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{describe} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                msg = f"{describe} did not listen on {HOST}:{port} within {STARTUP_TIMEOUT_S} s"
                raise RuntimeError(msg) from None
            time.sleep(0.02)


def _pin_command(cmd: list[str], cpu: int | None) -> list[str]:
    taskset = shutil.which("taskset")
    if cpu is not None and taskset:
        return [taskset, "-c", str(cpu), *cmd]
    return cmd


def _pin_pid(pid: int, cpu: int | None) -> None:
    if cpu is not None and not shutil.which("taskset"):
        os.sched_setaffinity(pid, {cpu})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _nginx_server(nginx: str, stream_chunks: int, cpu: int | None) -> Iterator[ServerInfo]:
    with tempfile.TemporaryDirectory(prefix="instant-nginx-") as tmp:
        workdir = Path(tmp)
        port = _free_port()
        conf = workdir / "nginx.conf"
        text, files = nginx_conf(workdir, port, stream_chunks)
        conf.write_text(text)
        for path, body in files.items():
            path.write_bytes(body)
        cmd = _pin_command(
            [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)], cpu
        )
        with (workdir / "stderr.log").open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            _pin_pid(proc.pid, cpu)
            try:
                _wait_for_port(port, proc, "nginx")
            except RuntimeError as exc:
                logs = "".join(
                    p.read_text(errors="replace")
                    for p in (workdir / "stderr.log", workdir / "error.log")
                    if p.exists()
                )
                raise RuntimeError(f"{exc}\n{logs}") from None
            yield ServerInfo("nginx", port, proc.pid, cpu, stream_chunks)
        finally:
            _stop(proc)


# -- asyncio fallback ----------------------------------------------------------------------------------


class _InstantProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive with pipelining; parses only the request line, Content-Length and Connection."""

    def __init__(self, responses: dict[bytes, bytes], not_found: bytes, bad_request: bytes) -> None:
        self._responses = responses
        self._not_found = not_found
        self._bad_request = bad_request
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        out: list[bytes] = []
        close = False
        while (head_end := self._buf.find(b"\r\n\r\n")) >= 0:
            head = _parse_head(bytes(self._buf[:head_end]))
            if head is None:
                out.append(self._bad_request)
                close = True
                break
            path, length, close = head
            request_end = head_end + 4 + length
            if len(self._buf) < request_end:
                close = False
                break
            out.append(self._responses.get(path, self._not_found))
            del self._buf[:request_end]
            if close:
                break
        assert self._transport is not None
        if out:
            self._transport.write(b"".join(out))
        if close:
            self._transport.close()


def _parse_head(head: bytes) -> tuple[bytes, int, bool] | None:
    """(path, Content-Length, Connection: close) of a request head, or None if we cannot serve it."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            return None  # benchmarks send bytes bodies, which always carry a Content-Length
    return parts[1].partition(b"?")[0], length, close


def _http_response(status: str, ctype: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _serve_asyncio(stream_chunks: int) -> None:
    responses = {
        path.encode(): _http_response("200 OK", ctype, body)
        for path, (ctype, body) in routes(stream_chunks).items()
    }
    not_found = _http_response("404 Not Found", _JSON, b'{"error": {"message": "not found"}}')
    bad_request = _http_response("400 Bad Request", _JSON, b'{"error": {"message": "bad request"}}')
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _InstantProtocol(responses, not_found, bad_request), HOST, 0, backlog=4096
    )
    port = server.sockets[0].getsockname()[1]
    # The parent waits for this line, so it never races the bind.
    sys.stdout.write(f"listening {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def _run_asyncio_child(stream_chunks: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_asyncio(stream_chunks))
    else:
        uvloop.run(_serve_asyncio(stream_chunks))


@contextlib.contextmanager
def _asyncio_server(stream_chunks: int, cpu: int | None) -> Iterator[ServerInfo]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.instant_server",
        "--child",
        "--stream-chunks",
        str(stream_chunks),
    ]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("listening "):
            proc.wait(STOP_TIMEOUT_S)
            raise RuntimeError(f"asyncio instant server failed to start (status {proc.returncode}): {line!r}")
        yield ServerInfo("asyncio", int(line.split()[1]), proc.pid, cpu, stream_chunks)
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# -- public entry --------------------------------------------------------------------------------------


@contextlib.contextmanager
def instant_server(
    stream_chunks: int = DEFAULT_STREAM_CHUNKS, kind: ServerChoice = "auto"
) -> Iterator[ServerInfo]:
    """Start an instant server (nginx if installed, else asyncio) pinned to the first allowed CPU.

    The server is pinned only when at least two CPUs are allowed, leaving the others to the client.
    """
    cpus = _allowed_cpus()
    cpu = cpus[0] if len(cpus) >= 2 else None
    nginx = find_nginx() if kind in ("auto", "nginx") else None
    if kind == "nginx" and nginx is None:
        raise RuntimeError("nginx is not installed (try `apt-get install nginx`)")
    if nginx is not None:
        with _nginx_server(nginx, stream_chunks, cpu) as info:
            yield info
    else:
        with _asyncio_server(stream_chunks, cpu) as info:
            yield info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instant_server", description="Serve instant OpenAI-compatible answers."
    )
    parser.add_argument("--kind", choices=["auto", "nginx", "asyncio"], default="auto")
    parser.add_argument("--stream-chunks", type=int, default=DEFAULT_STREAM_CHUNKS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the asyncio server process
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_asyncio_child(args.stream_chunks, args.cpu)
        return 0
    with instant_server(args.stream_chunks, args.kind) as info:
        print(f"{info.kind} server (pid {info.pid}, cpu {info.cpu})")
        print(f"  base_url        {info.base_url}")
        print(f"  stream_base_url {info.stream_base_url}")
        print("Ctrl-C to stop.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
