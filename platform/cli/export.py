"""``sdetr export``: a trained checkpoint as ONNX (standard operators, for ONNX Runtime and other consumers)
or a torch.export program (``.pt2``, keeping the compiled deformable-attention op).

The exported graph takes normalised images ``[N, 3, H, W]`` (H and W multiples of 64, dynamic) and
returns ``pred_logits [N, Q, K]`` and ``pred_boxes [N, Q, 4]``; Sparse DETR's ρ is fixed at export
(``--rho``, default the trained one): one file per ρ. Bad input (an unknown format, ρ outside (0, 1], an
existing output without ``--force``, a checkpoint that is not a detector sdetr exports) is one line on
stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdetr.detector.errors import ConfigError
from sdetr.platform.cli.common import parse_rho

EXTENSIONS = {"onnx": ".onnx", "torch": ".pt2"}


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a trained checkpoint as ONNX or a torch.export program",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint file (sdetr or official .pth), a Ray checkpoint folder or a run folder",
    )
    # Checked by the handler (not argparse's choices) so a wrong value is the usual one-line error.
    p.add_argument("--format", required=True, help="onnx (standard operators) or torch (a .pt2 program)")
    p.add_argument(
        "--rho", help="Sparse DETR's keeping ratio in (0, 1], fixed in the graph (default: the trained one)"
    )
    p.add_argument(
        "--input",
        default="832x1344",
        help="HxW of the example image traced (multiples of 64; the exported size stays dynamic)",
    )
    p.add_argument(
        "--output", type=Path, help="the file to write (default: <run>/export/<preset>[_rho<R>].onnx|.pt2)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--static", action="store_true", help="fix the image size to --input (not dynamic)")
    p.set_defaults(func=cmd_export)
    return p


def parse_format(text: str) -> str:
    fmt = str(text).strip().lower()
    if fmt not in EXTENSIONS:
        raise ConfigError(f"--format {text!r}: unknown format; expected one of {', '.join(EXTENSIONS)}")
    return fmt


def parse_input(text: str) -> tuple[int, int]:
    from sdetr.detector.export import check_input_hw

    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--input {text!r}: expected HxW, e.g. 832x1344")
    return check_input_hw((int(parts[0]), int(parts[1])))


def default_output(ckpt, preset: str, fmt: str, rho: float | None) -> Path:
    base = ckpt.run_dir if ckpt.run_dir is not None else ckpt.file.parent
    suffix = f"_rho{rho:g}" if rho is not None else ""
    return base / "export" / f"{preset}{suffix}{EXTENSIONS[fmt]}"


def cmd_export(args) -> int:
    import copy

    from sdetr.detector.build import build_model
    from sdetr.detector.checkpoint import load_model_weights
    from sdetr.detector.export import check_rho, export_onnx, export_torch
    from sdetr.detector.export.common import EXPORTABLE_ARCHS, refuse_existing
    from sdetr.platform.evaluation.checkpoints import load_checkpoint

    fmt = parse_format(args.format)
    rho = parse_rho(args.rho)
    input_hw = parse_input(args.input)
    if args.output is not None:
        refuse_existing(args.output, args.force)  # before the checkpoint is even read
    ckpt = load_checkpoint(args.checkpoint, log=_stderr)
    cfg = ckpt.config
    arch = cfg.model.arch
    if arch not in EXPORTABLE_ARCHS:
        raise ConfigError(
            f"{ckpt.file}: a {arch} model ({cfg.preset}); export supports {', '.join(EXPORTABLE_ARCHS)}"
        )
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone_weights = "none"  # the checkpoint holds the backbone
    model = build_model(model_cfg)
    load_model_weights(model, ckpt.file)  # another architecture: the differing keys, one line
    check_rho(rho, model)
    output = args.output or default_output(ckpt, cfg.preset, fmt, rho)
    refuse_existing(output, args.force)
    del ckpt
    write = export_onnx if fmt == "onnx" else export_torch
    path = write(
        model, output, arch=arch, rho=rho, input_hw=input_hw, dynamic=not args.static, overwrite=args.force
    )
    kept = f", rho {rho:g}" if rho is not None else ""
    print(f"{path} ({fmt}{kept}; input images [N, 3, H, W], outputs pred_logits, pred_boxes)")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
