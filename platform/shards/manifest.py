"""The shard format: the Parquet schema of one image per row, and the manifest (``manifest.json``) that
lists each split's shard files, their row counts and whether the split was finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from sdetr.detector.errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("num_annotations", pa.int32()),
        ("ann_ids", pa.list_(pa.int64())),
        ("boxes", pa.list_(pa.float32())),  # flat COCO xywh, 4 per annotation
        ("category_ids", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.int8())),
        ("area", pa.list_(pa.float32())),
    ]
)
REQUIRED_COLUMNS = tuple(SCHEMA.names)


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder; `DataError` when it is missing or not a manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {Path(out_dir)} is not a shard folder "
            "(make one with `sdetr data shard --coco ROOT --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the shard manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not an sdetr shard manifest (no 'splits' mapping)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema version {manifest.get('schema_version')!r}, this sdetr reads version "
            f"{SCHEMA_VERSION}; re-shard with `sdetr data shard --overwrite`"
        )
    return manifest
