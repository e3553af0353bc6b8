"""COCO box AP of a list of detections.

Detections are plain dicts (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original image
pixels, ``score``), so distributed workers can gather them as ordinary Python objects and rank 0
evaluates once. Two interchangeable backends: faster-coco-eval (a C++ reimplementation, several
times faster, same numbers) and the reference pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sdetr.detector.errors import DataError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
BACKENDS = ("auto", "faster_coco_eval", "pycocotools")


def _has_faster_coco_eval() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise DataError(f"unknown COCO evaluation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faster_coco_eval" if _has_faster_coco_eval() else "pycocotools"
    if backend == "faster_coco_eval" and not _has_faster_coco_eval():
        raise DataError("backend 'faster_coco_eval' is not installed (pip install faster-coco-eval)")
    return backend


def _as_list(values: Any) -> list:
    """Tensor / ndarray / list -> nested Python list (no torch import needed)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


def results_to_detections(
    results: Mapping[Any, Mapping[str, Any]], label_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Postprocessed outputs -> COCO result dicts.

    Args:
        results: ``{image_id: {"scores": [K], "labels": [K], "boxes": [K, 4]}}`` with boxes as absolute
            ``(x0, y0, x1, y1)`` pixels of the original image (tensors, arrays or lists).
        label_ids: the data set's category id of each label (``CategoryMap.label_ids``; -1 = a label no
            category uses): detections are written with the original ids, and those of unused labels are
            dropped. None: labels are the category ids (DETR's raw COCO labels).

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]`` made of
        builtin types only (picklable, JSON-serialisable).
    """
    detections = []
    for image_id, result in results.items():
        image_id = int(_as_list([image_id])[0]) if not isinstance(image_id, int) else image_id
        scores, labels, boxes = (_as_list(result[k]) for k in ("scores", "labels", "boxes"))
        for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes):
            category_id = int(label)
            if label_ids is not None:
                category_id = label_ids[category_id] if 0 <= category_id < len(label_ids) else -1
                if category_id < 0:
                    continue
            detections.append(
                {
                    "image_id": int(image_id),
                    "category_id": category_id,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(score),
                }
            )
    return detections


def _dataset_dict(coco_gt: Any) -> dict[str, Any]:
    """The ground-truth dict behind a pycocotools/faster-coco-eval `COCO`, or a plain dict."""
    if isinstance(coco_gt, dict):
        return coco_gt
    dataset = getattr(coco_gt, "dataset", None)
    if not isinstance(dataset, dict):
        raise DataError(f"coco_gt must be a COCO object or a COCO dict, got {type(coco_gt).__name__}")
    return dataset


@contextlib.contextmanager
def _quiet():
    """Swallow the evaluators' progress prints and faster-coco-eval's info logging."""
    fce_logger = logging.getLogger("faster_coco_eval")
    level = fce_logger.level
    fce_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        fce_logger.setLevel(level)


def _run_cocoeval(gt_dict: dict, detections: list[dict], image_ids: list[int], backend: str):
    """The evaluator after evaluate / accumulate / summarize."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt_dict)
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def evaluate_detections(
    coco_gt: Any,
    detections: Iterable[Mapping[str, Any]],
    image_ids: Iterable[int] | None = None,
    backend: str = "auto",
) -> dict[str, float]:
    """COCO bbox AP of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: the ground truth: a pycocotools or faster-coco-eval `COCO` (e.g. ``dataset.coco``) or
            its dict.
        detections: COCO result dicts (see `results_to_detections`); not modified.
        image_ids: evaluate on these images only (default: every ground-truth image). Detections on
            other images are ignored.
        backend: "auto" (faster-coco-eval when importable, else pycocotools), "faster_coco_eval" or
            "pycocotools".

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as floats in [0, 1] (COCOeval.stats[0:6]).
        COCOeval's -1 ("no ground truth in this area range") is reported as 0.0, and no detections at
        all gives zeros without running the evaluator.
    """
    backend = resolve_backend(backend)
    gt_dict = _dataset_dict(coco_gt)
    gt_ids = [img["id"] for img in gt_dict.get("images", [])]
    if image_ids is None:
        ids = sorted(gt_ids)
    else:
        known = set(gt_ids)
        ids = sorted({int(i) for i in image_ids})
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(f"image ids not in the ground truth: {unknown[:10]}")
    wanted = set(ids)
    # Copies: loadRes adds id/area/segmentation fields to the dicts it is given.
    dets = [dict(d) for d in detections if int(d["image_id"]) in wanted]
    for d in dets:
        d["bbox"] = [float(v) for v in d["bbox"]]
    if not dets or not ids:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with _quiet():
        stats = _run_cocoeval(gt_dict, dets, ids, backend).stats
    return {name: float(max(value, 0.0)) for name, value in zip(METRIC_NAMES, stats)}


def per_category_ap(
    coco_gt: Any, detections: Iterable[Mapping[str, Any]], backend: str = "auto"
) -> dict[int, float]:
    """COCO AP (IoU 0.50:0.95, all areas, 100 detections) of each ground-truth category, keyed by its
    category id as the data set spells it; -1 for a category without ground truth. A detection whose
    category id is not in the ground truth is a DataError (labels not mapped back to the ids)."""
    backend = resolve_backend(backend)
    gt_dict = _dataset_dict(coco_gt)
    cat_ids = sorted(int(c["id"]) for c in gt_dict.get("categories", []))
    dets = [dict(d, bbox=[float(v) for v in d["bbox"]]) for d in detections]
    unknown = sorted({int(d["category_id"]) for d in dets} - set(cat_ids))
    if unknown:
        raise DataError(
            f"detections with category ids {unknown[:10]} not in the ground truth (ids {cat_ids[:20]})"
        )
    if not dets:
        return dict.fromkeys(cat_ids, 0.0)
    with _quiet():
        evaluator = _run_cocoeval(gt_dict, dets, sorted(img["id"] for img in gt_dict["images"]), backend)
    # precision: [IoU thresholds, recall points, categories (params.catIds order), areas, max dets]
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        out[int(cat_id)] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out
