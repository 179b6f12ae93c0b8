"""Start-up stays cheap: what `gptoss-batch --help` loads (the time itself is measured in benchmarks/)."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_cli_does_not_import_aiohttp_or_the_sim_server() -> None:
    """aiohttp is the largest import; --help, bad flags, `summary` and `verify` never need it."""
    probe = ("import sys, gptoss_batch.cli; "
             "print(sorted(m for m in ('aiohttp', 'gptoss_batch.transport', 'gptoss_batch.sim.server') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
