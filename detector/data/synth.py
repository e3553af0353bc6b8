"""A small synthetic detection data set in the exact COCO 2017 layout.

Five shape classes (ids 1..5, `SYNTH_CATEGORIES`) drawn as solid, high-contrast shapes on textured
backgrounds (noise, gradients, stripes). The class is determined by the shape alone: each class has
a preferred colour only 60% of the time, so colour helps but cannot replace shape. Shapes are
stretched (aspect 0.7..1.4) so boxes are not all square.

The mix is chosen so a tiny detector trained from scratch on a CPU learns it in minutes while every
COCOeval bucket is populated (COCO's fixed area thresholds 32^2 and 96^2, in original pixels):

* images 192..384 px per side (``min_size``/``max_size``), quality-90 JPEG;
* ~4% images without objects, ~10% crowded (8..16 objects, overlapping up to 35% of the smaller box),
  the rest 1..6 objects that barely overlap;
* object areas ~15% small (sides 14..31 px), ~55% medium (32..95), ~30% large (96..80% of the image);
* ~5% of images have a crowd region (iscrowd=1): a cluster of tiny shapes of one class under one box.

Everything is drawn from ``numpy.random.default_rng([seed, split, index])``, so the same seed gives
byte-identical files, and one image does not depend on how many came before it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

from sdetr.detector.errors import DataError

MARKER = "synth.json"  # what made this set; lets a re-run with the same arguments skip
SYNTH_CATEGORIES = ("circle", "square", "triangle", "cross", "ring")
# Preferred fill colour per class (RGB); used for 60% of the objects of that class.
_CLASS_COLOURS = ((220, 40, 40), (40, 90, 230), (40, 190, 60), (245, 200, 30), (200, 60, 210))
_COLOUR_CORRELATION = 0.6
_MIN_CONTRAST = 90.0  # luminance difference between a shape and its background (0..255)
_SIZE_RANGES = {"small": (14, 31), "medium": (32, 95), "large": (96, None)}
_SPLIT_INDEX = {"train": 0, "val": 1}
_VAL_ID_OFFSET = 1_000_000  # distinct image ids per split make mixed-up files easy to spot


# -- drawing ---------------------------------------------------------------------------------------
def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float32[H, W, 3] texture with mid-range luminance so bright and dark shapes both stand out."""
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    kind = rng.integers(3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == 0:  # blotchy noise: coarse random field upsampled, plus fine grain below
        cell = int(rng.integers(8, 33))
        coarse = rng.normal(0, 22, size=(height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        coarse_img = PIL.Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8))
        smooth = np.asarray(coarse_img.resize((width, height), PIL.Image.BILINEAR), dtype=np.float32)
        img = base + (smooth - 128)
    elif kind == 1:  # linear gradient between two colours
        other = rng.uniform(60, 190, size=3).astype(np.float32)
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        img = base + t[..., None] * (other - base)
    else:  # sinusoidal stripes
        period = rng.uniform(6, 30)
        amplitude = rng.uniform(15, 35)
        img = base + amplitude * np.sin(2 * math.pi * along / period)[..., None]
    grain = rng.standard_normal(size=(height, width, 3), dtype=np.float32) * rng.uniform(3, 10)
    return img + grain


def _shape_mask(category: int, w: int, h: int, rng: np.random.Generator) -> tuple[PIL.Image.Image, list]:
    """Anti-aliased "L" mask of size (w, h) whose shape touches all four sides, and its outline polygon.

    Drawn at 2x and box-filtered down, so small shapes keep recognisable edges.
    """
    s = 2
    mask = PIL.Image.new("L", (w * s, h * s), 0)
    draw = PIL.ImageDraw.Draw(mask)
    W, H = w * s - 1, h * s - 1
    name = SYNTH_CATEGORIES[category - 1]
    if name in ("circle", "ring"):
        draw.ellipse([0, 0, W, H], fill=255)
        if name == "ring":
            t = rng.uniform(0.18, 0.28)
            draw.ellipse([W * t, H * t, W * (1 - t), H * (1 - t)], fill=0)
        poly = [
            (w / 2 + w / 2 * math.cos(a), h / 2 + h / 2 * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 16, endpoint=False)
        ]
    elif name == "square":
        draw.rectangle([0, 0, W, H], fill=255)
        poly = [(0, 0), (w, 0), (w, h), (0, h)]
    elif name == "triangle":
        poly = [(0, h), (w, h), (w / 2, 0)] if rng.random() < 0.5 else [(0, 0), (w, 0), (w / 2, h)]
        draw.polygon([(px * W / w, py * H / h) for px, py in poly], fill=255)
    else:  # cross: a plus sign with arms 30..40% as thick as the box
        t = rng.uniform(0.3, 0.4)
        a0, a1 = (1 - t) / 2, (1 + t) / 2
        draw.rectangle([W * a0, 0, W * a1, H], fill=255)
        draw.rectangle([0, H * a0, W, H * a1], fill=255)
        poly = [
            (w * a0, 0), (w * a1, 0), (w * a1, h * a0), (w, h * a0), (w, h * a1), (w * a1, h * a1),
            (w * a1, h), (w * a0, h), (w * a0, h * a1), (0, h * a1), (0, h * a0), (w * a0, h * a0),
        ]  # fmt: skip
    return mask.resize((w, h), PIL.Image.BOX), poly


def _shape_colour(rng: np.random.Generator, category: int, background_lum: float) -> tuple[int, int, int]:
    """Class colour (sometimes) or a random one, pushed towards black or white until it contrasts."""
    if rng.random() < _COLOUR_CORRELATION:
        colour = np.array(_CLASS_COLOURS[category - 1], dtype=np.float32) + rng.uniform(-25, 25, 3)
    else:
        colour = rng.uniform(0, 255, 3).astype(np.float32)
    colour = np.clip(colour, 0, 255)
    lum = float(_luminance(colour))
    if abs(lum - background_lum) < _MIN_CONTRAST:
        target = 255.0 if background_lum < 128 else 0.0
        needed = background_lum + _MIN_CONTRAST if target else background_lum - _MIN_CONTRAST
        t = min(1.0, max(0.0, (needed - lum) / (target - lum)))
        colour = colour + t * (target - colour)
    return tuple(int(round(c)) for c in np.clip(colour, 0, 255))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller of two xywh boxes (0 = disjoint, 1 = one inside the other)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _place(rng, width, height, w, h, placed, max_overlap, tries=30):
    for _ in range(tries):
        box = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
        if all(_overlap(box, other) <= max_overlap for other in placed):
            return box
    return None


def _object_size(rng: np.random.Generator, bucket: str, limit: int) -> tuple[int, int]:
    lo, hi = _SIZE_RANGES[bucket]
    hi = min(hi or limit, limit)
    lo = min(lo, hi)
    side = math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))  # log-uniform: no bias to the top
    aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    w = max(6, min(limit, int(round(side * math.sqrt(aspect)))))
    h = max(6, min(limit, int(round(side / math.sqrt(aspect)))))
    return w, h


