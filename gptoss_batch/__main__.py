"""Entry point for ``python -m gptoss_batch``."""

from gptoss_batch.cli import main

main()
