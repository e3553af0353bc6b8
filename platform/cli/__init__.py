"""The ``sdetr`` command: one module per command group; `main` dispatches.

Every command's handler imports what it runs (torch, Ray, MLflow, the models) inside the function:
building the parser must stay light so that ``sdetr --help`` answers at once. That is the only reason
for the function-level imports in this package.
"""

from sdetr.platform.cli.main import main

__all__ = ["main"]
