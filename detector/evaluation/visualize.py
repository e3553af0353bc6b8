"""Pictures of what a detector does on one image: its boxes and, for Sparse DETR, the figure of the paper's
method — the scoring network's per-token scores, the tokens kept at the model's ρ, and the DAM target
(the tokens the decoder attended to most, which the scoring network learns to predict).

Everything is drawn at the resolution the model saw (the transformed, unpadded image) with PIL alone:
no matplotlib, so a Ray worker or ``sdetr predict`` pays a few milliseconds per picture.

Token panels: each encoder token covers a ``stride x stride`` cell of the image (strides 8, 16, 32, 64
for the four levels). Scores are shown per pixel as the maximum over levels of the token's sigmoid score;
kept and target tokens are drawn level by level, coarse first, so finer cells stay visible on top.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch import Tensor

from sdetr.detector.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sdetr.detector.losses.dam import attn_map_to_flat_grid, dam_target

TITLE_HEIGHT = 14  # pixels of the caption bar above each panel
# One colour per feature level (fine -> coarse) for the kept / target token panels.
LEVEL_COLOURS = ((255, 60, 60), (255, 170, 0), (60, 200, 255), (200, 90, 255))
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def to_rgb(image: Tensor) -> np.ndarray:
    """A normalised model input [3, H, W] back to uint8 RGB [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    pixels = (image.detach().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def _titled(panel: PIL.Image.Image, title: str) -> PIL.Image.Image:
    out = PIL.Image.new("RGB", (panel.width, panel.height + TITLE_HEIGHT), (255, 255, 255))
    out.paste(panel, (0, TITLE_HEIGHT))
    PIL.ImageDraw.Draw(out).text((2, 1), title, fill=(0, 0, 0))
    return out


def draw_boxes(
    rgb: np.ndarray,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    threshold: float = 0.3,
    names: dict[int, str] | None = None,
) -> PIL.Image.Image:
    """The image with every detection scoring at least ``threshold``.

    Args:
        rgb: uint8 [H, W, 3]; boxes: [K, 4] (x1, y1, x2, y2) in its pixels; labels: int [K]; scores: [K].
    """
    img = PIL.Image.fromarray(rgb).convert("RGB")
    draw = PIL.ImageDraw.Draw(img)
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        if score < threshold:
            continue
        colour = _BOX_COLOURS[int(label) % len(_BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=2)
        name = (names or {}).get(int(label), str(int(label)))
        draw.text((box[0] + 2, box[1] + 1), f"{name} {score:.2f}", fill=colour)
    return img


def _level_grids(values: Tensor, spatial_shapes: Tensor) -> list[np.ndarray]:
    """Flat per-token values [S] -> one [H_l, W_l] array per level."""
    out, start = [], 0
    for h, w in spatial_shapes.tolist():
        out.append(values[start : start + h * w].reshape(h, w).float().cpu().numpy())
        start += h * w
    return out


def _strides(spatial_shapes: Tensor, padded_hw: tuple[int, int]) -> list[int]:
    return [max(1, round(padded_hw[0] / h)) for h, _ in spatial_shapes.tolist()]


def heat_panel(rgb: np.ndarray, grids: list[np.ndarray], strides: list[int]) -> PIL.Image.Image:
    """Per pixel the maximum over levels of the values in [0, 1], as a red-yellow overlay on a grey image."""
    height, width = rgb.shape[:2]
    heat = np.zeros((height, width), dtype=np.float32)
    for grid, stride in zip(grids, strides):
        up = np.kron(grid, np.ones((stride, stride), dtype=np.float32))[:height, :width]
        pad = np.zeros((height, width), dtype=np.float32)
        pad[: up.shape[0], : up.shape[1]] = up
        heat = np.maximum(heat, pad)
    grey = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.5
    colour = np.stack([255 * np.ones_like(heat), 255 * heat, np.zeros_like(heat)], axis=2)
    alpha = (0.25 + 0.75 * heat)[..., None]
    return PIL.Image.fromarray((grey * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))


def token_panel(rgb: np.ndarray, grids: list[np.ndarray], strides: list[int]) -> PIL.Image.Image:
    """The tokens whose value is true, as their cells in the level's colour over a dimmed image (coarse
    levels first, so the finer cells stay visible on top)."""
    height, width = rgb.shape[:2]
    out = rgb.astype(np.float32) * 0.45
    for level in reversed(range(len(grids))):
        stride = strides[level]
        up = np.kron(grids[level] > 0.5, np.ones((stride, stride), dtype=bool))[:height, :width]
        sel = np.zeros((height, width), dtype=bool)
        sel[: up.shape[0], : up.shape[1]] = up
        out[sel] = 0.35 * out[sel] + 0.65 * np.array(LEVEL_COLOURS[level % len(LEVEL_COLOURS)], np.float32)
    return PIL.Image.fromarray(out.clip(0, 255).astype(np.uint8))


def sparse_maps(outputs: dict, index: int) -> dict[str, Tensor] | None:
    """Image ``index``'s scoring-network scores (sigmoid) [S], kept tokens [S] (0/1) and DAM target [S]
    (0/1), from a Sparse DETR forward's outputs; None for a model that does not sparsify."""
    if "backbone_mask_prediction" not in outputs or "backbone_topk_proposals" not in outputs:
        return None
    scores = outputs["backbone_mask_prediction"][index].float()
    keep = int(outputs["sparse_token_nums"][index])
    kept = torch.zeros_like(scores)
    kept[outputs["backbone_topk_proposals"][index][:keep]] = 1.0
    target = None
    if "sampling_locations_dec" in outputs:
        flat = attn_map_to_flat_grid(
            outputs["spatial_shapes"],
            outputs["level_start_index"],
            outputs["sampling_locations_dec"][index : index + 1],
            outputs["attn_weights_dec"][index : index + 1],
        ).sum(dim=(1, 2))
        mask = outputs.get("mask_flatten")
        mask = None if mask is None else mask[index : index + 1]
        target = dam_target(flat, mask, outputs["sparse_token_nums"][index : index + 1])[0]
    return {"scores": scores.sigmoid(), "kept": kept, "target": target}


def picture(
    image: Tensor,
    hw: tuple[int, int],
    detections: dict[str, Tensor],
    outputs: dict | None = None,
    index: int = 0,
    threshold: float = 0.3,
    names: dict[int, str] | None = None,
    rho: float | None = None,
) -> PIL.Image.Image:
    """One image's picture: the boxes, then for Sparse DETR its scores, kept tokens and DAM target, side by
    side, each ``h`` + `TITLE_HEIGHT` pixels high and ``w`` wide.

    Args:
        image: the normalised (possibly padded) model input [3, Hp, Wp]; hw: its unpadded (h, w).
        detections: ``boxes`` [K, 4] in the unpadded input's pixels, ``labels``, ``scores`` (PostProcess).
        outputs: the model's raw outputs for the batch ``image`` came from (for the token panels).
    """
    h, w = hw
    rgb = to_rgb(image[:, :h, :w])
    boxes, labels, scores = detections["boxes"], detections["labels"], detections["scores"]
    shown = int((scores >= threshold).sum())
    boxes_panel = draw_boxes(rgb, boxes, labels, scores, threshold, names)
    panels = [_titled(boxes_panel, f"boxes >= {threshold:g} ({shown})")]
    maps = sparse_maps(outputs, index) if outputs is not None else None
    if maps is not None:
        shapes = outputs["spatial_shapes"]
        strides = _strides(shapes, tuple(image.shape[-2:]))
        at = f" at rho {rho:g}" if rho else ""
        panels.append(_titled(heat_panel(rgb, _level_grids(maps["scores"], shapes), strides), "token scores"))
        panels.append(_titled(token_panel(rgb, _level_grids(maps["kept"], shapes), strides), f"kept{at}"))
        if maps["target"] is not None:
            grids = _level_grids(maps["target"], shapes)
            panels.append(_titled(token_panel(rgb, grids, strides), "DAM target"))
    out = PIL.Image.new("RGB", (w * len(panels), h + TITLE_HEIGHT), (255, 255, 255))
    for i, panel in enumerate(panels):
        out.paste(panel, (i * w, 0))
    return out
