"""``sdetr predict``: a trained checkpoint on image files — pictures and COCO-format detections.

    sdetr predict --checkpoint C IMAGE_OR_DIR... [--rho R] [--threshold T] [--out DIR] [--device D]

Each image goes through the checkpoint config's val transform; ``<out>/<image stem>.png`` shows its boxes
and, for Sparse DETR, the scoring network's scores, the tokens kept at ρ and the DAM target (the pictures
every sweep trial logs at evaluation: `sdetr.platform.training.pictures`). ``<out>/detections.json``
holds the detections in the COCO results format (``bbox`` = [x, y, w, h] in the original image's pixels)
plus ``file_name``. An image that cannot be read is reported by name and the others are still processed
(exit status 2 when any failed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError, DataError
from sdetr.platform.cli.common import parse_rho

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DETECTIONS_FILE = "detections.json"


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="pictures and COCO-format detections of a checkpoint on image files",
        description=(
            "Run a trained checkpoint on images (files, or folders of them): writes <out>/<stem>.png with "
            "the boxes (and, for Sparse DETR, the token scores, the kept tokens and the DAM target) and "
            f"<out>/{DETECTIONS_FILE} in the COCO results format."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a .pth file, a Ray checkpoint folder (state.pth) or a run folder (its newest checkpoint)",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--rho", help="keeping ratio in (0, 1] for a Sparse DETR (default: the trained one)")
    p.add_argument(
        "--threshold", type=float, default=0.3, help="draw and keep detections from this score (default 0.3)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output folder (default predictions)"
    )
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    p.set_defaults(func=cmd_predict)
    return p


def image_files(inputs: list[Path], errors: list[str]) -> list[Path]:
    """The image files named or inside the named folders (sorted); a missing path is an error naming it."""
    files = []
    for path in inputs:
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                errors.append(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files


def cmd_predict(args) -> int:
    # Heavy imports here: the parser is built for every `sdetr` command (see cli/__init__.py).
    import copy

    import PIL.Image

    from sdetr.detector.build import build_model
    from sdetr.detector.checkpoint import load_model_weights
    from sdetr.detector.data import make_transforms
    from sdetr.detector.data.categories import CategoryMap
    from sdetr.detector.precision import resolve_device
    from sdetr.platform.evaluation.checkpoints import load_checkpoint
    from sdetr.platform.layout import write_json
    from sdetr.platform.training.pictures import draw, save_png

    rho = parse_rho(args.rho)
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold:g}: expected a score in [0, 1]")
    errors: list[str] = []
    files = image_files(args.images, errors)
    ckpt = load_checkpoint(args.checkpoint, log=_stderr)
    cfg = ckpt.config
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone_weights = "none"  # the checkpoint holds the backbone
    model = build_model(model_cfg)
    load_model_weights(model, ckpt.file)
    # Labels -> the training set's category ids (a fine-tuned model's 7, 12, 40); none saved: label = id.
    categories = ckpt.state.get("categories")
    label_ids = CategoryMap.from_dict(categories).label_ids if isinstance(categories, dict) else None
    del ckpt
    if rho is not None:
        if not hasattr(model, "set_rho"):
            raise ConfigError(f"--rho {rho:g}: the checkpoint's model ({cfg.preset}) has no keeping ratio")
        model.set_rho(rho)  # ConfigError for a dense model, naming why
    device = resolve_device(args.device)
    model.to(device).eval()
    transform = make_transforms("val", cfg.data)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    detections: list[dict[str, Any]] = []
    written = 0
    for image_id, file in enumerate(files, start=1):
        try:
            with PIL.Image.open(file) as img:
                original = img.convert("RGB")
        except (OSError, ValueError) as exc:
            errors.append(f"{file}: cannot read the image ({exc})")
            continue
        tensor, _ = transform(original, {})
        pic, dets = draw(model, tensor, device, threshold=args.threshold)
        save_png(pic, out / f"{file.stem}.png")
        written += 1
        detections += coco_detections(
            dets, image_id, file.name, tensor.shape[-2:], original.size, args.threshold, label_ids
        )
        print(f"{file}: {int((dets['scores'] >= args.threshold).sum())} detections -> {out / file.stem}.png")
    path = write_json(out / DETECTIONS_FILE, detections, indent=1)
    print(f"{written} of {len(files)} images; detections (COCO results format): {path}")
    for message in errors:
        print(f"sdetr: error: {message}", file=sys.stderr)
    if not files and not errors:
        raise DataError("no images given")
    return 2 if errors else 0


def coco_detections(
    dets, image_id: int, file_name: str, input_hw, original_wh, threshold: float, label_ids=None
) -> list[dict]:
    """Detections in the input's pixels -> COCO results ([x, y, w, h] in the original image's pixels),
    labels as category ids through ``label_ids`` (a `CategoryMap`'s; None: label = id)."""
    sx = original_wh[0] / input_hw[1]
    sy = original_wh[1] / input_hw[0]
    out = []
    for (x1, y1, x2, y2), label, score in zip(
        dets["boxes"].tolist(), dets["labels"].tolist(), dets["scores"].tolist()
    ):
        if score < threshold:
            continue
        if label_ids is not None:
            label = label_ids[label] if 0 <= label < len(label_ids) else -1
            if label < 0:
                continue  # a label no category of the training set uses
        bbox = [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]
        out.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "category_id": int(label),
                "bbox": [round(v, 2) for v in bbox],
                "score": round(float(score), 4),
            }
        )
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