def _paint(canvas: np.ndarray, bg: np.ndarray, rng, category: int, box) -> list:
    x, y, w, h = box
    mask, poly = _shape_mask(category, w, h, rng)
    colour = _shape_colour(rng, category, float(_luminance(bg[y : y + h, x : x + w].mean(axis=(0, 1)))))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    region = canvas[y : y + h, x : x + w]
    region[...] = region * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha
    return [round(v, 2) for px, py in poly for v in (x + px, y + py)]


def make_image(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[np.ndarray, list[dict]]:
    """One uint8[H, W, 3] image and its annotations (``category_id``, ``bbox``, ``iscrowd``, polygon)."""
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    bg = _background(rng, width, height)
    canvas = bg.copy()
    limit = int(0.8 * min(width, height))
    # Bucket probabilities are (small, medium, large); crowded images use smaller objects to fit.
    mode = rng.random()
    if mode < 0.04:  # no objects
        n, max_overlap, buckets = 0, 0.0, (0.15, 0.55, 0.30)
    elif mode < 0.14:  # crowded
        n, max_overlap, buckets = int(rng.integers(8, 17)), 0.35, (0.35, 0.65, 0.0)
    else:  # typical: 1..6 objects, mostly 2..4
        n = int(rng.choice(6, p=(0.2, 0.25, 0.2, 0.15, 0.1, 0.1))) + 1
        max_overlap, buckets = 0.05, (0.15, 0.55, 0.30)
    objects: list[dict] = []
    placed: list[tuple[int, int, int, int]] = []
    if n and rng.random() < 0.05:  # a crowd region: tiny shapes of one class under one iscrowd box
        cw, ch = (int(v) for v in rng.integers(40, 71, size=2))
        region = _place(rng, width, height, min(cw, width), min(ch, height), placed, 0.0)
        if region is not None:
            category = int(rng.integers(1, 6))
            rx, ry, rw, rh = region
            x0, y0, x1, y1 = rx + rw, ry + rh, rx, ry
            for _ in range(int(rng.integers(6, 13))):
                side = min(int(rng.integers(7, 12)), rw, rh)
                sx, sy = int(rng.integers(rx, rx + rw - side + 1)), int(rng.integers(ry, ry + rh - side + 1))
                _paint(canvas, bg, rng, category, (sx, sy, side, side))
                x0, y0, x1, y1 = min(x0, sx), min(y0, sy), max(x1, sx + side), max(y1, sy + side)
            box = (x0, y0, x1 - x0, y1 - y0)
            placed.append(box)
            outline = [x0, y0, x1, y0, x1, y1, x0, y1]
            objects.append({"category_id": category, "bbox": box, "iscrowd": 1, "segmentation": [outline]})
    sizes = [
        _object_size(rng, ("small", "medium", "large")[int(rng.choice(3, p=buckets))], limit)
        for _ in range(n)
    ]
    # Largest first: they are the hardest to fit, and small ones then fill the gaps.
    for w, h in sorted(sizes, key=lambda wh: -wh[0] * wh[1]):
        box = _place(rng, width, height, w, h, placed, max_overlap)
        if box is None:
            continue
        category = int(rng.integers(1, 6))
        poly = _paint(canvas, bg, rng, category, box)
        placed.append(box)
        objects.append({"category_id": category, "bbox": box, "iscrowd": 0, "segmentation": [poly]})
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), objects


