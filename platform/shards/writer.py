"""``sdetr data shard``: a COCO-layout data set -> Parquet shards for Ray Data.

One row per image. The image is stored as its original encoded bytes (JPEG stays JPEG, nothing is
re-encoded) and the annotations as flat list columns, so Ray Data reads Arrow blocks straight from
the files and never falls back to pickled Python objects::

    DIR/manifest.json                     splits -> shards (rows, bytes, image-id range), categories,
                                          source, shard size, schema version, skip report
    DIR/annotations/instances_<split>.json   validated ground truth (for COCO evaluation on rank 0)
    DIR/<split>/part-00000.parquet ...    rows sorted by image id, ``shard_size`` images per file

Columns (`SCHEMA`): ``image_id`` int64, ``file_name`` string, ``width``/``height`` int32 (from the
annotation file), ``image`` binary (the file's bytes), ``num_annotations`` int32 and, per annotation,
``ann_ids`` list<int64>, ``boxes`` list<float32> (COCO ``x, y, w, h`` flattened: 4 values per
annotation), ``category_ids`` list<int32>, ``iscrowd`` list<int8>, ``area`` list<float32>.

Validation follows `validate_annotations`: bad annotation files raise `DataError`; boxes with
width/height <= 0 or entirely outside the image are left out (counted in the report). Crowd
annotations are kept (COCOeval needs them; training drops them when it builds targets).

Missing or unreadable image files are *skipped*, not fatal: a 118k-image conversion should not die
at image 117,000 over one broken file. Each one is listed (file, image id, reason) in the printed
report and in the manifest, and removed, with its annotations, from the written ground truth so
evaluation stays consistent with what is trained and evaluated. If *no* image of a split can be read
the folder is wrong, and that is a `DataError`.

Crash safety and re-runs: every shard is written to a temporary name and renamed into place, and the
manifest (also replaced atomically) records each finished shard with its row count and byte size.
Running the command again skips shards whose file still matches its record and (re)writes the rest;
leftover temporary files from an interrupted run are deleted. A different source folder, shard size,
schema version or annotation file is refused with a `DataError` unless ``overwrite=True``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdetr.detector.data.coco import LAYOUT, validate_annotations
from sdetr.detector.errors import DataError
from sdetr.platform.layout import TMP_MARK, write_json
from sdetr.platform.shards.manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, load_manifest
from sdetr.platform.shards.source import file_sha256, read_image_file, source_paths
from sdetr.platform.storage import is_uri

_MAX_EXAMPLES = 5


# -- manifest ------------------------------------------------------------------------------------
def _check_compatible(manifest: dict, params: dict, fingerprints: dict[str, str], path: Path) -> None:
    """Refuse to mix shards from another source, shard size or annotation file."""
    differ = [f"{k} {manifest.get(k)!r} -> {v!r}" for k, v in params.items() if manifest.get(k) != v]
    for split, digest in fingerprints.items():
        old = manifest["splits"].get(split, {}).get("annotation_sha256")
        if old is not None and old != digest:
            differ.append(f"annotation file of split {split!r} changed")
    if differ:
        raise DataError(
            f"{path} holds shards made differently ({'; '.join(differ)}); "
            "pass --overwrite to replace them, or choose another --out"
        )


def _shard_ok(path: Path, record: dict) -> bool:
    """A finished shard is reused only if its file still has the recorded size and row count."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
        return pq.read_metadata(path).num_rows == record["rows"]
    except (OSError, KeyError, pa.ArrowException):
        return False


