"""serve-sim: an embedded OpenAI-compatible server that behaves like a vLLM engine, for demos and tests.

``SimConfig`` holds every knob; ``serve`` runs it inside an event loop, ``run_server`` as a process, and
``gptoss_batch.sim.testing.start_sim`` as a subprocess for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gptoss_batch.sim.config import SimConfig

if TYPE_CHECKING:
    from gptoss_batch.sim.server import RunningSim, SimServer, run_server, serve

__all__ = ["RunningSim", "SimConfig", "SimServer", "run_server", "serve"]
_SERVER_NAMES = frozenset({"RunningSim", "SimServer", "run_server", "serve"})


def __getattr__(name: str) -> Any:
    # The server pulls in aiohttp.web: load it on first use, so that importing the package for SimConfig
    # (as `gptoss-batch --help` does, through the serve-sim command's options) stays cheap.
    if name in _SERVER_NAMES:
        from gptoss_batch.sim import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
