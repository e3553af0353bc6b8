"""``sdetr cost``: parameters, GFLOPs (the papers' convention) and speed of presets.

    sdetr cost PRESET [--input HxW | --val N --data DIR] [--set key=value ...] [--json]
    sdetr cost --table [PRESET ...]

The cost model itself is `sdetr.detector.cost`; this module parses the arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from sdetr.detector.errors import ConfigError
from sdetr.platform.cli.common import add_set_argument

_HW = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
# The backbone plus the extra stride-64 level need at least this many pixels per side.
_MIN_SIDE = 64


def add_cost_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cost",
        help="parameters, GFLOPs (papers' convention) and FPS / latency of presets",
        description=(
            "Trainable and total parameters; GFLOPs as the Deformable / Sparse DETR papers count them "
            "(fvcore's convention: one multiply-add = one FLOP, bilinear sampling 4 per value, norms by "
            "fvcore's estimates, other element-wise ops free) and the plain total; FPS at batch 1 and 4 "
            "on a GPU, latency at batch 1 on CPU."
        ),
    )
    p.add_argument(
        "presets", nargs="*", metavar="PRESET", help="one preset (several, or none = all, with --table)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--input",
        metavar="HxW",
        help="GFLOPs on one random image of this size (default 850x1040, the official approximation)",
    )
    src.add_argument(
        "--val",
        type=int,
        metavar="N",
        help="GFLOPs averaged over the first N val images (after the val transform)",
    )
    p.add_argument("--data", type=Path, help="data root in the COCO 2017 layout, for --val (sets data.root)")
    add_set_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON object per preset on stdout")
    p.add_argument(
        "--table", action="store_true", help="a paper-style table (all presets unless some are named)"
    )
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    p.add_argument("--no-fps", action="store_true", help="skip the speed measurement")
    p.set_defaults(func=cmd_cost)
    return p


def parse_hw(text: str) -> tuple[int, int]:
    """``"850x1040"`` -> (850, 1040), or a ConfigError saying what is wrong."""
    m = _HW.match(text)
    if not m:
        raise ConfigError(f"--input {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 850x1040")
    h, w = int(m.group(1)), int(m.group(2))
    if min(h, w) < _MIN_SIDE:
        raise ConfigError(f"--input {text!r}: both sides must be at least {_MIN_SIDE} pixels")
    return h, w


def _check_args(args) -> tuple[list[str], tuple[int, int]]:
    import torch

    from sdetr.detector.build import validate_model_config
    from sdetr.detector.cost import FIXED_INPUT_HW
    from sdetr.detector.presets import get_preset, preset_names

    hw = parse_hw(args.input) if args.input is not None else FIXED_INPUT_HW
    if args.val is not None and args.val < 1:
        raise ConfigError(f"--val {args.val}: expected a positive number of images")
    if args.data is not None and args.val is None:
        raise ConfigError("--data is only used with --val N (GFLOPs averaged over val images)")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError(f"--device {args.device!r}: expected auto, cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: torch sees no CUDA device")
    if args.table:
        names = args.presets or preset_names()
    elif len(args.presets) == 1:
        names = args.presets
    else:
        raise ConfigError("give one PRESET (or --table for several; `sdetr model list` shows them)")
    for name in names:  # unknown presets and bad --set values fail before any work
        validate_model_config(get_preset(name, args.overrides).model)
    return names, hw


def cmd_cost(args) -> int:
    from sdetr.detector.cost import cost_of_preset
    from sdetr.detector.presets import get_preset

    names, hw = _check_args(args)
    results = []
    shares: dict = {}  # Deformable DETR's encoder GFLOPs per (width, levels, points): counted once
    where = f"the first {args.val} val images" if args.val else f"one {hw[0]}x{hw[1]} image"
    for i, name in enumerate(names, start=1):
        start = time.perf_counter()
        # A status line first: building a model, counting its FLOPs and timing it takes up to a minute.
        steps = f"counting GFLOPs on {where}" + ("" if args.no_fps else ", then timing it")
        count = f" ({i}/{len(names)})" if len(names) > 1 else ""
        print(f"sdetr cost: {name}{count}: {steps} ...", file=sys.stderr, flush=True)
        cfg = get_preset(name, args.overrides)
        if args.data is not None:
            cfg.data.root = str(args.data)
        res = cost_of_preset(
            cfg, input_hw=hw, val_images=args.val or 0, device=args.device, fps=not args.no_fps
        )
        if args.table and args.val is None:
            res["encoder_share"] = _encoder_share(cfg, res, hw, shares)
        results.append(res)
        if args.json:
            print(json.dumps(res), flush=True)
        elif not args.table:
            _print_one(res)
        if args.table:
            print(f"sdetr cost: {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    if args.table and not args.json:
        print(format_table(results))
    return 0


def _encoder_share(cfg, res: dict, hw: tuple[int, int], cache: dict) -> float | None:
    """The encoder's GFLOPs as a share of the dense 6-layer Deformable DETR encoder of the same width,
    levels and points at the same input (Lite DETR's measure, Table 3)."""
    from sdetr.detector.encoder_cost import encoder_flops, reference_config

    if res.get("gflops_encoder") is None or cfg.model.arch != "deformable_detr":
        return None
    reference = reference_config(cfg.model)
    key = (reference.hidden_dim, reference.num_feature_levels, reference.enc_n_points, reference.nheads)
    if key not in cache:
        cache[key] = encoder_flops(reference, hw) / 1e9
    return res["gflops_encoder"] / cache[key]


def _input_text(res: dict) -> str:
    if res["input_mode"] == "fixed":
        return f"one random image, {res['input']}"
    h, w = res["mean_input_hw"]
    return f"mean over the first {res['val_images']} val images (mean size 3x{h:.0f}x{w:.0f})"


def _print_one(res: dict) -> None:
    print(f"preset       {res['preset']}")
    print(f"input        {_input_text(res)}")
    params = f"{res['params_trainable'] / 1e6:.2f}M trainable, {res['params_total'] / 1e6:.2f}M total"
    if res["params_paper"] != res["params_trainable"]:
        params += f"; {res['params_paper'] / 1e6:.2f}M without the encoder aux heads (as the paper counts)"
    print(f"parameters   {params}")
    print(
        f"GFLOPs       {res['gflops']:.1f} (papers' convention: 1 per multiply-add); "
        f"{res['gflops_all']:.1f} counting multiply and add separately"
    )
    if res["gflops_without_enc_aux_heads"] != res["gflops"]:
        print(
            f"             {res['gflops_without_enc_aux_heads']:.1f} without the encoder aux heads "
            "(training-only, but run in eval mode too)"
        )
    print("  by part    " + ", ".join(f"{k} {v:.2f}" for k, v in res["gflops_by_part"].items()))
    if res["fps_b4"] is not None:
        print(
            f"speed        FPS {res['fps_b1']:.1f}, B4FPS {res['fps_b4']:.1f}, "
            f"latency {res['latency_ms']:.1f} ms ({res['device']}, {res['msda_backend']} ms_deform_attn)"
        )
    elif res["latency_ms"] is not None:
        print(
            f"speed        latency {res['latency_ms']:.0f} ms at batch 1 "
            f"({res['device']}, {res['msda_backend']} ms_deform_attn)"
        )


def format_table(results: list[dict]) -> str:
    """Markdown table in the papers' layout: params (M), GFLOPs, then FPS / B4FPS (GPU) or latency (CPU)."""
    gpu = any(r["fps_b4"] is not None for r in results)
    cpu_latency = not gpu and any(r["latency_ms"] is not None for r in results)
    header = ["Preset", "ρ", "Params (M)", "GFLOPs", "GFLOPs w/o enc aux", "GFLOPs (all)", "Encoder GFLOPs"]
    header += ["Encoder share"]
    header += ["FPS", "B4FPS"] if gpu else ["Latency b1 (ms)"] if cpu_latency else []
    rows = []
    for r in results:
        row = [
            r["preset"],
            f"{r['rho']:g}" if r["rho"] else "-",
            f"{r['params_paper'] / 1e6:.1f}",
            f"{r['gflops']:.1f}",
            f"{r['gflops_without_enc_aux_heads']:.1f}",
            f"{r['gflops_all']:.1f}",
            f"{r['gflops_encoder']:.1f}" if r.get("gflops_encoder") is not None else "-",
            f"{100 * r['encoder_share']:.0f} %" if r.get("encoder_share") is not None else "-",
        ]
        if gpu:
            row += [f"{r['fps_b1']:.1f}", f"{r['fps_b4']:.1f}"]
        elif cpu_latency:
            row += [f"{r['latency_ms']:.0f}" if r["latency_ms"] is not None else "-"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    first = results[0] if results else None
    notes = []
    if first is not None:
        notes.append(f"Input: {_input_text(first)}. Device: {first['device']}.")
    notes.append(
        "Params: trainable, without Sparse DETR's encoder aux heads (the papers' count). GFLOPs: papers' "
        "convention (fvcore's), everything the eval forward runs; w/o enc aux: less the encoder aux heads "
        "(training-only); GFLOPs (all): multiply and add counted separately; Encoder GFLOPs: the "
        "transformer encoder alone (Lite DETR's comparison), - for Faster R-CNN; Encoder share: of the dense "
        "6-layer Deformable DETR encoder of the same width at the same input (Lite DETR's Table 3)."
    )
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    return "\n".join(notes + [""] + table)
