"""``sdetr data synth|shard``: a synthetic data set in the COCO 2017 layout; COCO -> Parquet shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    synth = data.add_parser("synth", help="generate a synthetic data set in the COCO 2017 layout")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    synth.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    synth.set_defaults(func=cmd_data_synth)
    add_shard_parser(data)


def cmd_data_synth(args) -> int:
    from sdetr.detector.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        args.out, n_train=args.train, n_val=args.val, seed=args.seed, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def add_shard_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``shard`` under the ``sdetr data`` sub-parsers."""
    p = subparsers.add_parser(
        "shard",
        help="convert a COCO-layout data set into Parquet shards for Ray Data",
        description="a COCO-layout data set -> Parquet shards for Ray Data (re-running resumes)",
    )
    p.add_argument("--coco", required=True, type=Path, help="data root in the COCO 2017 layout")
    p.add_argument(
        "--out", required=True, help="shard folder to write (re-running resumes), or a storage URI (s3://...)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per Parquet file (default 1000)")
    p.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    p.add_argument("--overwrite", action="store_true", help="replace shards made from another source/size")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_shard)
    return p


def cmd_shard(args) -> int:
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    import tempfile

    from sdetr.platform.shards.writer import shard_coco
    from sdetr.platform.storage import Location, is_uri

    options = dict(
        shard_size=args.shard_size, splits=splits, progress=args.progress, overwrite=args.overwrite
    )
    if not is_uri(args.out):
        summary = shard_coco(args.coco, Path(args.out), **options)
    else:  # object storage: shard here, then upload (refused before any work if the store is unreachable)
        target = Location(args.out).check()
        with tempfile.TemporaryDirectory(prefix="sdetr-shards-") as tmp:
            summary = shard_coco(args.coco, Path(tmp) / "shards", **options)
            summary["uploaded_files"] = target.upload_tree(Path(tmp) / "shards")
        summary["out_dir"] = str(target)
    print(json.dumps(summary, indent=2))
    return 0
