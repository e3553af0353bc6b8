"""Arguments and config loading shared by the command groups."""

from __future__ import annotations

import argparse


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.rho=0.2 (repeatable; a unique leaf name works too)",
    )


def load_config(args):
    """The config of ``--preset P`` or ``--config FILE``, with ``--set`` overrides applied."""
    from sdetr.detector.config import Config
    from sdetr.detector.errors import ConfigError
    from sdetr.detector.presets import get_preset

    if bool(args.preset) == bool(getattr(args, "config", None)):
        raise ConfigError("give exactly one of --preset or --config")
    if args.preset:
        return get_preset(args.preset, args.overrides)
    return Config.from_yaml(args.config).override(args.overrides)
