"""COCO 2017 detection data set, with strict validation of the annotation file.

Layout (the official one)::

    ROOT/train2017/*.jpg
    ROOT/val2017/*.jpg
    ROOT/annotations/instances_train2017.json
    ROOT/annotations/instances_val2017.json

Labels come from the data set's `CategoryMap` (data/categories.py): the raw category ids as DETR for COCO
and other compactly numbered sets (``num_classes`` = max id + 1), contiguous labels 0..K-1 for arbitrary
ids (e.g. 7, 12, 40 -> 0, 1, 2), mapped back to the ids for evaluation and predictions. Crowd
annotations are dropped from the training targets (COCOeval still uses them to ignore detections),
and boxes are converted from xywh to xyxy and clamped to the image.

Annotation problems a user can fix raise `DataError` naming the file, the image/annotation and the
field. Boxes that cannot be trained on (width or height <= 0, or entirely outside the image) are not
fatal: they are removed from both the training targets and the evaluation ground truth, counted, and
reported in one warning line per file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.utils.data
from pycocotools.coco import COCO

from sdetr.detector.config import DataConfig
from sdetr.detector.data.categories import CategoryMap, build_category_map, check_same_categories
from sdetr.detector.data.transforms import make_transforms
from sdetr.detector.errors import DataError

logger = logging.getLogger(__name__)

LAYOUT = (
    "expected the COCO 2017 layout: ROOT/train2017/*.jpg, ROOT/val2017/*.jpg, "
    "ROOT/annotations/instances_train2017.json, ROOT/annotations/instances_val2017.json "
    "(sdetr.detector.data.synth.generate_synthetic_coco writes a small synthetic set in this layout)"
)
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("id", "image_id", "bbox", "category_id")
_MAX_EXAMPLES = 5
_reported_files: set[str] = set()  # one warning per annotation file per process


@dataclass
class AnnotationReport:
    """What `validate_annotations` kept and skipped in one annotation file."""

    file: str
    num_images: int = 0
    num_annotations: int = 0  # kept, crowd included
    num_crowd: int = 0
    num_degenerate: int = 0  # width or height <= 0
    num_outside: int = 0  # no overlap with the image
    degenerate_ids: list[int] = field(default_factory=list)  # first few examples only
    outside_ids: list[int] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return self.num_degenerate + self.num_outside

    def warning_line(self) -> str | None:
        """One line summarising the skipped boxes, or None when nothing was skipped."""
        if not self.num_skipped:
            return None

        def part(count: int, ids: list[int], what: str) -> str:
            shown = ", ".join(str(i) for i in ids) + (", ..." if count > len(ids) else "")
            return f"{count} {what} ({'id' if count == 1 else 'ids'} {shown})"

        parts = []
        if self.num_degenerate:
            parts.append(part(self.num_degenerate, self.degenerate_ids, "with width/height <= 0"))
        if self.num_outside:
            parts.append(part(self.num_outside, self.outside_ids, "outside the image"))
        noun = "box" if self.num_skipped == 1 else "boxes"
        return f"skipped {self.num_skipped} {noun} in {Path(self.file).name}: {', '.join(parts)}"


# -- validation ------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(item: Any, keys: tuple[str, ...], where: str, what: str) -> None:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected {what} to be a JSON object, got {type(item).__name__}")
    for key in keys:
        if key not in item:
            raise DataError(f"{where}: missing required field {key!r}")


def validate_coco_dict(data: Any, source: str) -> tuple[dict[str, Any], AnnotationReport]:
    """Check a parsed COCO detection dict; see `validate_annotations`. ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{source}: missing required top-level field {key!r}")
        if not isinstance(data[key], list):
            raise DataError(f"{source}: field {key!r} must be a list, got {type(data[key]).__name__}")
    report = AnnotationReport(file=source, num_images=len(data["images"]))

    category_ids: set[int] = set()
    for index, cat in enumerate(data["categories"]):
        _require(cat, ("id",), f"{source}: category at index {index}", "a category")
        if not _is_int(cat["id"]):
            raise DataError(f"{source}: category at index {index}: 'id' {cat['id']!r} is not an integer")
        if cat["id"] in category_ids:
            raise DataError(f"{source}: category at index {index}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])

    image_sizes: dict[int, tuple[float, float]] = {}
    for index, img in enumerate(data["images"]):
        where = f"{source}: image id {img['id']}" if isinstance(img, dict) and "id" in img else None
        _require(img, _IMAGE_KEYS, where or f"{source}: image at index {index}", "an image")
        if not _is_int(img["id"]):
            raise DataError(f"{source}: image at index {index}: 'id' must be an integer, got {img['id']!r}")
        if img["id"] in image_sizes:
            raise DataError(f"{source}: image at index {index}: duplicate image id {img['id']}")
        for key in ("width", "height"):
            if not _is_number(img[key]) or img[key] <= 0:
                raise DataError(f"{where}: field {key!r} must be a positive number, got {img[key]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DataError(f"{where}: field 'file_name' must be a non-empty string")
        image_sizes[img["id"]] = (float(img["width"]), float(img["height"]))

    kept = []
    for index, ann in enumerate(data["annotations"]):
        has_id = isinstance(ann, dict) and "id" in ann
        where = f"{source}: annotation id {ann['id']}" if has_id else f"{source}: annotation at index {index}"
        _require(ann, _ANNOTATION_KEYS, where, "an annotation")
        if not _is_int(ann["image_id"]) or ann["image_id"] not in image_sizes:
            raise DataError(f"{where}: field 'image_id' refers to image {ann['image_id']!r}, not in 'images'")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
            known = ", ".join(str(c) for c in sorted(category_ids)[:20])
            raise DataError(
                f"{where}: field 'category_id' is {ann['category_id']!r}, not in 'categories' (ids {known})"
            )
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(
                f"{where}: field 'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}"
            )
        x, y, w, h = bbox
        img_w, img_h = image_sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            report.num_degenerate += 1
            if len(report.degenerate_ids) < _MAX_EXAMPLES:
                report.degenerate_ids.append(ann["id"])
            continue
        # Outside = nothing left after clamping to the image, exactly what training would drop.
        if min(x + w, img_w) <= max(x, 0.0) or min(y + h, img_h) <= max(y, 0.0):
            report.num_outside += 1
            if len(report.outside_ids) < _MAX_EXAMPLES:
                report.outside_ids.append(ann["id"])
            continue
        # COCOeval reads these two; fill the COCO defaults so hand-made files evaluate too.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w * h))
        report.num_crowd += int(bool(ann["iscrowd"]))
        kept.append(ann)

    report.num_annotations = len(kept)
    cleaned = dict(data)
    cleaned["annotations"] = kept
    return cleaned, report


def validate_annotations(ann_file: str | Path) -> tuple[dict[str, Any], AnnotationReport]:
    """Read and check a COCO ``instances_*.json``.

    Returns the parsed dict with unusable boxes removed (and ``area``/``iscrowd`` defaults filled in)
    and an `AnnotationReport`. Raises `DataError` for a missing file, invalid JSON (with line and
    column), a missing required field, a bad bbox or an unknown image/category id.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; {LAYOUT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start}); is this a JSON file?") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc.strerror})") from None
    return validate_coco_dict(data, str(path))


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools `COCO` built from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# -- data set --------------------------------------------------------------------------------------
class CocoDetection(torch.utils.data.Dataset):
    """Items are ``(image, target)``.

    image: FloatTensor[3, H, W] (after ``transforms``; a PIL image when ``transforms`` is None).
    target: ``boxes`` FloatTensor[n, 4] (cxcywh in [0, 1] after `Normalize`, xyxy pixels before),
    ``labels`` int64[n] (labels of ``category_map``), ``image_id`` int64 scalar, ``orig_size`` and ``size``
    int64[2] as (h, w) before/after transforms, ``area`` float32[n], ``iscrowd`` int64[n].

    ``max_images`` > 0 keeps the first images by id, and restricts ``self.coco`` (the ground truth
    for evaluation) to them so a quick run evaluates on exactly the images it loads.

    ``category_map``: the labels to train on; None builds it from this file (``category_mapping``: auto,
    raw or contiguous). A validation set passes the training set's map: a category it lacks is a DataError.
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        transforms=None,
        max_images: int = 0,
        category_map: CategoryMap | None = None,
        category_mapping: str = "auto",
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.img_folder.is_dir():
            raise DataError(f"image folder {self.img_folder} does not exist; {LAYOUT}")
        data, self.report = validate_annotations(self.ann_file)
        line = self.report.warning_line()
        key = str(self.ann_file.resolve())
        if line and key not in _reported_files:
            _reported_files.add(key)
            logger.warning(line)
        if max_images > 0:
            keep_ids = set(sorted(img["id"] for img in data["images"])[:max_images])
            data = dict(data)
            data["images"] = [img for img in data["images"] if img["id"] in keep_ids]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep_ids]
        self.coco = coco_from_dict(data)
        self.ids: list[int] = sorted(self.coco.imgs)
        own = build_category_map(data["categories"], category_mapping, source=str(self.ann_file))
        if category_map is not None:
            check_same_categories(category_map, own, "the training set", str(self.ann_file))
        self.category_map: CategoryMap = category_map or own
        # The largest label (the raw id in raw mode): `platform/train.py` checks it against num_classes.
        self.num_categories_max_id: int = max(self.category_map.num_classes - 1, 0)
        self.transforms = transforms
        self._warned_size = False

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> PIL.Image.Image:
        info = self.coco.imgs[image_id]
        path = self.img_folder / info["file_name"]
        try:
            with PIL.Image.open(path) as img:
                image = img.convert("RGB")  # forces the full decode, so corrupt files fail here
        except FileNotFoundError:
            raise DataError(f"image file {path} (image id {image_id}) is missing; {LAYOUT}") from None
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
            raise DataError(f"image file {path} (image id {image_id}) cannot be read: {exc}") from None
        if not self._warned_size and (image.width, image.height) != (info["width"], info["height"]):
            # Boxes are clamped to the real size, as DETR; a mismatch usually means resized files.
            self._warned_size = True
            logger.warning(
                "image file %s (image id %s) is %dx%d but %s says %sx%s; using the file's size",
                path, image_id, image.width, image.height, self.ann_file.name, info["width"], info["height"],
            )  # fmt: skip
        return image

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = prepare_target(
            image_id, self.coco.imgToAnns.get(image_id, []), image.width, image.height, self.category_map
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def prepare_target(
    image_id: int,
    annotations: list[dict[str, Any]],
    width: int,
    height: int,
    category_map: CategoryMap | None = None,
) -> dict:
    """COCO annotations of one image -> DETR target with xyxy pixel boxes clamped to the image; labels
    through ``category_map`` (None: the raw ids)."""
    anns = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    category_ids = [a["category_id"] for a in anns]
    if category_map is None:
        labels = torch.tensor(category_ids, dtype=torch.int64)
    else:
        labels = category_map.labels(category_ids).reshape(-1)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32)[keep],
        "iscrowd": torch.zeros(len(anns), dtype=torch.int64)[keep],
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }


def split_paths(root: str | Path, split_folder: str) -> tuple[Path, Path]:
    """``(ROOT/<split_folder>, ROOT/annotations/instances_<split_folder>.json)``."""
    root = Path(root)
    return root / split_folder, root / "annotations" / f"instances_{split_folder}.json"


def build_dataset(
    split: str, cfg: DataConfig, category_map: CategoryMap | None = None, category_mapping: str = "auto"
) -> CocoDetection:
    """The "train" or "val" split of ``cfg.root`` with DETR's transforms for that split; pass the
    training set's ``category_map`` to the val split so both label the categories alike."""
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; {LAYOUT}")
    folder_name = cfg.train_split if split == "train" else cfg.val_split
    max_images = cfg.max_train_images if split == "train" else cfg.max_val_images
    img_folder, ann_file = split_paths(root, folder_name)
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist; {LAYOUT}")
    return CocoDetection(
        img_folder,
        ann_file,
        make_transforms(split, cfg),
        max_images=max_images,
        category_map=category_map,
        category_mapping=category_mapping,
    )
