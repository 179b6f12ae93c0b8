"""guidellm (from PyPI), run from its own virtualenv in its concurrent mode against the same server.

guidellm pulls in torch, transformers and datasets (a few GB), so it lives in ``.bench/guidellm`` (ignored by
git), never in the project's venv: ``make bench-guidellm`` creates it. It is driven through its own CLI:

    guidellm run --backend kind=openai_http,target=URL,model=instant,stream=false,validate_backend=false,
                           max_tokens=16
                 --profile kind=concurrent,streams=N --data kind=json_file,path=ROWS
                 --constraint kind=max_requests,count=ROWS --output kind=json,path=OUT
                 --disable-console-interactive

``stream=false`` because gptoss-batch's own run here is not streamed; ``validate_backend=false`` because the
instant server has no ``/health``. Offline: HF_HUB_OFFLINE=1 (no tokenizer is needed: token counts come from
the responses' ``usage``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.measure import ROOT
from benchmarks.peers.common import MAX_TOKENS, MODEL

VENV = ROOT / ".bench" / "guidellm"
INSTALL_HINT = "make bench-guidellm (python3 -m venv .bench/guidellm && .bench/guidellm/bin/pip install guidellm)"


def guidellm_bin() -> Path | None:
    exe = VENV / "bin" / "guidellm"
    return exe if os.access(exe, os.X_OK) else None


def guidellm_version() -> str | None:
    """From the dist-info folder name, without starting guidellm (its import takes seconds)."""
    for site in sorted((VENV / "lib").glob("python*/site-packages")):
        for dist in site.glob("guidellm-*.dist-info"):
            return dist.name.removeprefix("guidellm-").removesuffix(".dist-info")
    return None


def command(exe: Path, base_url: str, rows_path: Path, rows: int, concurrency: int, out_json: Path) -> list[str]:
    target = base_url.removesuffix("/v1")  # guidellm appends the /v1/... routes itself
    return [
        str(exe), "run",
        "--backend", f"kind=openai_http,target={target},model={MODEL},stream=false,validate_backend=false,"
                     f"max_tokens={MAX_TOKENS}",
        "--profile", f"kind=concurrent,streams={concurrency}",
        "--data", f"kind=json_file,path={rows_path}",
        "--constraint", f"kind=max_requests,count={rows}",
        "--output", f"kind=json,path={out_json}",
        "--disable-console-interactive",
    ]


def environment() -> Mapping[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True, slots=True)
class GuidellmReport:
    requests: int  # successful + errored + incomplete
    ok: int
    mean_concurrency: float | None  # what guidellm itself measured as requests in flight
    requests_per_s: float | None
    duration_s: float | None


def read_report(path: Path) -> GuidellmReport:
    data: Any = orjson.loads(path.read_bytes())
    bench = data["benchmarks"][0]
    metrics = bench["metrics"]
    totals = metrics["request_totals"]

    def mean(key: str) -> float | None:
        value = metrics.get(key, {}).get("successful")
        if isinstance(value, dict):
            value = value.get("mean")
        return float(value) if isinstance(value, int | float) else None

    requests = int(totals.get("successful", 0)) + int(totals.get("errored", 0)) + int(totals.get("incomplete", 0))
    duration = bench.get("duration")
    return GuidellmReport(requests, int(totals.get("successful", 0)), mean("request_concurrency"),
                          mean("requests_per_second"), float(duration) if isinstance(duration, int | float) else None)
