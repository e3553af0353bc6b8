"""Turn the model's raw outputs into per-image detections in absolute pixel coordinates (COCO format).

With sigmoid classification every (query, class) pair is a candidate detection: the top ``num_select``
pairs by probability are kept, so one query can yield several detections with different labels (this is
what Deformable DETR evaluates, and it matters for COCO AP). The baselines' outputs say how to read them:
DETR's (``class_activation == "softmax"``) give one detection per query, its best class other than
no-object; Faster R-CNN's (``detections``) are already final and are only scaled.
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
        if "detections" in outputs:
            return self._scale_detections(outputs["detections"], target_sizes)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[-1] != 2:
            shape = tuple(target_sizes.shape)
            raise ValueError(f"PostProcess: target_sizes must be [B, 2] with B = {len(logits)}, got {shape}")
        if outputs.get("class_activation", "sigmoid") == "softmax":
            return self._softmax_queries(logits, boxes, target_sizes)
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

    def _softmax_queries(
        self, logits: Tensor, boxes: Tensor, target_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """DETR: logits [B, Q, K+1] (last = no object); each query's best real class, top num_select."""
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]
        k = min(self.num_select, logits.shape[1])
        scores, query_idx = scores.topk(k, dim=1)
        labels = torch.gather(labels, 1, query_idx)
        xyxy = torch.gather(
            box_convert(boxes, "cxcywh", "xyxy"), 1, query_idx.unsqueeze(-1).expand(-1, -1, 4)
        )
        xyxy = xyxy * _scale(target_sizes, xyxy.dtype)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)]

    def _scale_detections(self, detections: list[dict[str, Tensor]], target_sizes: Tensor) -> list[dict]:
        """Faster R-CNN: boxes (x1, y1, x2, y2) normalised to the image -> pixels; top num_select."""
        if len(detections) != len(target_sizes):
            raise ValueError(
                f"PostProcess: {len(detections)} images of detections, {len(target_sizes)} sizes"
            )
        out = []
        for det, size in zip(detections, _scale(target_sizes, torch.float32)):
            order = det["scores"].argsort(descending=True)[: self.num_select]
            boxes = det["boxes"][order] * size.to(det["boxes"])
            out.append({"scores": det["scores"][order], "labels": det["labels"][order], "boxes": boxes})
        return out


def _scale(target_sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 2] (height, width) -> [B, 4] (w, h, w, h)."""
    img_h, img_w = target_sizes.to(dtype).unbind(-1)
    return torch.stack([img_w, img_h, img_w, img_h], dim=-1)


def build_postprocessors(num_select: int = 100) -> dict[str, nn.Module]:
    """The official ``postprocessors`` dict (boxes only)."""
    return {"bbox": PostProcess(num_select)}
