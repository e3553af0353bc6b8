"""Hungarian matching between predictions and ground-truth boxes (Deformable DETR's matcher).

The cost of assigning query ``q`` to target ``t`` is

    cost_class * focal_cost(q, label_t) + cost_bbox * |box_q - box_t|_1 + cost_giou * (-GIoU(box_q, box_t))

where the class cost is the focal-loss difference ``pos_cost - neg_cost`` on the sigmoid probability of the
target's class (there is no no-object column: the classifier is one sigmoid per class). Each image is solved
on its own with scipy's `linear_sum_assignment` on the CPU.

Crowd boxes: a target dict may carry ``iscrowd``; targets with ``iscrowd == 1`` get no column in the cost
matrix, so they are never matched. The returned target indices still point into the *original* target list.
(`SetCriterion` goes further and drops crowd boxes before matching, as the official COCO loader does, so it
never hands crowd boxes to the matcher in the first place.)
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from sdetr.detector.config import LossConfig


def non_crowd(target: dict[str, Tensor]) -> Tensor:
    """Bool mask [n] of the target's boxes that take part in training (``iscrowd`` absent or 0)."""
    n = len(target["labels"])
    if "iscrowd" not in target:
        return torch.ones(n, dtype=torch.bool, device=target["labels"].device)
    return target["iscrowd"].reshape(n) == 0


def focal_class_cost(prob: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-loss matching cost: [N, C] sigmoid probabilities, [T] labels -> [N, T].

    The cost of predicting class ``c`` for a positive is the focal loss of a positive minus the focal loss of
    a negative at that probability, so a confident correct class is cheap and a confident absence expensive.
    The 1e-8 keeps log() finite at saturated probabilities (same constant as the official code).
    """
    prob = prob[:, labels]
    neg_cost = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos_cost = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos_cost - neg_cost


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the DETR matching cost.

    Unmatched queries are the "no object" predictions. Each image yields ``min(Q, n_targets)`` pairs.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Classification cost [N, T] of logits [N, C] for target labels [T]: the focal cost on sigmoids."""
        return focal_class_cost(logits.sigmoid(), labels, self.focal_alpha, self.focal_gamma)

    @torch.no_grad()
    def cost_matrices(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[Tensor]:
        """Per-image matching costs over the non-crowd targets.

        Args:
            pred_logits: [B, Q, C] classification logits.
            pred_boxes: [B, Q, 4] (cx, cy, w, h) normalised boxes.
            targets: B dicts with ``labels`` [n_i], ``boxes`` [n_i, 4] (cx, cy, w, h), optional ``iscrowd``.
        Returns:
            B CPU float tensors [Q, m_i], m_i = number of non-crowd targets of image i (original order).
        """
        bs, num_queries = pred_logits.shape[:2]
        keeps = [non_crowd(t) for t in targets]
        tgt_labels = torch.cat([t["labels"][k] for t, k in zip(targets, keeps)])
        tgt_boxes = torch.cat([t["boxes"][k] for t, k in zip(targets, keeps)])
        sizes = [int(k.sum()) for k in keeps]
        if tgt_labels.numel() == 0:
            return [pred_logits.new_zeros(num_queries, 0, device="cpu") for _ in range(bs)]

        # One batched [B*Q, T_total] matrix is cheaper than B small ones; each image then keeps its own
        # block of columns.
        boxes = pred_boxes.flatten(0, 1).float()
        tgt_boxes = tgt_boxes.to(boxes)
        cost = self.cost_class * self.class_cost(pred_logits.flatten(0, 1).float(), tgt_labels)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        cost = cost - self.cost_giou * giou
        cost = cost.view(bs, num_queries, -1).cpu()
        return [c[i] for i, c in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: at least ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4]; other keys are ignored.
            targets: B dicts with ``labels`` int64 [n_i], ``boxes`` [n_i, 4], optional ``iscrowd`` [n_i].
        Returns:
            B pairs (pred_idx, tgt_idx), int64 CPU tensors of equal length ``min(Q, m_i)``; ``pred_idx`` is
            increasing, ``tgt_idx`` indexes the image's original target list (crowd targets never appear).
        """
        costs = self.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"], targets)
        indices = []
        for cost, target in zip(costs, targets):
            if cost.shape[1] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if not torch.isfinite(cost).all():
                # scipy would only say "matrix contains invalid numeric entries"; name the likely cause.
                raise ValueError(
                    "HungarianMatcher: non-finite matching cost (NaN/inf in predictions or boxes)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            # Columns count non-crowd targets only; map them back to positions in the original list.
            kept = torch.nonzero(non_crowd(target).cpu(), as_tuple=True)[0]
            cols = kept[torch.as_tensor(cols, dtype=torch.int64)]
            indices.append((torch.as_tensor(rows, dtype=torch.int64), cols))
        return indices


def build_matcher(loss_cfg: LossConfig) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=loss_cfg.set_cost_class,
        cost_bbox=loss_cfg.set_cost_bbox,
        cost_giou=loss_cfg.set_cost_giou,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
    )
