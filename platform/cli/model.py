"""``sdetr model list|info|config``: the presets and their models."""

from __future__ import annotations

import json
import sys

from sdetr.platform.cli.common import add_set_argument


def add_model_parser(sub) -> None:
    model = sub.add_parser("model", help="inspect presets and models")
    model.set_defaults(func=cmd_model)
    cmds = model.add_subparsers(dest="model_cmd", required=True)
    cmds.add_parser("list", help="list the presets")
    info = cmds.add_parser("info", help="summary of a preset's model")
    info.add_argument("preset")
    add_set_argument(info)
    info.add_argument("--json", action="store_true", help="one JSON object on stdout")
    show = cmds.add_parser("config", help="print a preset's full config as YAML")
    show.add_argument("preset")
    add_set_argument(show)


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
