"""``python -m gptoss_batch.sim [OPTIONS]``: run serve-sim alone (a leading ``serve-sim`` is optional)."""

import sys

import typer

from gptoss_batch.sim.cli import register

app = typer.Typer(add_completion=False)
register(app)
args = sys.argv[1:]
app(args=args[1:] if args[:1] == ["serve-sim"] else args, prog_name="python -m gptoss_batch.sim")
