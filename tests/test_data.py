"""Data: synthetic set, annotation validation, dataset items, transforms and batching."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sdetr.detector.config import DataConfig
from sdetr.detector.data import synth
from sdetr.detector.data import transforms as T
from sdetr.detector.data.batching import collate_fn, nested_tensor_from_images
from sdetr.detector.data.coco import CocoDetection, build_dataset, validate_annotations
from sdetr.detector.data.synth import SYNTH_CATEGORIES, generate_synthetic_coco
from sdetr.detector.errors import DataError

SMALL = dict(min_size=96, max_size=160)


def tiny_cfg(root: Path, **overrides) -> DataConfig:
    """The tiny preset's data settings (crop_min_size 160 is larger than some synthetic images)."""
    cfg = DataConfig(
        root=str(root),
        train_scales=[224, 256, 288, 320],
        train_max_size=480,
        crop_resize_scales=[200, 250, 300],
        crop_min_size=160,
        crop_max_size=300,
        val_scale=288,
        val_max_size=480,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "coco"
    generate_synthetic_coco(root, n_train=12, n_val=6, seed=3, **SMALL)
    return root


def write_mini_coco(root: Path, data: dict | None = None, sizes=((100, 80), (120, 90))) -> dict:
    """A two-image COCO set with hand-placed boxes; returns its (editable) dict."""
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        PIL.Image.new("RGB", (w, h), (i * 40, 90, 200)).save(root / "train2017" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
    if data is None:
        data = {
            "images": images,
            "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
            "annotations": [
                {
                    "id": 10,
                    "image_id": 1,
                    "bbox": [10, 10, 30, 20],
                    "category_id": 1,
                    "area": 600,
                    "iscrowd": 0,
                },
                {
                    "id": 11,
                    "image_id": 1,
                    "bbox": [50, 30, 40, 40],
                    "category_id": 7,
                    "area": 1600,
                    "iscrowd": 1,
                },
                {
                    "id": 12,
                    "image_id": 2,
                    "bbox": [90, 60, 50, 50],
                    "category_id": 7,
                    "area": 2500,
                    "iscrowd": 0,
                },
            ],
        }
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return data


def ann_path(root: Path) -> Path:
    return root / "annotations" / "instances_train2017.json"


# -- synthetic set ---------------------------------------------------------------------------------
def test_synth_layout_and_annotations(synth_root):
    for split, count in (("train", 12), ("val", 6)):
        data = json.loads((synth_root / "annotations" / f"instances_{split}2017.json").read_text())
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(SYNTH_CATEGORIES, 1))
        assert len(data["images"]) == count
        assert sorted(p.name for p in (synth_root / f"{split}2017").iterdir()) == sorted(
            img["file_name"] for img in data["images"]
        )
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for img in data["images"]:
            with PIL.Image.open(synth_root / f"{split}2017" / img["file_name"]) as f:
                assert f.format == "JPEG" and f.size == (img["width"], img["height"])
                assert 96 <= f.width <= 160 and 96 <= f.height <= 160
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            iw, ih = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= iw and y + h <= ih
            assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] in (0, 1)
            assert 1 <= ann["category_id"] <= 5
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        _, report = validate_annotations(synth_root / "annotations" / f"instances_{split}2017.json")
        assert report.num_skipped == 0 and report.num_annotations == len(data["annotations"])


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synth_is_deterministic_by_seed(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", n_train=4, n_val=2, seed=7, **SMALL)
    generate_synthetic_coco(tmp_path / "b", n_train=4, n_val=2, seed=7, **SMALL)
    generate_synthetic_coco(tmp_path / "c", n_train=4, n_val=2, seed=8, **SMALL)
    assert a["train"]["images"] == 4 and a["val"]["images"] == 2
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(_digest(tmp_path / "a")) == 4 + 2 + 2 + 1  # images, two annotation files, synth.json
    differing = set(_digest(tmp_path / "a").items()) ^ set(_digest(tmp_path / "c").items())
    assert len(differing) >= 2 * 9  # every file differs


def test_synth_default_mix_covers_coco_buckets(tmp_path):
    summary = generate_synthetic_coco(tmp_path / "s", n_train=150, n_val=0, seed=0)
    s = summary["train"]
    assert s["small"] > 0 and s["medium"] > 0 and s["large"] > 0
    assert s["medium"] + s["large"] > 2 * s["small"]  # mostly medium/large
    assert s["empty_images"] > 0 and s["crowded_images"] > 0 and s["crowd_annotations"] > 0
    assert 2.0 <= s["objects_per_image"] <= 5.0 and s["max_objects"] >= 8
    data = json.loads((tmp_path / "s" / "annotations" / "instances_train2017.json").read_text())
    sides = [v for img in data["images"] for v in (img["width"], img["height"])]
    assert min(sides) >= 192 and max(sides) <= 384
    per_image = np.bincount([a["image_id"] for a in data["annotations"] if not a["iscrowd"]])
    assert np.mean((per_image[1:] >= 1) & (per_image[1:] <= 6)) > 0.75  # typical images: 1..6 objects


def test_synth_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        generate_synthetic_coco(out, n_train=2, n_val=1, **SMALL)
    assert (out / "keep.txt").exists()
    generate_synthetic_coco(out, n_train=2, n_val=1, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and len(list((out / "train2017").iterdir())) == 2

    # An interruption after the train split leaves neither the target nor a half-written folder.
    real = synth._write_split

    def fail_on_val(root, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(root, split, *args)

    monkeypatch.setattr(synth, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_coco(tmp_path / "fresh", n_train=2, n_val=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_synth_rerun_with_same_arguments_is_a_no_op(tmp_path):
    out = tmp_path / "set"
    first = generate_synthetic_coco(out, n_train=2, n_val=1, seed=3, **SMALL)
    stamp = (out / "train2017").stat().st_mtime_ns
    again = generate_synthetic_coco(out, n_train=2, n_val=1, seed=3, **SMALL)
    assert again["up_to_date"] and again["train"] == first["train"]
    assert (out / "train2017").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not empty"):
        generate_synthetic_coco(out, n_train=3, n_val=1, seed=3, **SMALL)


# -- dataset items ---------------------------------------------------------------------------------
def test_dataset_item_contract(synth_root):
    ds = build_dataset("val", tiny_cfg(synth_root))
    assert len(ds) == 6 and ds.num_categories_max_id == 5 and ds.ids == sorted(ds.coco.getImgIds())
    image, target = ds[0]
    info = ds.coco.imgs[ds.ids[0]]
    assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
    assert target["image_id"].dtype == torch.int64 and target["image_id"].dim() == 0
    assert int(target["image_id"]) == ds.ids[0]
    assert target["orig_size"].tolist() == [info["height"], info["width"]]
    assert target["size"].tolist() == list(image.shape[1:])
    assert min(image.shape[1:]) == 288 or max(image.shape[1:]) <= 480
    n = target["boxes"].shape[0]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["labels"].shape == (n,) and target["area"].shape == (n,) and target["iscrowd"].shape == (n,)
    plain = [a for a in ds.coco.imgToAnns[ds.ids[0]] if not a["iscrowd"]]
    assert n == len(plain) and sorted(target["labels"].tolist()) == sorted(a["category_id"] for a in plain)
    if n:
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()


def test_dataset_drops_crowd_and_converts_boxes(tmp_path):
    write_mini_coco(tmp_path)
    # Raw ids (DETR's labels); with "auto" the ids 1 and 7 would become the contiguous labels 0 and 1.
    ds = CocoDetection(tmp_path / "train2017", ann_path(tmp_path), transforms=None, category_mapping="raw")
    _, target = ds[0]  # image 1: one plain box, one crowd box
    assert target["boxes"].tolist() == [[10.0, 10.0, 40.0, 30.0]]  # xywh -> xyxy
    assert target["labels"].tolist() == [1] and target["iscrowd"].tolist() == [0]
    _, target = ds[1]  # image 2 (120x90): box [90, 60, 50, 50] is clamped to the image
    assert target["boxes"].tolist() == [[90.0, 60.0, 120.0, 90.0]] and target["labels"].tolist() == [7]
    assert ds.num_categories_max_id == 7
    assert len(ds.coco.getAnnIds()) == 3  # the crowd box stays in the evaluation ground truth


def test_max_images_restricts_items_and_ground_truth(synth_root):
    ds = build_dataset("train", tiny_cfg(synth_root, max_train_images=5))
    assert len(ds) == 5 and sorted(ds.coco.getImgIds()) == ds.ids
    assert {a["image_id"] for a in ds.coco.dataset["annotations"]} <= set(ds.ids)


# -- bad input -------------------------------------------------------------------------------------
def test_missing_root_and_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*train2017"):
        build_dataset("train", tiny_cfg(tmp_path / "nowhere"))
    (tmp_path / "train2017").mkdir()
    with pytest.raises(DataError, match=r"instances_train2017\.json does not exist.*annotations"):
        build_dataset("train", tiny_cfg(tmp_path))


def test_invalid_json_names_file_line_and_column(tmp_path):
    write_mini_coco(tmp_path)
    ann_path(tmp_path).write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError, match=r"instances_train2017\.json: not valid JSON at line 3, column 19"):
        validate_annotations(ann_path(tmp_path))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("categories"), r"missing required top-level field 'categories'"),
        (lambda d: d["images"][1].pop("width"), r"image id 2: missing required field 'width'"),
        (lambda d: d["images"][0].pop("id"), r"image at index 0: missing required field 'id'"),
        (lambda d: d["images"][0].pop("file_name"), r"image id 1: missing required field 'file_name'"),
        (lambda d: d["annotations"][2].pop("bbox"), r"annotation id 12: missing required field 'bbox'"),
        (lambda d: d["annotations"][1].pop("id"), r"annotation at index 1: missing required field 'id'"),
        (lambda d: d["annotations"][0].pop("category_id"), r"annotation id 10: .*'category_id'"),
        (lambda d: d["annotations"][0].update(category_id=3), r"annotation id 10: field 'category_id' is 3"),
        (lambda d: d["annotations"][2].update(image_id=9), r"annotation id 12: field 'image_id'.* 9"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 10: field 'bbox' must be 4"),
    ],
)
def test_bad_annotation_fields(tmp_path, edit, expected):
    data = copy.deepcopy(write_mini_coco(tmp_path))
    edit(data)
    write_mini_coco(tmp_path, data)
    with pytest.raises(DataError, match=r"instances_train2017\.json: " + expected):
        validate_annotations(ann_path(tmp_path))
    with pytest.raises(DataError, match=expected):
        CocoDetection(tmp_path / "train2017", ann_path(tmp_path), None)


def test_missing_and_corrupt_images_fail_on_load(tmp_path):
    write_mini_coco(tmp_path)
    ds = CocoDetection(tmp_path / "train2017", ann_path(tmp_path), None)  # construction is fine
    (tmp_path / "train2017" / "000000000001.jpg").unlink()
    with pytest.raises(DataError, match=r"000000000001\.jpg \(image id 1\) is missing"):
        ds[0]
    good = (tmp_path / "train2017" / "000000000002.jpg").read_bytes()
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    with pytest.raises(DataError, match=r"000000000002\.jpg \(image id 2\) cannot be read"):
        ds[1]
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"000000000002\.jpg \(image id 2\) cannot be read"):
        ds[1]


def test_degenerate_and_outside_boxes_are_skipped_and_reported(tmp_path, caplog):
    data = write_mini_coco(tmp_path)
    extra = [
        (40, [5, 5, 0, 10]),  # zero width
        (41, [5, 5, 10, -3]),  # negative height
        (77, [150, 10, 20, 20]),  # right of the 100 px wide image
        (78, [-30, 10, 30, 20]),  # ends exactly at the left edge
    ]
    for ann_id, bbox in extra:
        data["annotations"].append({"id": ann_id, "image_id": 1, "bbox": bbox, "category_id": 1})
    write_mini_coco(tmp_path, data)

    _, report = validate_annotations(ann_path(tmp_path))
    assert (report.num_degenerate, report.num_outside, report.num_annotations) == (2, 2, 3)
    assert report.warning_line() == (
        "skipped 4 boxes in instances_train2017.json: "
        "2 with width/height <= 0 (ids 40, 41), 2 outside the image (ids 77, 78)"
    )
    with caplog.at_level(logging.WARNING, logger="sdetr.detector.data.coco"):
        ds = CocoDetection(tmp_path / "train2017", ann_path(tmp_path), None)
        CocoDetection(tmp_path / "train2017", ann_path(tmp_path), None)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == [report.warning_line()]  # once per file
    assert sorted(ds.coco.getAnnIds()) == [10, 11, 12]
    assert ds[0][1]["boxes"].shape == (1, 4)


# -- transforms ------------------------------------------------------------------------------------
def _box_image(w=120, h=90, box=(20, 30, 70, 60)) -> tuple[PIL.Image.Image, dict]:
    """Black image with one white rectangle exactly covering ``box`` (xyxy), and its target."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[box[1] : box[3], box[0] : box[2]] = 255
    target = {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([3]),
        "area": torch.tensor([float((box[2] - box[0]) * (box[3] - box[1]))]),
        "iscrowd": torch.tensor([0]),
        "size": torch.tensor([h, w]),
    }
    return PIL.Image.fromarray(pixels), target


def test_hflip_twice_is_identity():
    image, target = _box_image()
    flipped, t1 = T.hflip(image, target)
    assert t1["boxes"].tolist() == [[50.0, 30.0, 100.0, 60.0]]
    back, t2 = T.hflip(flipped, t1)
    assert torch.equal(t2["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_crop_clips_and_drops_vanished_boxes():
    image, target = _box_image()
    target["boxes"] = torch.tensor(
        [[20.0, 30.0, 70.0, 60.0], [100.0, 5.0, 115.0, 20.0], [0.0, 0.0, 10.0, 10.0]]
    )
    target["labels"] = torch.tensor([1, 2, 3])
    target["area"] = torch.ones(3)
    target["iscrowd"] = torch.zeros(3, dtype=torch.int64)
    cropped, out = T.crop(image, target, (10, 15, 40, 60))  # top, left, height, width
    assert cropped.size == (60, 40)
    assert out["boxes"].tolist() == [[5.0, 20.0, 55.0, 40.0]]  # clipped; the other two vanished
    assert out["labels"].tolist() == [1] and out["area"].tolist() == [1000.0]
    assert out["iscrowd"].tolist() == [0] and out["size"].tolist() == [40, 60]


def test_resized_hw_matches_detr_rules():
    assert T.resized_hw(640, 480, 800, 1333) == (800, 1066)
    assert T.resized_hw(480, 640, 800, 1333) == (1066, 800)
    assert T.resized_hw(2000, 500, 800, 1333) == (333, 1332)  # long side capped
    assert T.resized_hw(300, 200, 200, None) == (200, 300)  # already the right size


@pytest.mark.parametrize("split", ["train", "val"])
def test_pipeline_keeps_boxes_on_the_object(split):
    """After flip/resize/crop, the target box still outlines the white rectangle in the tensor."""
    pipeline = T.make_transforms(split, tiny_cfg("unused"))
    mean, std = torch.tensor(T.IMAGENET_MEAN)[:, None, None], torch.tensor(T.IMAGENET_STD)[:, None, None]
    for seed in range(12 if split == "train" else 2):  # val is deterministic
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = pipeline(*_box_image(w=150, h=110, box=(30, 25, 110, 85)))
        h, w = image.shape[1:]
        assert target["size"].tolist() == [h, w]
        if split == "val":
            assert min(h, w) == 288
        if target["boxes"].shape[0] == 0:
            continue  # cropped away entirely
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        cx, cy, bw, bh = (target["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        bright = ((image * std + mean).mean(0) > 0.5).nonzero()
        x0, y0 = bright[:, 1].min().item(), bright[:, 0].min().item()
        x1, y1 = bright[:, 1].max().item() + 1, bright[:, 0].max().item() + 1
        assert [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2] == pytest.approx(
            [x0, y0, x1, y1], abs=2.5
        )


def test_train_pipeline_is_deterministic_and_handles_small_images():
    pipeline = T.make_transforms("train", tiny_cfg("unused"))  # crop_min_size 160 > this 100x70 image

    def run(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        return [pipeline(*_box_image(w=100, h=70, box=(10, 10, 60, 50))) for _ in range(8)]

    a, b = run(1), run(1)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    assert len({tuple(img.shape) for img, _ in a}) > 1  # multi-scale really varies
    with pytest.raises(Exception, match="split"):
        T.make_transforms("test", tiny_cfg("unused"))


# -- batching --------------------------------------------------------------------------------------
def test_collate_pads_bottom_right_and_masks_exactly_the_padding():
    a, b = torch.rand(3, 4, 6) + 1, torch.rand(3, 5, 3) + 1  # strictly positive, so padding is visible
    images, masks, targets = collate_fn([(a, {"id": 0}), (b, {"id": 1})])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.bool
    assert [t["id"] for t in targets] == [0, 1]
    assert torch.equal(images[0, :, :4, :6], a) and torch.equal(images[1, :, :5, :3], b)
    assert torch.equal(masks, (images == 0).all(dim=1))  # True exactly where zero padding was added
    assert masks[0].sum() == 6 and masks[1].sum() == 15
    single, single_mask = nested_tensor_from_images([a])
    assert torch.equal(single[0], a) and not single_mask.any()


def test_collate_real_items(synth_root):
    ds = build_dataset("train", tiny_cfg(synth_root))
    random.seed(0)
    items = [ds[i] for i in range(3)]
    images, masks, targets = collate_fn(items)
    for i, (img, tgt) in enumerate(items):
        h, w = img.shape[1:]
        assert (~masks[i]).sum() == h * w and not masks[i, :h, :w].any()
        assert targets[i] is tgt
