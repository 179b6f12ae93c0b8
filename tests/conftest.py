"""Shared fixtures: anyio on asyncio, and fakes for the runner's interfaces."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
