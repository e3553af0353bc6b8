"""The COCO 2017 source of a data set: where a split's images and annotation file are, their fingerprint,
and whether an image file is usable (read and decoded) — checked once, before sharding or training."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import PIL.Image

from sdetr.detector.data.coco import LAYOUT
from sdetr.detector.errors import DataError


def source_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of ``split``: ``train`` -> ``train2017`` (else ``train``)."""
    candidates = [f"{split}2017", split] if not split.endswith("2017") else [split]
    folder = next(
        (c for c in candidates if (root / "annotations" / f"instances_{c}.json").is_file()), candidates[0]
    )
    img_dir, ann_file = root / folder, root / "annotations" / f"instances_{folder}.json"
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} does not exist (split {split!r}); {LAYOUT}")
    if not img_dir.is_dir():
        raise DataError(f"image folder {img_dir} does not exist (split {split!r}); {LAYOUT}")
    return img_dir, ann_file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_image_file(path: Path) -> tuple[bytes | None, tuple[int, int] | None, str | None]:
    """``(bytes, (width, height), None)`` for a decodable image, else ``(None, None, reason)``.

    Decoding proves the file is usable (a truncated JPEG fails here instead of hours into
    training). JPEGs are decoded in draft mode (DCT scaling to 1/8): every byte of entropy-coded
    data is still parsed, at a fraction of the cost of a full decode.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "missing"
    except OSError as exc:
        return None, None, f"cannot read: {exc.strerror}"
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            size = img.size
            if img.format == "JPEG":
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        return None, None, f"cannot decode: {exc}"
    return data, size, None
