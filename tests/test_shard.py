"""`sdetr data shard`: layout, manifest, validation, skip report, re-runs and crash safety."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sdetr.detector.data.coco import validate_annotations
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import DataError
from sdetr.platform.cli.data import add_shard_parser
from sdetr.platform.shards.manifest import MANIFEST, SCHEMA
from sdetr.platform.shards.writer import shard_coco


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard") / "coco"
    generate_synthetic_coco(root, n_train=20, n_val=5, seed=7, min_size=64, max_size=96)
    return root


@pytest.fixture
def coco_copy(synth_root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    root = tmp_path / "coco"
    shutil.copytree(synth_root, root)
    return root


def read_rows(out: Path, split: str) -> list[dict]:
    rows = []
    for shard in json.loads((out / MANIFEST).read_text())["splits"][split]["shards"]:
        rows += pq.read_table(out / shard["file"]).to_pylist()
    return rows


def test_layout_manifest_and_rows_match_annotations(synth_root, tmp_path):
    out = tmp_path / "shards"
    summary = shard_coco(synth_root, out, shard_size=8, progress=False)
    assert summary["train"]["shards"] == 3 and summary["train"]["rows"] == 20
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    assert (out / "annotations" / "instances_val.json").is_file()

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["schema_version"] == 1 and manifest["shard_size"] == 8
    assert manifest["source"] == str(synth_root.resolve())
    assert manifest["total_images"] == 25
    assert [c["id"] for c in manifest["categories"]] == [1, 2, 3, 4, 5]
    shards = manifest["splits"]["train"]["shards"]
    assert [s["rows"] for s in shards] == [8, 8, 4]
    assert [(s["min_image_id"], s["max_image_id"]) for s in shards] == [(1, 8), (9, 16), (17, 20)]
    for s in shards:
        assert pq.read_metadata(out / s["file"]).num_rows == s["rows"]
        assert pq.read_schema(out / s["file"]).equals(SCHEMA, check_metadata=False)

    data, _ = validate_annotations(synth_root / "annotations" / "instances_train2017.json")
    rows = read_rows(out, "train")
    assert [r["image_id"] for r in rows] == sorted(img["id"] for img in data["images"])
    for row in rows:
        anns = [a for a in data["annotations"] if a["image_id"] == row["image_id"]]
        assert row["ann_ids"] == [a["id"] for a in anns]
        assert row["num_annotations"] == len(anns)
        assert row["category_ids"] == [a["category_id"] for a in anns]
        assert row["iscrowd"] == [a["iscrowd"] for a in anns]
        assert row["boxes"] == pytest.approx([v for a in anns for v in a["bbox"]])
        # The bytes are the file's, unchanged.
        assert row["image"] == (synth_root / "train2017" / row["file_name"]).read_bytes()
    gt = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert gt["annotations"] == data["annotations"]


def test_skipped_boxes_and_missing_images_are_reported(coco_copy, tmp_path, capsys):
    ann_file = coco_copy / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["bbox"][2] = 0  # degenerate
    data["annotations"][1]["bbox"][:2] = [5000, 5000]  # outside the image
    bad = {data["annotations"][0]["id"], data["annotations"][1]["id"]}
    ann_file.write_text(json.dumps(data))
    (coco_copy / "train2017" / "000000000003.jpg").unlink()
    (coco_copy / "train2017" / "000000000005.jpg").write_bytes(b"not a jpeg")

    out = tmp_path / "shards"
    summary = shard_coco(coco_copy, out, shard_size=8, splits=["train"], progress=False)
    assert summary["train"]["skipped_boxes"] == 2
    assert summary["train"]["skipped_images"] == 2 and summary["train"]["rows"] == 18
    printed = capsys.readouterr().out
    assert "000000000003.jpg (image id 3): missing" in printed
    assert "000000000005.jpg (image id 5): cannot decode" in printed

    entry = json.loads((out / MANIFEST).read_text())["splits"]["train"]
    assert [(s["image_id"], Path(s["file"]).name) for s in entry["skipped_images"]] == [
        (3, "000000000003.jpg"),
        (5, "000000000005.jpg"),
    ]
    assert entry["skipped_boxes"]["degenerate"] == 1 and entry["skipped_boxes"]["outside"] == 1
    rows = read_rows(out, "train")
    assert {3, 5}.isdisjoint(r["image_id"] for r in rows)
    assert bad.isdisjoint(i for r in rows for i in r["ann_ids"])
    # The ground truth matches what is trained on: no skipped images, no skipped boxes.
    gt = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert {3, 5}.isdisjoint(img["id"] for img in gt["images"])
    assert {a["image_id"] for a in gt["annotations"]} <= {r["image_id"] for r in rows}
    assert sum(r["num_annotations"] for r in rows) == len(gt["annotations"])


def test_all_images_missing_is_fatal(coco_copy, tmp_path):
    for f in (coco_copy / "val2017").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"none of the 5 images .* could be read"):
        shard_coco(coco_copy, tmp_path / "out", splits=["val"], progress=False)


def test_rerun_reuses_finished_shards_and_repairs_torn_ones(synth_root, tmp_path):
    out = tmp_path / "shards"
    shard_coco(synth_root, out, shard_size=8, progress=False)
    files = sorted((out / "train").glob("part-*.parquet"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    again = shard_coco(synth_root, out, shard_size=8, progress=False)
    assert again["train"]["shards_reused"] == 3 and again["train"]["shards_written"] == 0
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes

    # An interrupted run: a torn temporary file, and a shard cut short after its manifest record.
    torn = out / "train" / "part-00001.parquet.tmp-4242"
    torn.write_bytes(b"PAR1 half a shard")
    files[2].write_bytes(files[2].read_bytes()[:100])
    third = shard_coco(synth_root, out, shard_size=8, progress=False)
    assert not torn.exists()
    assert third["train"]["shards_reused"] == 2 and third["train"]["shards_written"] == 1
    assert files[0].stat().st_mtime_ns == mtimes[files[0]]
    assert pq.read_metadata(files[2]).num_rows == 4
    assert len(read_rows(out, "train")) == 20


def test_different_source_or_shard_size_is_refused(synth_root, coco_copy, tmp_path):
    out = tmp_path / "shards"
    shard_coco(synth_root, out, shard_size=8, splits=["val"], progress=False)
    with pytest.raises(DataError, match=r"shard_size 8 -> 4.*--overwrite"):
        shard_coco(synth_root, out, shard_size=4, splits=["val"], progress=False)
    with pytest.raises(DataError, match=r"source .*--overwrite"):
        shard_coco(coco_copy, out, shard_size=8, splits=["val"], progress=False)
    summary = shard_coco(synth_root, out, shard_size=4, splits=["val"], progress=False, overwrite=True)
    assert summary["val"]["shards"] == 2
    assert sorted(p.name for p in (out / "val").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


def test_bad_sources_are_clear_errors(coco_copy, tmp_path):
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        shard_coco(tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"instances_test2017.json does not exist"):
        shard_coco(coco_copy, tmp_path / "out", splits=["test"], progress=False)
    ann = coco_copy / "annotations" / "instances_val2017.json"
    ann.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"instances_val2017.json: not valid JSON at line 1"):
        shard_coco(coco_copy, tmp_path / "out", splits=["val"], progress=False)
    ann.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.jpg", "width": 5}], "annotations": [], "categories": []}
        )
    )
    with pytest.raises(DataError, match=r"image id 1: missing required field 'height'"):
        shard_coco(coco_copy, tmp_path / "out", splits=["val"], progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"is not empty and is not a shard folder"):
        shard_coco(coco_copy, busy, splits=["train"], progress=False)
    with pytest.raises(DataError, match=r"shard size must be a positive integer"):
        shard_coco(coco_copy, tmp_path / "out", shard_size=0, progress=False)
    with pytest.raises(DataError, match=r"writes a local folder, not s3://bucket/shards; `sdetr data shard"):
        shard_coco(coco_copy, "s3://bucket/shards", progress=False)
    assert not Path("s3:").exists()


def test_command_line(synth_root, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdetr data")
    add_shard_parser(parser.add_subparsers(dest="data_cmd", required=True))
    out = tmp_path / "shards"
    args = parser.parse_args(
        [
            "shard",
            "--coco",
            str(synth_root),
            "--out",
            str(out),
            "--shard-size",
            "16",
            "--splits",
            "val",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val"] == {
        "images": 5,
        "rows": 5,
        "annotations": summary["val"]["annotations"],
        "shards": 1,
        "shards_written": 1,
        "shards_reused": 0,
        "skipped_images": 0,
        "skipped_boxes": 0,
    }
