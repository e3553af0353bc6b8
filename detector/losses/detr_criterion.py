"""DETR's matcher and losses: softmax classification with a no-object class.

Matching cost: ``cost_class · (−p(target class)) + cost_bbox · L1 + cost_giou · (−GIoU)`` with the
softmax probability (DETR: 1 / 5 / 2). Losses: cross-entropy over the K classes + no-object, the
no-object class weighted ``eos_coef`` (0.1), where unmatched queries' target is no-object; L1 and GIoU
of the matched boxes as in `SetCriterion` (whose orchestration — crowd removal, normalisation by the
number of boxes, per-layer auxiliary losses with ``_i`` suffixes — is reused unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdetr.detector.config import LossConfig, ModelConfig
from sdetr.detector.losses.criterion import (
    Indices,
    SetCriterion,
    Targets,
    _src_permutation_idx,
    build_weight_dict,
)
from sdetr.detector.losses.matcher import HungarianMatcher


class DETRMatcher(HungarianMatcher):
    """Hungarian matching with DETR's class cost: minus the softmax probability of the target class."""

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits [N, K+1], labels [T] -> [N, T]"""
        return -logits.softmax(-1)[:, labels]


class DETRSetCriterion(SetCriterion):
    """`SetCriterion` with DETR's cross-entropy classification loss.

    Args:
        num_classes: K; the logits have K + 1 columns, the last one "no object".
        eos_coef: relative weight of the no-object class in the cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float = 0.1,
        losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
    ):
        super().__init__(num_classes, matcher, weight_dict, list(losses))
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self, outputs: dict, targets: Targets, indices: Indices, num_boxes: float, log: bool = True
    ) -> dict[str, Tensor]:
        """Weighted cross-entropy over all queries (mean weighted by class weight, as F.cross_entropy)."""
        logits = outputs["pred_logits"]  # [B, Q, K+1]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"DETRSetCriterion: expected {self.num_classes + 1} logits (K + no-object), "
                f"got {logits.shape[-1]}"
            )
        idx = _src_permutation_idx(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[idx] = labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits))
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = self._class_error(logits[idx], labels)
        return losses


def build_detr_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig) -> DETRSetCriterion:
    """DETR's criterion: cls_loss_coef / bbox / giou coefficients (DETR: 1 / 5 / 2) on the final and
    every auxiliary decoder output, matcher costs ``loss.set_cost_*``, no-object weight ``loss.eos_coef``."""
    matcher = DETRMatcher(
        cost_class=loss_cfg.set_cost_class, cost_bbox=loss_cfg.set_cost_bbox, cost_giou=loss_cfg.set_cost_giou
    )
    return DETRSetCriterion(
        model_cfg.num_classes, matcher, build_weight_dict(model_cfg, loss_cfg), eos_coef=loss_cfg.eos_coef
    )
