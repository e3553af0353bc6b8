"""A shard folder (``sdetr data shard``) read with pyarrow alone, no Ray: its checks, its ground truth,
one row decoded into ``(image, target)``, and a split as a map-style data set.

The Ray Data pipeline (reader.py) builds on the checks and the row decoding here; ``sdetr eval`` reads
a val split through `ShardDataset`, whose items are `CocoDetection`'s for the same images (labels are
the raw category ids, as `prepare_target` makes them without a category map), so an evaluation does
not depend on which of the two folders it is given.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools.coco import COCO

from sdetr.detector.data.coco import coco_from_dict, prepare_target, validate_annotations
from sdetr.detector.errors import DataError
from sdetr.platform.shards.manifest import MANIFEST, REQUIRED_COLUMNS, SCHEMA, load_manifest
from sdetr.platform.storage import Location

SPLITS = ("train", "val")


# -- the folder ------------------------------------------------------------------------------------
def check_shards(path: str | Path, splits: tuple[str, ...] | list[str] = SPLITS) -> dict[str, Any]:
    """Check a shard folder (local or a storage URI) on the driver, before any worker starts; returns
    its manifest.

    Raises `DataError` for a missing/unfinished manifest, an unknown split, a split without images, a
    missing shard file, or a Parquet file without the required columns (the message names the file and
    the columns).
    """
    folder = Location.of(path)
    manifest = load_manifest(folder)
    for split in splits:
        entry = manifest["splits"].get(split)
        if entry is None:
            have = ", ".join(sorted(manifest["splits"])) or "none"
            raise DataError(f"{folder}: no split {split!r} in {folder}/{MANIFEST} (has: {have})")
        if not entry.get("complete"):
            raise DataError(
                f"{folder}: split {split!r} was not finished (interrupted?); re-run `sdetr data shard` "
                "with the same arguments to complete it"
            )
        if int(entry.get("num_images", 0)) < 1:
            raise DataError(
                f"{folder}: split {split!r} has no images (annotations/instances_{split}2017.json lists "
                "none, or none of its images could be read)"
            )
        for shard in entry["shards"]:
            _check_shard_file(folder, shard["file"])
    return manifest


def _check_shard_file(folder: Location, rel: str) -> None:
    file = f"{folder}/{rel}"
    if not folder.is_file(rel):
        raise DataError(f"shard file {file} is missing; re-run `sdetr data shard` to rewrite it")
    try:
        with folder.open_input(rel) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"shard file {file} is not a readable Parquet file: {exc}") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise DataError(f"shard file {file} lacks required column(s) {', '.join(missing)}")
    wrong = [
        f"{name} is {schema.field(name).type}, expected {SCHEMA.field(name).type}"
        for name in REQUIRED_COLUMNS
        if not schema.field(name).type.equals(SCHEMA.field(name).type)
    ]
    if wrong:
        raise DataError(f"shard file {file}: wrong column type(s): {'; '.join(wrong)}")


def shard_files(path: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths (or URIs) of a split's non-empty shards, in image-id order; pyarrow reads both."""
    folder = Location.of(path)
    return [f"{folder}/{s['file']}" for s in manifest["splits"][split]["shards"] if s["rows"] > 0]


def coco_ground_truth(path: str | Path, split: str, max_images: int = 0) -> COCO:
    """The validated ground truth written by the sharder, as a pycocotools `COCO` for `evaluate`;
    ``max_images`` > 0 keeps the first images by id (as `CocoDetection`'s ``max_images``)."""
    folder = Location.of(path)
    rel = f"annotations/instances_{split}.json"
    if folder.local is not None:
        data, _ = validate_annotations(folder.local / rel)
    else:  # the validator reads a file: a local copy of the object
        with tempfile.TemporaryDirectory(prefix="sdetr-gt-") as tmp:
            local = Path(tmp) / "annotations" / f"instances_{split}.json"
            if folder.read_bytes(rel) is None:
                raise DataError(f"annotation file {folder}/{rel} does not exist; re-run `sdetr data shard`")
            data, _ = validate_annotations(folder.download(rel, local))
    if max_images > 0:
        keep = set(sorted(img["id"] for img in data["images"])[:max_images])
        data = dict(data)
        data["images"] = [img for img in data["images"] if img["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    return coco_from_dict(data)


# -- one row ---------------------------------------------------------------------------------------
def row_annotations(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A shard row's list columns -> COCO-style annotation dicts (``bbox``, ``category_id``, ...)."""
    boxes = row["boxes"]
    return [
        {
            "id": ann_id,
            "bbox": boxes[4 * k : 4 * k + 4],
            "category_id": category,
            "area": area,
            "iscrowd": crowd,
        }
        for k, (ann_id, category, area, crowd) in enumerate(
            zip(row["ann_ids"], row["category_ids"], row["area"], row["iscrowd"])
        )
    ]


def decode_image(row: dict[str, Any]) -> PIL.Image.Image:
    """The row's encoded bytes -> RGB PIL image (the same call `CocoDetection.load_image` makes)."""
    try:
        with PIL.Image.open(io.BytesIO(row["image"])) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise DataError(
            f"image {row['file_name']} (image id {row['image_id']}) cannot be decoded: {exc}"
        ) from None


def decode_sample(row: dict[str, Any]) -> tuple[PIL.Image.Image, dict[str, Any]]:
    """One shard row -> ``(image, target)`` exactly as `CocoDetection` builds it, before transforms."""
    image = decode_image(row)
    return image, prepare_target(row["image_id"], row_annotations(row), image.width, image.height)


# -- a split as a data set -------------------------------------------------------------------------
class ShardDataset:
    """One split of a shard folder as a map-style data set with `CocoDetection`'s items and ``coco``.

    ``dataset[i]`` is ``transforms(image, target)`` of the i-th image by id; ``max_images`` > 0 keeps the
    first images by id, ground truth included. One shard file's rows are held at a time, which suits
    reading in order (an evaluation); random access reads a file per jump.
    """

    def __init__(self, folder: str | Path, split: str, transforms=None, max_images: int = 0):
        folder = Location.of(folder)
        manifest = check_shards(folder, [split])
        self.coco = coco_ground_truth(folder, split, max_images)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.transforms = transforms
        wanted = set(self.ids)
        self._where: dict[int, tuple[str, int]] = {}  # image id -> (shard file, row)
        for file in shard_files(folder, manifest, split):
            if not wanted - self._where.keys():
                break
            ids = pq.read_table(file, columns=["image_id"]).column("image_id").to_pylist()
            self._where.update((i, (file, row)) for row, i in enumerate(ids) if i in wanted)
        lost = sorted(wanted - self._where.keys())
        if lost:
            raise DataError(
                f"{folder}: image ids {lost[:5]} of annotations/instances_{split}.json are in none of the "
                "split's shard files; re-run `sdetr data shard`"
            )
        self._file: str | None = None
        self._table: pa.Table | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        file, row = self._where[self.ids[index]]
        if file != self._file:
            self._table = pq.read_table(file, columns=list(REQUIRED_COLUMNS))
            self._file = file
        try:
            image, target = decode_sample(self._table.slice(row, 1).to_pylist()[0])
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from None
        return self.transforms(image, target) if self.transforms is not None else (image, target)