# -- writing ---------------------------------------------------------------------------------------
def _write_split(root: Path, split: str, count: int, seed: int, min_size: int, max_size: int) -> dict:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    stats = {"images": count, "empty_images": 0, "crowded_images": 0, "crowd_annotations": 0}
    stats.update(small=0, medium=0, large=0, max_objects=0)
    id_offset = _VAL_ID_OFFSET if split == "val" else 0
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_INDEX[split], index])
        pixels, objects = make_image(rng, min_size, max_size)
        image_id = id_offset + index + 1
        file_name = f"{image_id:012d}.jpg"
        PIL.Image.fromarray(pixels).save(folder / file_name, format="JPEG", quality=90)
        height, width = pixels.shape[:2]
        images.append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
        )
        plain = [o for o in objects if not o["iscrowd"]]
        stats["empty_images"] += not plain
        stats["crowded_images"] += len(plain) >= 8
        stats["max_objects"] = max(stats["max_objects"], len(plain))
        for obj in objects:
            x, y, w, h = obj["bbox"]
            area = float(w * h)  # box area: these shapes are solid, and it keeps S/M/L = box size
            if obj["iscrowd"]:
                stats["crowd_annotations"] += 1
            else:
                stats["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": area,
                    "iscrowd": obj["iscrowd"],
                    "segmentation": obj["segmentation"],
                }
            )
    stats["annotations"] = len(annotations)
    stats["objects_per_image"] = round((len(annotations) - stats["crowd_annotations"]) / max(count, 1), 2)
    coco = {
        "info": {
            "description": f"sdetr synthetic shapes ({split}, seed {seed})",
            "version": "1.0",
            "year": 2017,
        },
        "licenses": [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTH_CATEGORIES)
        ],
    }
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)
    return stats


def generate_synthetic_coco(
    out_dir: str | Path,
    n_train: int = 1000,
    n_val: int = 100,
    seed: int = 0,
    min_size: int = 192,
    max_size: int = 384,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/{train2017,val2017}/*.jpg`` and ``out_dir/annotations/instances_*2017.json``.

    The set is built in a hidden sibling folder and renamed into place at the end, so an interrupted
    run never leaves something that looks complete. A non-empty ``out_dir`` is replaced only with
    ``overwrite=True``. Returns a summary: per split counts of images, annotations, empty and crowded
    images, crowd annotations and small/medium/large objects, plus the elapsed seconds.
    """
    out = Path(out_dir)
    if not 8 <= min_size <= max_size:
        raise DataError(f"synthetic image sizes need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    if n_train < 0 or n_val < 0:
        raise DataError(f"image counts must be >= 0, got n_train={n_train}, n_val={n_val}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    params = {"n_train": n_train, "n_val": n_val, "seed": seed, "min_size": min_size, "max_size": max_size}
    marker = out / MARKER
    if not overwrite and marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous.get("params") == params:
            # Same arguments, same bytes: re-running the README's command is a no-op.
            return {**previous, "out_dir": str(out), "up_to_date": True}
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"{out} exists and is not empty (and is not a synthetic set made with these arguments); "
            "pass --overwrite to replace it"
        )
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        splits = {
            "train": _write_split(tmp, "train", n_train, seed, min_size, max_size),
            "val": _write_split(tmp, "val", n_val, seed, min_size, max_size),
        }
        summary = {"seed": seed, "categories": list(SYNTH_CATEGORIES), "params": params, **splits}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2))
        if out.exists():
            # Move the old set aside first so the new one appears in a single rename.
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out), "seconds": round(time.perf_counter() - start, 2), **summary}
