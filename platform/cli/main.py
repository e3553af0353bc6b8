"""The ``sdetr`` command line: one module per command group, each registering its parser and handler.

User mistakes (`SdetrError`) print one line, ``sdetr: error: ...``, and exit with status 2; anything
else is a bug and keeps its traceback. Heavy modules (torch, Ray, MLflow) are imported by the handlers,
so ``sdetr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from sdetr.detector.errors import SdetrError
from sdetr.platform.cli.cost import add_cost_parser
from sdetr.platform.cli.data import add_data_parser
from sdetr.platform.cli.doctor import add_doctor_parser
from sdetr.platform.cli.eval import add_eval_parser
from sdetr.platform.cli.export import add_export_parser
from sdetr.platform.cli.model import add_model_parser
from sdetr.platform.cli.predict import add_predict_parser
from sdetr.platform.cli.sweep import add_sweep_parsers
from sdetr.platform.cli.train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdetr",
        description="Train Sparse DETR and its baselines on Ray; sweep their accuracy-versus-cost trade-off.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_cost_parser(sub)
    add_sweep_parsers(sub)
    add_eval_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_doctor_parser(sub)
    return parser


def user_message(exc: BaseException) -> str:
    """The message of a user error, without the traceback text that DataLoader workers wrap around it."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdetrError as exc:
        print(f"sdetr: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdetr: interrupted", file=sys.stderr)
        return 130
