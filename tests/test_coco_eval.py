"""COCO evaluation: exact AP values on hand-made cases, both backends, and result conversion."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from sdetr.detector.data.coco import coco_from_dict
from sdetr.detector.errors import DataError
from sdetr.detector.evaluation import coco_eval
from sdetr.detector.evaluation.coco_eval import METRIC_NAMES, evaluate_detections, results_to_detections

HAS_FASTER = coco_eval._has_faster_coco_eval()
BACKENDS = ["pycocotools"] + (["faster_coco_eval"] if HAS_FASTER else [])


def make_gt() -> dict:
    """Three images with small (<32^2), medium and large (>96^2) boxes and one crowd region."""
    boxes = {
        1: [(1, [10, 10, 20, 20]), (2, [50, 40, 60, 50]), (1, [150, 20, 120, 110])],
        2: [(2, [5, 5, 25, 25]), (3, [100, 100, 40, 80])],
        3: [(3, [30, 60, 150, 100]), (1, [200, 10, 50, 40])],
    }
    images, annotations = [], []
    for image_id, objs in boxes.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 300, "height": 200})
        for cat, bbox in objs:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    crowd = {"id": 99, "image_id": 2, "category_id": 1, "bbox": [200, 20, 60, 60], "area": 3600, "iscrowd": 1}
    annotations.append(crowd)
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": categories}


def perfect(gt: dict, score: float = 0.9) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def shifted(dets: list[dict], fraction: float) -> list[dict]:
    """Move each box right by ``fraction`` of its width: IoU = (1 - f) / (1 + f)."""
    out = []
    for d in dets:
        x, y, w, h = d["bbox"]
        out.append({**d, "bbox": [x + fraction * w, y, w, h]})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_score_one(backend):
    gt = make_gt()
    result = evaluate_detections(coco_from_dict(gt), perfect(gt), backend=backend)
    assert list(result) == list(METRIC_NAMES)
    assert result == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0), abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_boxes_lose_the_strict_thresholds(backend):
    gt = make_gt()
    # IoU 0.667 passes the thresholds 0.50, 0.55, 0.60, 0.65 and fails the six above: AP = 4/10.
    result = evaluate_detections(gt, shifted(perfect(gt), 0.2), backend=backend)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == pytest.approx(0.0)
    assert result["AP"] == pytest.approx(0.4, abs=1e-6)
    # Far away boxes match nothing.
    assert evaluate_detections(gt, shifted(perfect(gt), 2.0), backend=backend)["AP50"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_class_and_empty_detections_score_zero(backend, capsys):
    gt = make_gt()
    wrong = [{**d, "category_id": 1 + d["category_id"] % 3} for d in perfect(gt)]
    assert evaluate_detections(gt, wrong, backend=backend)["AP50"] == 0.0
    assert evaluate_detections(gt, [], backend=backend) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert capsys.readouterr().out == ""  # the evaluators' chatter is swallowed


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_regions_absorb_detections(backend):
    gt = make_gt()
    on_crowd = {"image_id": 2, "category_id": 1, "bbox": [205, 25, 20, 20], "score": 0.99}
    assert evaluate_detections(gt, [*perfect(gt), on_crowd], backend=backend)["AP"] == pytest.approx(1.0)
    # The same box elsewhere is a confident false positive.
    stray = {**on_crowd, "bbox": [5, 150, 20, 20]}
    assert evaluate_detections(gt, [*perfect(gt), stray], backend=backend)["AP"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_ids_restrict_the_evaluation(backend):
    gt = make_gt()
    dets = [d for d in perfect(gt) if d["image_id"] == 1]  # image 2 and 3 missed
    assert evaluate_detections(gt, dets, backend=backend)["AP"] < 0.7
    assert evaluate_detections(gt, dets, image_ids=[1], backend=backend)["AP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_detections(gt, dets, image_ids=[1, 42], backend=backend)


@pytest.mark.skipif(not HAS_FASTER, reason="faster-coco-eval not installed")
def test_backends_agree_on_noisy_detections():
    gt = make_gt()
    rng = random.Random(0)
    dets = []
    for d in perfect(gt):
        for _ in range(4):
            x, y, w, h = d["bbox"]
            jitter = [x + rng.gauss(0, 0.1) * w, y + rng.gauss(0, 0.1) * h, w * rng.uniform(0.8, 1.2), h]
            cat = d["category_id"] if rng.random() < 0.8 else rng.choice([1, 2, 3])
            dets.append(
                {"image_id": d["image_id"], "category_id": cat, "bbox": jitter, "score": rng.random()}
            )
    before = pickle.dumps(dets)
    fast = evaluate_detections(gt, dets, backend="faster_coco_eval")
    ref = evaluate_detections(gt, dets, backend="pycocotools")
    assert pickle.dumps(dets) == before  # inputs are not modified
    assert 0.2 < ref["AP"] < 0.9
    assert fast == pytest.approx(ref, abs=1e-6)


def test_auto_backend_and_unknown_backend():
    assert coco_eval.resolve_backend("auto") == ("faster_coco_eval" if HAS_FASTER else "pycocotools")
    with pytest.raises(DataError, match="unknown COCO evaluation backend 'detectron'"):
        evaluate_detections(make_gt(), [], backend="detectron")


def test_results_to_detections_converts_xyxy_to_plain_xywh():
    results = {
        torch.tensor(7): {
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([3, 1]),
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.5, 4.0]]),
        },
        8: {"scores": [0.5], "labels": [2], "boxes": [[1, 2, 3, 4]]},
        9: {
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
        },
    }
    dets = results_to_detections(results)
    assert dets == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 5.5, 4.0], "score": 0.25},
        {"image_id": 8, "category_id": 2, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.5},
    ]
    for d in dets:  # builtins only, so gathering across processes needs no torch
        assert type(d["image_id"]) is int and type(d["category_id"]) is int and type(d["score"]) is float
        assert all(type(v) is float for v in d["bbox"])
    assert pickle.loads(pickle.dumps(dets)) == dets
