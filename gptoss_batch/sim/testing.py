"""Run serve-sim as a subprocess for tests: ``with start_sim("--fail-429-rate", "0.5") as sim: ...``.

The process listens on a free loopback port; the handle gives its URLs and its /sim/stats.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LISTENING_PREFIX = b"serve-sim listening on "


@dataclass(frozen=True, slots=True)
class SimHandle:
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        return f"{self.root_url}/v1"

    def get(self, path: str, timeout_s: float = 5.0) -> bytes:
        """GET ``path`` (from the root, e.g. "/metrics") and return the body; raises on non-2xx."""
        with urllib.request.urlopen(self.root_url + path, timeout=timeout_s) as resp:
            body: bytes = resp.read()
            return body

    def stats(self) -> dict[str, Any]:
        """The server's /sim/stats: requests_total, max_in_flight, by_status, by_fault, running, ..."""
        stats: dict[str, Any] = orjson.loads(self.get("/sim/stats"))
        return stats


def _wait_listening(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Block until the process prints its listening line (bounded by ``timeout_s``)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"serve-sim did not start listening within {timeout_s:g} s")
    line = proc.stdout.readline()
    if not line.startswith(LISTENING_PREFIX):
        proc.wait(timeout=STOP_TIMEOUT_S)
        raise RuntimeError(f"serve-sim failed to start (exit {proc.returncode}): {line!r}")


@contextlib.contextmanager
def start_sim(*args: str, timeout_s: float = START_TIMEOUT_S) -> Iterator[SimHandle]:
    """Start ``python -m gptoss_batch.sim ARGS --port 0`` and stop it (SIGTERM, then SIGKILL) on exit."""
    with tempfile.TemporaryDirectory(prefix="serve-sim-") as tmp:
        port_file = Path(tmp) / "port"
        stderr_path = Path(tmp) / "stderr"
        cmd = [sys.executable, "-m", "gptoss_batch.sim", *args, "--port", "0", "--port-file", str(port_file)]
        with stderr_path.open("wb") as stderr, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                               stderr=stderr) as proc:
            try:
                try:
                    _wait_listening(proc, timeout_s)
                except (TimeoutError, RuntimeError) as exc:
                    raise type(exc)(f"{exc}\n{stderr_path.read_text(errors='replace')}") from None
                yield SimHandle(proc, int(port_file.read_text()))
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
