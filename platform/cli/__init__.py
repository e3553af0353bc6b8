"""The ``sdetr`` command: one module per command group; `main` dispatches."""

from sdetr.platform.cli.main import main

__all__ = ["main"]
