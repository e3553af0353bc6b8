"""Batch images of different sizes: zero-pad to the largest and keep a mask of the padding.

DETR-style detectors see the padded batch; the mask tells the backbone's position encoding and the
transformer's attention which pixels are not part of the image. Images are anchored at the top-left
so box coordinates (normalised to each image's own size) stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def nested_tensor_from_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of C x H_i x W_i tensors to one batch.

    Returns:
        images: FloatTensor[B, C, Hmax, Wmax], zero at the bottom/right padding.
        masks: BoolTensor[B, Hmax, Wmax], True where a pixel is padding.
    """
    if len(images) == 0:
        raise ValueError("nested_tensor_from_images needs at least one image")
    channels = {img.shape[0] for img in images}
    if any(img.dim() != 3 for img in images) or len(channels) != 1:
        shapes = [tuple(img.shape) for img in images]
        raise ValueError(f"expected C x H x W images with the same C, got shapes {shapes}")
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], max_h, max_w))
    masks = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        batch[i, :, :h, :w].copy_(img)
        masks[i, :h, :w] = False
    return batch, masks


def collate_fn(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """DataLoader collate for ``(image FloatTensor[3, H, W], target dict)`` items.

    Returns ``(images FloatTensor[B, 3, Hmax, Wmax], masks BoolTensor[B, Hmax, Wmax], targets)`` where
    ``targets`` is the list of per-image dicts unchanged (their box counts differ).
    """
    images, targets = zip(*batch)
    padded, masks = nested_tensor_from_images(list(images))
    return padded, masks, list(targets)
