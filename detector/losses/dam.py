"""Decoder Attention Map (DAM): the target that trains Sparse DETR's token scoring network.

The decoder's deformable cross-attention looks at a few sampling points per query, head, level and point.
Splatting every sampling point's attention weight back onto the encoder token grid (bilinearly, onto the four
neighbouring cells) gives a map of how much the decoder used each encoder token. Per image, the top
``sparse_token_nums[i]`` tokens of that map are the positives that the scoring network learns to predict
(`dam_target`, `dam_loss`).

Grid convention. Deformable attention's sampling location (x, y) in [0, 1] of a level of size (H, W) is read
by ``grid_sample(align_corners=False)`` at pixel coordinate (x*W - 0.5, y*H - 0.5), where pixel centres sit
at integer coordinates. The official Sparse DETR code splats at (x*W, y*H) instead, i.e. half a cell to the
bottom-right of the point actually sampled. We keep the official convention by default (so the targets match
the published models) and offer ``align_corners_shift=True`` for the geometrically exact one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attn_map_to_flat_grid(
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    align_corners_shift: bool = False,
) -> Tensor:
    """Accumulate attention weights onto the flattened multi-level token grid.

    Args:
        spatial_shapes: long [L, 2], (H, W) of each level.
        level_start_index: long [L], offset of each level in the flattened token sequence.
        sampling_locations: [B, n_layers, Q, n_heads, L, P, 2], normalised (x, y) per level.
        attention_weights: [B, n_layers, Q, n_heads, L, P].
        align_corners_shift: subtract half a cell (grid_sample's sampling point) instead of the official
            unshifted x*W, y*H.
    Returns:
        [B, n_layers, n_heads, S] with S = sum(H*W); float32 at least. Corners outside their level are
        dropped, so a sample near the border contributes less than its attention weight.
    """
    bs, n_layers, n_queries, n_heads, n_levels, n_points, _ = sampling_locations.shape
    dtype = torch.promote_types(attention_weights.dtype, torch.float32)
    num_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())

    # [B, n_layers, n_heads, Q, L, P, 2]: one row per (image, layer, head) so a single scatter fills the map.
    loc = sampling_locations.permute(0, 1, 3, 2, 4, 5, 6).to(dtype)
    attn = attention_weights.permute(0, 1, 3, 2, 4, 5).to(dtype)
    heights = spatial_shapes[:, 0].view(n_levels, 1)
    widths = spatial_shapes[:, 1].view(n_levels, 1)
    starts = level_start_index.view(n_levels, 1)

    x = loc[..., 0] * widths.to(dtype)
    y = loc[..., 1] * heights.to(dtype)
    if align_corners_shift:
        x = x - 0.5
        y = y - 0.5
    x0 = x.floor()
    y0 = y.floor()
    fx = x - x0  # distance to the left cell, in [0, 1)
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()

    # The four neighbours (left/right x top/bottom) with their bilinear factors: [..., 4].
    cx = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    cy = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    factor = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=-1)

    w_ = widths.unsqueeze(-1)
    h_ = heights.unsqueeze(-1)
    inside = (cx >= 0) & (cx < w_) & (cy >= 0) & (cy < h_)
    flat_idx = starts.unsqueeze(-1) + cy * w_ + cx
    # Dropped corners still need a legal index for scatter_add; they add exactly zero at token 0.
    flat_idx = torch.where(inside, flat_idx, torch.zeros_like(flat_idx))
    weight = torch.where(inside, attn.unsqueeze(-1) * factor, torch.zeros_like(factor))

    rows = bs * n_layers * n_heads
    flat_grid = torch.zeros(rows, num_tokens, dtype=dtype, device=attention_weights.device)
    flat_grid.scatter_add_(1, flat_idx.reshape(rows, -1), weight.reshape(rows, -1))
    return flat_grid.view(bs, n_layers, n_heads, num_tokens)


@torch.no_grad()
def dam_target(flat_attn_map: Tensor, mask_flatten: Tensor | None, sparse_token_nums: Tensor) -> Tensor:
    """Binary scoring-network target: each image's ``sparse_token_nums[i]`` most-attended tokens.

    Args:
        flat_attn_map: [B, S] DAM summed over decoder layers and heads.
        mask_flatten: bool [B, S], True at padded tokens (or None when there is no padding).
        sparse_token_nums: long [B], tokens kept per image (int(valid * rho) + 1).
    Returns:
        float [B, S] of 0/1, same dtype as the map.

    Padded tokens are pushed below every real token so they are never selected. Unlike the official code we
    also cap ``sparse_token_nums[i]`` at the image's number of real tokens (it only exceeds it when rho >= 1),
    so a padded token can never become a positive.
    """
    bs, num_tokens = flat_attn_map.shape
    scores = flat_attn_map
    keep = sparse_token_nums.to(device=scores.device, dtype=torch.long).clamp(0, num_tokens)
    if mask_flatten is not None:
        scores = scores.masked_fill(mask_flatten, float("-inf"))
        keep = torch.minimum(keep, (~mask_flatten).sum(1))
    k_max = int(keep.max()) if bs > 0 else 0
    order = scores.topk(k_max, dim=1).indices  # [B, k_max], most attended first
    selected = torch.arange(k_max, device=scores.device).unsqueeze(0) < keep.unsqueeze(1)
    target = torch.zeros_like(flat_attn_map)
    # topk indices are distinct within a row, so scattering 1s (kept) and 0s (beyond keep_i) cannot collide.
    target.scatter_(1, order, selected.to(target.dtype))
    return target


def dam_loss(mask_prediction: Tensor, target: Tensor) -> Tensor:
    """Scoring-network loss: [B, S] logits vs [B, S] 0/1 target -> scalar.

    ``multilabel_soft_margin_loss`` is binary cross-entropy with logits averaged over tokens and images,
    padded tokens included (as in the official code).
    """
    return F.multilabel_soft_margin_loss(mask_prediction, target.to(mask_prediction.dtype))


@torch.no_grad()
def dam_correlation(
    kept_idx: Tensor, flat_attn_map: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
) -> dict[str, Tensor]:
    """Diagnostic: share of the decoder's attention that falls on the tokens the encoder kept.

    Args:
        kept_idx: long [B, k], token indices kept by the scoring network.
        flat_attn_map: [B, S] DAM summed over decoder layers and heads.
        spatial_shapes: long [L, 2]; level_start_index: long [L].
    Returns:
        ``corr_mask_attn_map_dec_all`` and ``corr_mask_attn_map_dec_{level}``: batch means of
        (attention on kept tokens) / (total attention), over all tokens and per level (official names).
    """
    kept = torch.zeros_like(flat_attn_map)
    kept.scatter_(1, kept_idx.long(), 1.0)
    hit = kept * flat_attn_map
    # An empty map (e.g. a level never attended) gives 0 rather than 0/0.
    tiny = torch.finfo(flat_attn_map.dtype).tiny
    out = {"corr_mask_attn_map_dec_all": (hit.sum(1) / flat_attn_map.sum(1).clamp_min(tiny)).mean()}
    for lvl, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        span = slice(start, start + h * w)
        ratio = hit[:, span].sum(1) / flat_attn_map[:, span].sum(1).clamp_min(tiny)
        out[f"corr_mask_attn_map_dec_{lvl}"] = ratio.mean()
    return out
