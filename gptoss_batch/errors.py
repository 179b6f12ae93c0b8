"""The error tree: every exception the library raises on purpose.

    GptossError
    ├── ConfigError          bad flags, config file or environment          -> exit 2
    ├── InputError           bad input file: names the file and line         -> exit 2
    ├── OutputError          output cannot be written (ENOSPC, EIO, ...)     -> exit 74
    │   └── LockedError      another run holds the output's lock
    ├── ResumeMismatchError  output belongs to another input                 -> exit 2
    └── TransportError       one attempt failed; becomes data in a Result
        ├── ConnectError     nothing listening, refused, reset before reply
        ├── TimeoutError_    connect / read (idle) / whole-request timeouts
        ├── HTTPStatusError  the server answered a non-2xx status
        ├── ProtocolError    the body is not what the API promises (bad JSON)
        └── StreamError      an SSE stream carried an error or was cut

Only run-level problems propagate out of the runner; per-request failures are recorded as
``Result(status="error", error=ErrorInfo(...))`` lines.
"""

from __future__ import annotations

from collections.abc import Mapping


class GptossError(Exception):
    """Base of everything gptoss-batch raises on purpose."""


class ConfigError(GptossError):
    """Invalid configuration: flags, config file or environment."""


class InputError(GptossError):
    """An input row cannot be used. Always names the file and the 1-based line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class OutputError(GptossError):
    """The output file cannot be written; everything written so far is kept."""


class LockedError(OutputError):
    """Another live process holds the output's lock."""


class ResumeMismatchError(GptossError):
    """The existing output was produced from a different input."""


class TransportError(GptossError):
    """One request attempt failed. ``kind`` is the stable name used in result lines."""

    kind = "transport"

    def __init__(self, message: str, *, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message or self.kind)
        self.message = message or self.kind
        self.status = status
        self.headers: Mapping[str, str] = headers or {}


class ConnectError(TransportError):
    kind = "connect"


class TimeoutError_(TransportError):
    kind = "timeout"


class HTTPStatusError(TransportError):
    kind = "http"


class ProtocolError(TransportError):
    kind = "protocol"


class StreamError(TransportError):
    kind = "stream"
