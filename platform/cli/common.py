"""Arguments and config loading shared by the command groups."""

from __future__ import annotations

import argparse
import math


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


def parse_rho(text: str | None) -> float | None:
    """``--rho`` as a float in (0, 1], or a ConfigError naming the value."""
    from sdetr.detector.errors import ConfigError

    if text is None:
        return None
    try:
        rho = float(text)
    except ValueError:
        raise ConfigError(f"--rho {text!r}: not a number; expected a keeping ratio in (0, 1]") from None
    if not (math.isfinite(rho) and 0.0 < rho <= 1.0):
        raise ConfigError(f"--rho {text}: outside (0, 1]; ρ is the fraction of encoder tokens kept")
    return rho
