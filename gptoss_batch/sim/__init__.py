"""serve-sim: an embedded OpenAI-compatible server that behaves like a vLLM engine, for demos and tests.

``SimConfig`` holds every knob; ``serve`` runs it inside an event loop, ``run_server`` as a process, and
``gptoss_batch.sim.testing.start_sim`` as a subprocess for tests.
"""

from gptoss_batch.sim.config import SimConfig
from gptoss_batch.sim.server import RunningSim, SimServer, run_server, serve

__all__ = ["RunningSim", "SimConfig", "SimServer", "run_server", "serve"]
