"""The shard format: the Parquet schema of one image per row, and the manifest (``manifest.json``) that
lists each split's shard files, their row counts and whether the split was finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from sdetr.detector.errors import DataError
from sdetr.platform.storage import Location

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
    """The manifest of a shard folder (a local folder or a storage URI); `DataError` when it is missing
    or not a manifest."""
    folder = Location.of(out_dir)
    where = f"{folder.uri}/{MANIFEST}"
    try:
        text = folder.read_text(MANIFEST)
    except OSError as exc:
        raise DataError(f"{where}: cannot read the shard manifest ({exc})") from None
    if text is None:
        raise DataError(
            f"{where} does not exist: {folder.uri} is not a shard folder "
            "(make one with `sdetr data shard --coco ROOT --out DIR`)"
        )
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: cannot read the shard manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{where}: not an sdetr shard manifest (no 'splits' mapping)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{where}: schema version {manifest.get('schema_version')!r}, this sdetr reads version "
            f"{SCHEMA_VERSION}; re-shard with `sdetr data shard --overwrite`"
        )
    return manifest
