"""Turn the model's raw outputs into per-image detections in absolute pixel coordinates (COCO format).

With sigmoid classification every (query, class) pair is a candidate detection: the top ``num_select``
pairs by probability are kept, so one query can yield several detections with different labels (this is
what Deformable DETR evaluates, and it matters for COCO AP).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Top-``num_select`` (query, class) detections per image."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] (cx, cy, w, h normalised).
            target_sizes: [B, 2] (height, width) to scale each image's boxes to: the original image size
                for evaluation, the augmented unpadded size for visualisation.
        Returns:
            B dicts with ``scores`` [k], ``labels`` int64 [k] and ``boxes`` [k, 4] (x1, y1, x2, y2 pixels),
            sorted by decreasing score, k = min(num_select, Q * C).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[-1] != 2:
            shape = tuple(target_sizes.shape)
            raise ValueError(f"PostProcess: target_sizes must be [B, 2] with B = {len(logits)}, got {shape}")
        bs, num_queries, num_classes = logits.shape
        k = min(self.num_select, num_queries * num_classes)

        prob = logits.sigmoid().view(bs, -1)  # [B, Q*C], index = query * C + class
        scores, flat_idx = prob.topk(k, dim=1)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes

        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        xyxy = torch.gather(xyxy, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(xyxy.dtype).unbind(-1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=-1)  # [B, 4]
        xyxy = xyxy * scale[:, None, :]

        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]


def build_postprocessors(num_select: int = 100) -> dict[str, nn.Module]:
    """The official ``postprocessors`` dict (boxes only)."""
    return {"bbox": PostProcess(num_select)}
