"""The ``serve-sim`` command: one option per SimConfig field, built from the fields so help cannot drift.

``register(app)`` adds it to any Typer app (the main CLI, or ``python -m gptoss_batch.sim`` alone).
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from gptoss_batch.errors import ConfigError
from gptoss_batch.sim.config import SimConfig

SERVE_SIM_HELP = """Serve a simulated vLLM (OpenAI-compatible API) for demos and tests.

Answers /v1/chat/completions and /v1/completions (plain and streaming), /v1/models, /health, /metrics
(vLLM's Prometheus names) and /sim/stats. Replies are deterministic pseudo-text keyed on the seed and the
prompt. Timing follows a continuous-batching model (or a fixed TTFT/ITL schedule), and faults can be
injected at chosen rates. Prints `serve-sim listening on http://HOST:PORT/v1` once ready; stops cleanly on
SIGTERM or Ctrl-C.
"""

EXIT_CONFIG = 2
EXIT_LISTEN = 1


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _knob_parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(SimConfig)
    params: list[inspect.Parameter] = []
    for f in fields(SimConfig):
        option = typer.Option(f.metadata.get("flag", _option_name(f.name)), help=f.metadata["help"],
                              rich_help_panel=f.metadata["panel"], show_default=f.default is not None)
        default = None if f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[hints[f.name], option]))
    return params


def _announce(base_url: str) -> None:
    typer.echo(f"serve-sim listening on {base_url}")
    sys.stdout.flush()


def serve_sim(
    host: Annotated[str, typer.Option(help="Address to listen on.", rich_help_panel="Listening")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.",
                                      rich_help_panel="Listening")] = 8000,
    port_file: Annotated[Path | None, typer.Option(help="Write the port here once listening (useful with "
                                                   "--port 0).", rich_help_panel="Listening")] = None,
    **knobs: Any,
) -> None:
    """The command body; its signature is widened below with one option per SimConfig field."""
    try:
        config = SimConfig(**knobs)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    # Imported here: the server pulls in aiohttp.web, which `gptoss-batch --help` should not pay for.
    from gptoss_batch.sim.server import run_server

    try:
        run_server(config, host=host, port=port, port_file=port_file, on_listening=_announce)
    except OSError as exc:
        typer.echo(f"serve-sim: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_LISTEN) from exc


_base = [p for p in inspect.signature(serve_sim, eval_str=True).parameters.values()
         if p.kind is not inspect.Parameter.VAR_KEYWORD]
serve_sim.__signature__ = inspect.Signature([*_base, *_knob_parameters()])  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    """Add ``serve-sim`` to ``app``."""
    app.command("serve-sim", help=SERVE_SIM_HELP, no_args_is_help=False)(serve_sim)
