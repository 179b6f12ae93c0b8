"""Run configuration: frozen dataclasses built from defaults < TOML file < environment < flags.

Every flag of ``run`` has a config-file key of the same name (dashes or underscores). Validation raises
``ConfigError`` with the offending key and source; the API key is never part of any repr.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from gptoss_batch.errors import ConfigError

# Retry numbers live together, with units (openai-python keeps them in _constants.py).
DEFAULT_MAX_ATTEMPTS = 6
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
# Timeouts suited to long LLM generations. aiohttp's own 300 s total is never inherited silently.
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 300.0
STREAM_READ_TIMEOUT_S = 60.0
UNAVAILABLE_AFTER_S = 60.0
DEFAULT_CONCURRENCY = 8
MIN_ERROR_SAMPLE = 20

RouteChoice = Literal["auto", "chat", "completions"]
ProgressMode = Literal["auto", "rich", "plain", "none"]
FsyncMode = Literal["always", "interval", "never"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` counts the first try; 1 disables retries."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial_s: float = INITIAL_BACKOFF_S
    backoff_max_s: float = MAX_BACKOFF_S
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    unavailable_after_s: float = UNAVAILABLE_AFTER_S


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = CONNECT_TIMEOUT_S
    # Idle time between bytes. None: the request timeout for plain requests, STREAM_READ_TIMEOUT_S for streams.
    read_s: float | None = None
    request_s: float = REQUEST_TIMEOUT_S

    def read_timeout_s(self, stream: bool) -> float:
        if self.read_s is not None:
            return self.read_s
        return min(STREAM_READ_TIMEOUT_S, self.request_s) if stream else self.request_s


@dataclass(frozen=True, slots=True)
class RunConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    route: RouteChoice = "auto"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    auto_concurrency: bool = False
    min_concurrency: int = 1
    max_concurrency: int = 256
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    deadline_s: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    max_error_rate: float | None = None
    min_error_sample: int = MIN_ERROR_SAMPLE
    progress: ProgressMode = "auto"
    fsync: FsyncMode = "interval"
    overwrite: bool = False
    retry_failed: bool = True
    force_resume: bool = False
    drain_timeout_s: float = 30.0
    ordered: bool = False
    metrics_url: str | None = None
    server_metrics: bool = True
    slos: Mapping[str, float] = field(default_factory=dict)
    log_controller: str | None = None

    @property
    def worker_count(self) -> int:
        return self.max_concurrency if self.auto_concurrency else self.concurrency


# key -> (section, attribute, converter). Sections: "" for RunConfig, "retry", "timeouts".
def _pos_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError("must be a positive integer")
    n = int(v)
    if n < 1:
        raise ValueError("must be a positive integer")
    return n


def _nonneg_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("must be a number")
    x = float(v)
    if x < 0 or x != x:
        raise ValueError("must be a non-negative number")
    return x


def _pos_float(v: Any) -> float:
    x = _nonneg_float(v)
    if x == 0:
        raise ValueError("must be greater than 0")
    return x


def _fraction(v: Any) -> float:
    x = _nonneg_float(v)
    if x > 1:
        raise ValueError("must be between 0 and 1")
    return x


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        return v.lower() in {"1", "true", "yes", "on"}
    raise ValueError("must be true or false")


def _choice(*allowed: str) -> Any:
    def conv(v: Any) -> str:
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return str(v)
    return conv


def _parse_value(text: str) -> Any:
    """``--param key=value``: the value is read as JSON when it parses, else kept as a string."""
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _params(v: Any) -> dict[str, Any]:
    if isinstance(v, Mapping):
        return dict(v)
    out: dict[str, Any] = {}
    for item in v:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def _headers(v: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(v, Mapping):
        return tuple((str(k), str(x)) for k, x in v.items())
    out = []
    for item in v:
        key, sep, value = str(item).partition(":")
        if not sep or not key.strip():
            raise ValueError(f"expected 'Name: value', got {item!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def _slos(v: Any) -> dict[str, float]:
    raw = v if isinstance(v, Mapping) else dict(str(s).partition("=")[::2] for s in v)
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key not in {"ttft", "tpot", "latency", "itl"}:
            raise ValueError(f"unknown SLO {key!r} (ttft, tpot, itl or latency)")
        out[key] = _pos_float(value)
    return out


def _concurrency(v: Any) -> int | str:
    if v == "auto":
        return "auto"
    return _pos_int(v)


_KEYS: dict[str, tuple[str, str, Any]] = {
    "base_url": ("", "base_url", _str),
    "model": ("", "model", _str),
    "api_key": ("", "api_key", _str),
    "header": ("", "headers", _headers),
    "headers": ("", "headers", _headers),
    "route": ("", "route", _choice(*get_args(RouteChoice))),
    "max_tokens": ("", "max_tokens", _pos_int),
    "temperature": ("", "temperature", _nonneg_float),
    "top_p": ("", "top_p", _fraction),
    "param": ("", "params", _params),
    "params": ("", "params", _params),
    "stream": ("", "stream", _bool),
    "concurrency": ("", "concurrency", _concurrency),
    "min_concurrency": ("", "min_concurrency", _pos_int),
    "max_concurrency": ("", "max_concurrency", _pos_int),
    "max_attempts": ("retry", "max_attempts", _pos_int),
    "backoff_initial": ("retry", "backoff_initial_s", _nonneg_float),
    "backoff_max": ("retry", "backoff_max_s", _nonneg_float),
    "max_retry_after": ("retry", "max_retry_after_s", _nonneg_float),
    "unavailable_after": ("retry", "unavailable_after_s", _pos_float),
    "connect_timeout": ("timeouts", "connect_s", _pos_float),
    "read_timeout": ("timeouts", "read_s", _pos_float),
    "request_timeout": ("timeouts", "request_s", _pos_float),
    "deadline": ("", "deadline_s", _pos_float),
    "rpm": ("", "rpm", _pos_float),
    "tpm": ("", "tpm", _pos_float),
    "max_error_rate": ("", "max_error_rate", _fraction),
    "min_error_sample": ("", "min_error_sample", _pos_int),
    "progress": ("", "progress", _choice(*get_args(ProgressMode))),
    "fsync": ("", "fsync", _choice(*get_args(FsyncMode))),
    "overwrite": ("", "overwrite", _bool),
    "retry_failed": ("", "retry_failed", _bool),
    "force_resume": ("", "force_resume", _bool),
    "drain_timeout": ("", "drain_timeout_s", _nonneg_float),
    "ordered": ("", "ordered", _bool),
    "metrics_url": ("", "metrics_url", _str),
    "server_metrics": ("", "server_metrics", _bool),
    "slo": ("", "slos", _slos),
    "slos": ("", "slos", _slos),
    "log_controller": ("", "log_controller", _str),
}

# Keys that belong to other parts of the CLI (input reading, output path); accepted in config files.
INPUT_KEYS = {"input_format", "prompt_column", "template", "id_column", "on_invalid", "output"}

ENV_KEYS = {"OPENAI_API_KEY": "api_key", "OPENAI_BASE_URL": "base_url", "GPTOSS_BATCH_MODEL": "model"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; keys may use dashes or underscores. A ``[run]`` table is also accepted."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    if isinstance(data.get("run"), dict):
        data = {**{k: v for k, v in data.items() if k != "run"}, **data["run"]}
    out = {k.replace("-", "_"): v for k, v in data.items()}
    for key in out:
        if key not in _KEYS and key not in INPUT_KEYS:
            raise ConfigError(f"{p}: unknown key {key!r}")
    return out


def build_config(
    flags: Mapping[str, Any],
    *,
    config_file: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> RunConfig:
    """Merge defaults < config file < environment < flags into a validated RunConfig.

    ``flags`` holds only the options the user actually gave (None means "not given").
    """
    env = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file:
        layers.append((f"config file {config_path or ''}".strip(), config_file))
    layers.append(("environment", {key: env[name] for name, key in ENV_KEYS.items() if env.get(name)}))
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))

    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"retry": {}, "timeouts": {}}
    for source, layer in layers:
        for key, raw in layer.items():
            if key in INPUT_KEYS:
                continue
            if key not in _KEYS:
                raise ConfigError(f"{source}: unknown key {key!r}")
            section, attr, conv = _KEYS[key]
            try:
                value = conv(raw)
            except (ValueError, TypeError) as exc:
                shown = "***" if key == "api_key" else repr(raw)
                raise ConfigError(f"{source}: {key.replace('_', '-')} {shown}: {exc}") from None
            (sections[section] if section else top)[attr] = value

    if top.get("concurrency") == "auto":
        top["concurrency"] = top.get("min_concurrency", 1)
        top["auto_concurrency"] = True
    cfg = RunConfig(**top, retry=RetryPolicy(**sections["retry"]), timeouts=Timeouts(**sections["timeouts"]))
    if not cfg.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base-url {cfg.base_url!r}: must start with http:// or https://")
    if cfg.min_concurrency > cfg.max_concurrency:
        raise ConfigError("min-concurrency must not exceed max-concurrency")
    if cfg.retry.backoff_initial_s > cfg.retry.backoff_max_s:
        raise ConfigError("backoff-initial must not exceed backoff-max")
    return cfg


def describe(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data for the summary JSON, without the API key."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name == "api_key":
            continue
        v = getattr(cfg, f.name)
        if f.name == "headers":
            v = [k for k, _ in v]  # header values may be secrets too
        elif isinstance(v, RetryPolicy | Timeouts):
            v = {g.name: getattr(v, g.name) for g in fields(v)}
        elif isinstance(v, Mapping):
            v = dict(v)
        out[f.name] = v
    return out