def _remove_outputs(out: Path, manifest: dict | None) -> None:
    """Delete what an earlier `shard_coco` wrote (and only that) before ``overwrite``."""
    splits = set(manifest["splits"]) if manifest else set()
    splits |= {p.name for p in out.iterdir() if p.is_dir() and any(p.glob("part-*.parquet*"))}
    for split in splits:
        folder = out / split
        if folder.is_dir():
            for f in folder.glob("part-*.parquet*"):
                f.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
        (out / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


# -- rows ----------------------------------------------------------------------------------------
def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {name: [r[name] for r in rows] for name in SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _row(info: dict, anns: list[dict], data: bytes) -> dict[str, Any]:
    return {
        "image_id": info["id"],
        "file_name": info["file_name"],
        "width": int(info["width"]),
        "height": int(info["height"]),
        "image": data,
        "num_annotations": len(anns),
        "ann_ids": [a["id"] for a in anns],
        "boxes": [float(v) for a in anns for v in a["bbox"]],
        "category_ids": [a["category_id"] for a in anns],
        "iscrowd": [int(bool(a.get("iscrowd", 0))) for a in anns],
        "area": [float(a["area"]) for a in anns],
    }


def _write_shard(path: Path, rows: list[dict[str, Any]]) -> int:
    """Write rows to ``path`` through a temporary file; returns the final size in bytes."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    # JPEG bytes do not compress: store them plain and compress only the small columns.
    compression = {name: ("NONE" if name == "image" else "SNAPPY") for name in SCHEMA.names}
    pq.write_table(_rows_table(rows), tmp, compression=compression, use_dictionary=["file_name"])
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


# -- main ----------------------------------------------------------------------------------------
def shard_coco(
    coco_root: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    splits: tuple[str, ...] | list[str] = ("train", "val"),
    progress: bool = True,
    overwrite: bool = False,
    num_threads: int = 4,
) -> dict[str, Any]:
    """Convert ``coco_root`` (COCO 2017 layout) into Parquet shards under ``out_dir``.

    Returns a summary: per split the images, rows written, shards written/reused, skipped images
    and boxes; plus the elapsed seconds. See the module docstring for layout, schema and policies.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard size must be a positive integer, got {shard_size!r}")
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise DataError("no splits given; expected e.g. train,val")
    root = Path(coco_root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; {LAYOUT}")
    if is_uri(out_dir):  # Path("s3://b/x") would be a local folder named "s3:"
        raise DataError(
            f"shard_coco writes a local folder, not {out_dir}; `sdetr data shard --out {out_dir}` shards "
            "locally and uploads"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    start = time.perf_counter()

    sources = {split: source_paths(root, split) for split in splits}
    fingerprints = {split: file_sha256(ann) for split, (_, ann) in sources.items()}
    # Every annotation file is checked before anything is written: a typo in val2017's JSON should
    # not surface after an hour of sharding train2017.
    validated = {split: validate_annotations(ann) for split, (_, ann) in sources.items()}
    for split, (data, _) in validated.items():
        if not data["images"]:
            raise DataError(f"{sources[split][1]}: split {split!r} lists no images; it needs at least one")
    params = {"source": str(root.resolve()), "shard_size": shard_size, "schema_version": SCHEMA_VERSION}

    manifest: dict[str, Any] | None = None
    if (out / MANIFEST).exists():
        try:
            manifest = load_manifest(out)
            if not overwrite:
                _check_compatible(manifest, params, fingerprints, out)
        except DataError:
            if not overwrite:
                raise
            manifest = None
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"{out} exists, is not empty and is not a shard folder; pass --overwrite or pick another --out"
        )
    if overwrite and out.is_dir():
        _remove_outputs(out, manifest)
        manifest = None
    if manifest is None:
        manifest = {**params, "created_by": "sdetr data shard", "splits": {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    write_json(out / MANIFEST, manifest, indent=1)  # from now on a crash leaves a resumable folder

    summary: dict[str, Any] = {"out_dir": str(out), "shard_size": shard_size}
    for split in splits:
        img_dir, ann_file = sources[split]
        summary[split] = _shard_split(
            split,
            img_dir,
            ann_file,
            validated.pop(split),
            fingerprints[split],
            out,
            manifest,
            shard_size,
            progress,
            num_threads,
        )
    manifest["total_images"] = sum(s["num_images"] for s in manifest["splits"].values())
    write_json(out / MANIFEST, manifest, indent=1)
    summary["total_images"] = manifest["total_images"]
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _shard_split(
    split: str,
    img_dir: Path,
    ann_file: Path,
    validated: tuple[dict[str, Any], Any],
    fingerprint: str,
    out: Path,
    manifest: dict[str, Any],
    shard_size: int,
    progress: bool,
    num_threads: int,
) -> dict[str, Any]:
    from tqdm import tqdm

    data, report = validated
    images = sorted(data["images"], key=lambda img: img["id"])
    anns_by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in data["categories"]]
    if manifest.get("categories") not in (None, categories):
        raise DataError(
            f"{ann_file}: categories differ from the other splits already in {out / MANIFEST}; "
            "every split of one shard folder must share the category list"
        )
    manifest["categories"] = categories

    entry = manifest["splits"].get(split) or {}
    finished: dict[str, dict] = {s["file"]: s for s in entry.get("shards", [])}
    entry = {
        "source_folder": str(img_dir),
        "annotation_file": str(ann_file),
        "annotation_sha256": fingerprint,
        "complete": False,
        "num_images": 0,
        "shards": [],
    }
    manifest["splits"][split] = entry
    folder = out / split
    folder.mkdir(exist_ok=True)
    for stale in folder.glob(f"*{TMP_MARK}*"):  # torn writes of an interrupted run
        stale.unlink()

    # The chunking depends on the annotation file only (not on which images turn out unreadable),
    # so a re-run plans exactly the same shards.
    chunks = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    written = reused = 0
    skipped_images: list[dict[str, Any]] = []
    size_mismatches: dict[str, Any] = {"count": 0, "ids": []}
    bar = tqdm(total=len(images), desc=f"shard {split}", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for index, chunk in enumerate(chunks):
            name = f"{split}/part-{index:05d}.parquet"
            record = finished.get(name)
            if record is not None and _shard_ok(out / name, record):
                reused += 1
            else:
                record = {
                    "file": name,
                    **_build_shard(out / name, chunk, img_dir, anns_by_image, pool, size_mismatches),
                }
                written += 1
            entry["shards"].append(record)
            skipped_images += record["skipped_images"]
            entry["num_images"] += record["rows"]
            write_json(out / MANIFEST, manifest, indent=1)
            bar.update(len(chunk))
    bar.close()
    # Shards of a longer earlier plan cannot exist (same annotation file, same shard size), but a
    # hand-edited folder might hold some: never let read_split pick them up.
    planned = {s["file"] for s in entry["shards"]}
    for extra in folder.glob("part-*.parquet"):
        if f"{split}/{extra.name}" not in planned:
            extra.unlink()

    if images and entry["num_images"] == 0:
        raise DataError(
            f"{img_dir}: none of the {len(images)} images listed in {ann_file.name} could be read "
            f"(first: {skipped_images[0]['file']}: {skipped_images[0]['reason']}); is this the right folder?"
        )
    bad_ids = {s["image_id"] for s in skipped_images}
    ground_truth = dict(data)
    ground_truth["images"] = [img for img in data["images"] if img["id"] not in bad_ids]
    ground_truth["annotations"] = [a for a in data["annotations"] if a["image_id"] not in bad_ids]
    write_json(out / "annotations" / f"instances_{split}.json", ground_truth, indent=1)

    num_annotations = len(ground_truth["annotations"])
    entry.update(
        complete=True,
        num_annotations=num_annotations,
        skipped_images=skipped_images,
        skipped_boxes={
            "degenerate": report.num_degenerate,
            "outside": report.num_outside,
            "degenerate_ids": report.degenerate_ids,
            "outside_ids": report.outside_ids,
        },
        image_id_range=[
            min((s["min_image_id"] for s in entry["shards"] if s["rows"]), default=None),
            max((s["max_image_id"] for s in entry["shards"] if s["rows"]), default=None),
        ],
    )
    write_json(out / MANIFEST, manifest, indent=1)

    warnings = [line for line in [report.warning_line()] if line]
    if skipped_images:
        shown = "; ".join(
            f"{s['file']} (image id {s['image_id']}): {s['reason']}" for s in skipped_images[:5]
        )
        more = (
            f"; ... ({len(skipped_images)} in all, listed in {out / MANIFEST})"
            if len(skipped_images) > 5
            else ""
        )
        warnings.append(f"skipped {len(skipped_images)} unreadable image(s) in {split}: {shown}{more}")
    if size_mismatches["count"]:
        warnings.append(
            f"{size_mismatches['count']} image(s) in {split} differ in size from {ann_file.name} "
            f"(ids {', '.join(map(str, size_mismatches['ids']))}); training uses the file's size"
        )
    for line in warnings:
        print(f"warning: {line}")
    return {
        "images": len(images),
        "rows": entry["num_images"],
        "annotations": num_annotations,
        "shards": len(entry["shards"]),
        "shards_written": written,
        "shards_reused": reused,
        "skipped_images": len(skipped_images),
        "skipped_boxes": report.num_skipped,
    }


def _build_shard(
    path: Path,
    chunk: list[dict],
    img_dir: Path,
    anns_by_image: dict[int, list[dict]],
    pool: ThreadPoolExecutor,
    size_mismatches: dict[str, Any],
) -> dict[str, Any]:
    """Read, check and write one shard; returns its manifest record (without ``file``)."""
    rows, skipped = [], []
    # File reads and PIL decoding release the GIL: a few threads overlap I/O with decoding.
    results = pool.map(lambda info: read_image_file(img_dir / info["file_name"]), chunk)
    for info, (data, size, reason) in zip(chunk, results):
        if data is None:
            skipped.append(
                {"image_id": info["id"], "file": str(img_dir / info["file_name"]), "reason": reason}
            )
            continue
        if size != (int(info["width"]), int(info["height"])):
            size_mismatches["count"] += 1
            if len(size_mismatches["ids"]) < _MAX_EXAMPLES:
                size_mismatches["ids"].append(info["id"])
        rows.append(_row(info, anns_by_image.get(info["id"], []), data))
    nbytes = _write_shard(path, rows)
    ids = [r["image_id"] for r in rows]
    return {
        "rows": len(rows),
        "bytes": nbytes,
        "min_image_id": min(ids, default=None),
        "max_image_id": max(ids, default=None),
        "skipped_images": skipped,
    }
