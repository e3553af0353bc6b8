"""The ``sdetr`` command line.

User mistakes (`SdetrError`) print one line, ``sdetr: error: ...``, and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdetr.detector.errors import SdetrError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.rho=0.2 (repeatable; a unique leaf name works too)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdetr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect presets and models").add_subparsers(
        dest="model_cmd", required=True
    )
    model.add_parser("list", help="list the presets")
    info = model.add_parser("info", help="summary of a preset's model")
    info.add_argument("preset")
    _add_set(info)
    info.add_argument("--json", action="store_true", help="one JSON object on stdout")
    show = model.add_parser("config", help="print a preset's full config as YAML")
    show.add_argument("preset")
    _add_set(show)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    synth = data.add_parser("synth", help="generate a synthetic data set in the COCO 2017 layout")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    synth.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    synth.set_defaults(func=cmd_data_synth)
    from sdetr.platform.shard import add_shard_parser

    add_shard_parser(data)

    train = sub.add_parser("train", help="train a detector")
    train.add_argument("--preset", help="preset name (see `sdetr model list`)")
    train.add_argument(
        "--config", type=Path, help="a YAML config (e.g. a run's config.yaml) instead of a preset"
    )
    train.add_argument("--data", type=Path, help="data root in the COCO 2017 layout (sets data.root)")
    train.add_argument("--epochs", type=int, help="sets optim.epochs")
    train.add_argument(
        "--output", type=Path, help="run folder (sets train.output_dir); re-running on it resumes the run"
    )
    _add_set(train)
    from sdetr.platform.ray_train import add_distributed_args

    add_distributed_args(train)

    from sdetr.platform.cost_cli import add_cost_parser

    add_cost_parser(sub)
    from sdetr.platform.sweep_cli import add_sweep_parsers

    add_sweep_parsers(sub)
    from sdetr.platform.eval_cli import add_eval_parser

    add_eval_parser(sub)
    from sdetr.platform.doctor import add_doctor_arguments

    add_doctor_arguments(
        sub.add_parser("doctor", help="check the installation and the active deformable-attention backend")
    )
    return parser


def _load_config(args):
    from sdetr.detector.config import Config
    from sdetr.detector.errors import ConfigError
    from sdetr.detector.presets import get_preset

    if bool(args.preset) == bool(getattr(args, "config", None)):
        raise ConfigError("give exactly one of --preset or --config")
    if args.preset:
        return get_preset(args.preset, args.overrides)
    return Config.from_yaml(args.config).override(args.overrides)


def cmd_model(args) -> int:
    from sdetr.detector.presets import get_preset, preset_names

    if args.model_cmd == "list":
        print("\n".join(preset_names()))
        return 0
    cfg = get_preset(args.preset, args.overrides)
    if args.model_cmd == "config":
        print(cfg.to_yaml(), end="")
        return 0
    from sdetr.detector.build import build_model, count_parameters

    model = build_model(cfg.model)
    state = model.state_dict()
    summary = {
        "preset": args.preset,
        "num_params_trainable": count_parameters(model, trainable_only=True),
        "num_params_total": count_parameters(model, trainable_only=False),
        "num_params_trainable_without_enc_aux_heads": count_parameters(model, include_enc_aux_heads=False),
        "state_dict": {k: list(v.shape) for k, v in state.items()},
    }
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return 0
    m = cfg.model
    print(f"preset            {args.preset}")
    print(
        f"architecture      {m.arch}"
        + (f", encoder {m.encoder} {m.lite_layout}" if m.encoder == "lite" else "")
    )
    print(f"backbone          {m.backbone} (weights: {m.backbone_weights})")
    if m.arch != "faster_rcnn":
        enc = m.lite_layout if m.encoder == "lite" else m.enc_layers  # a Lite layout sets its own depth
        print(
            f"transformer       d={m.hidden_dim} heads={m.nheads} enc={enc} dec={m.dec_layers} "
            f"ffn={m.dim_feedforward} levels={m.num_feature_levels} queries={m.num_queries}"
        )
    flags = [
        f
        for f in ("with_box_refine", "two_stage", "eff_query_init", "eff_specific_head", "use_enc_aux_loss")
        if getattr(m, f)
    ]
    print(f"options           {', '.join(flags) or 'none'}; rho={m.rho}")
    print(
        f"parameters        {summary['num_params_trainable'] / 1e6:.2f}M trainable, "
        f"{summary['num_params_total'] / 1e6:.2f}M total"
    )
    if m.use_enc_aux_loss:
        print(
            f"                  {summary['num_params_trainable_without_enc_aux_heads'] / 1e6:.2f}M trainable "
            "without the encoder aux heads (as the paper counts)"
        )
    print(f"state_dict        {len(state)} entries")
    return 0


def cmd_data(args) -> int:
    return args.func(args)


def cmd_data_synth(args) -> int:
    from sdetr.detector.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        args.out, n_train=args.train, n_val=args.val, seed=args.seed, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_train(args) -> int:
    cfg = _load_config(args)
    if args.data is not None:
        cfg.data.root = str(args.data)
    if args.epochs is not None:
        cfg.optim.epochs = args.epochs
    if args.workers is not None:
        from sdetr.platform.ray_train import run_from_args

        return run_from_args(args, cfg)
    from sdetr.platform.train import train

    if args.output is not None:
        cfg.train.output_dir = str(args.output)
    elif cfg.train.output_dir == "runs/train":
        cfg.train.output_dir = f"runs/{cfg.preset}"
    train(cfg)
    print(f"run folder: {cfg.train.output_dir}")
    return 0


def cmd_cost(args) -> int:
    from sdetr.platform.cost_cli import cmd_cost as run_cost

    return run_cost(args)


def cmd_doctor(args) -> int:
    from sdetr.platform.doctor import main_doctor

    return main_doctor(args)


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
    handlers = {
        "model": cmd_model,
        "data": cmd_data,
        "train": cmd_train,
        "cost": cmd_cost,
        "doctor": cmd_doctor,
    }
    if args.command not in handlers:
        handlers[args.command] = args.func  # subcommands that carry their handler (sweep, pareto, eval)
    try:
        return handlers[args.command](args)
    except SdetrError as exc:
        print(f"sdetr: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdetr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
