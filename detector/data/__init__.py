"""Data: the COCO data set and its validation, DETR's transforms, batching and a synthetic COCO set."""

from sdetr.detector.data.batching import collate_fn, nested_tensor_from_images
from sdetr.detector.data.coco import (
    AnnotationReport,
    CocoDetection,
    build_dataset,
    validate_annotations,
)
from sdetr.detector.data.synth import SYNTH_CATEGORIES, generate_synthetic_coco
from sdetr.detector.data.transforms import make_transforms

__all__ = [
    "SYNTH_CATEGORIES",
    "AnnotationReport",
    "CocoDetection",
    "build_dataset",
    "collate_fn",
    "generate_synthetic_coco",
    "make_transforms",
    "nested_tensor_from_images",
    "validate_annotations",
]
