"""Key-aware deformable attention (KDA) of Lite DETR (Li et al., CVPR 2023).

Plain deformable attention predicts each sampling point's weight from the query alone. KDA samples keys
as well as values at the deformable locations and weighs the points by their keys' similarity to the
query, as in ordinary attention restricted to the sampled points:

    K = S(X W_K, p + Δp),  V = S(X W_V, p + Δp),  A = softmax_{levels × points}(Q K^T / √d)  (per head)

where S is bilinear sampling (``grid_sample``, ``align_corners=False``, zeros outside the map) and d the
channels per head. The sampling offsets Δp are predicted from the query exactly as in `MSDeformAttn`.
`key_aware_deform_attn` is the pure-PyTorch core; there is no compiled op for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.detector.layers.ms_deform_attn import init_sampling_offsets, sampling_locations


def key_aware_deform_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
) -> tuple[Tensor, Tensor]:
    """The KDA core: sample keys and values, weigh the samples by softmax(q·k / √d) per head.

    Args:
        query: [N, Lq, M, D] projected queries, per head.
        key, value: [N, S, M, D] projected keys / values of all levels, flattened and concatenated
            (S = sum H_l·W_l).
        spatial_shapes: long [L, 2], (H_l, W_l) per level.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y) in [0, 1] of each level.

    Returns:
        output [N, Lq, M·D] and the attention weights [N, Lq, M, L, P] (softmax over L·P).
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    # Keys and values share the sampling locations: sample them in one grid_sample per level.
    key_value = torch.cat([key, value], dim=-1).split(sizes, dim=1)  # per level [N, H*W, M, 2D]
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # [N, H*W, M, 2D] -> [N*M, 2D, H, W]
        kv = key_value[lvl].permute(0, 2, 3, 1).reshape(n * m, 2 * d, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(kv, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, 2D, Lq, L*P]
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    sampled_key, sampled_value = sampled.split(d, dim=1)
    q = query.permute(0, 2, 3, 1).reshape(n * m, d, lq)  # [N*M, D, Lq]
    scores = torch.einsum("bdql,bdq->bql", sampled_key, q) / math.sqrt(d)  # [N*M, Lq, L*P]
    weights = scores.softmax(-1)
    out = torch.einsum("bdql,bql->bdq", sampled_value, weights)  # [N*M, D, Lq]
    out = out.reshape(n, m * d, lq).transpose(1, 2).contiguous()
    weights = weights.view(n, m, lq, n_levels, n_points).transpose(1, 2)
    return out, weights


class KeyAwareDeformAttn(nn.Module):
    """Multi-scale key-aware deformable attention; a drop-in replacement of `MSDeformAttn`.

    Parameters: ``sampling_offsets`` (as MSDeformAttn), ``query_proj``, ``key_proj``, ``value_proj``,
    ``output_proj``; no ``attention_weights`` layer.

    Args:
        d_model: channels C.
        n_levels: feature levels L.
        n_heads: attention heads M (C must be divisible by M).
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.query_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        init_sampling_offsets(self.sampling_offsets, self.n_heads, self.n_levels, self.n_points)
        for lin in (self.query_proj, self.key_proj, self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.constant_(lin.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [N, Lq, C] (with its position embedding added).
            reference_points: [N, Lq, L, 2] normalised (x, y), or [N, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, C] the tokens keys and values are made from.
            input_spatial_shapes: long [L, 2]
            input_level_start_index: long [L] (unused; kept for MSDeformAttn's signature)
            input_padding_mask: bool [N, S], True at padding (those keys and values are zeroed).

        Returns:
            output [N, Lq, C], sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P]
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        m, d = self.n_heads, self.d_model // self.n_heads
        key = self.key_proj(input_flatten)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            key = key.masked_fill(input_padding_mask[..., None], 0.0)
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        offsets = self.sampling_offsets(query).view(n, lq, m, self.n_levels, self.n_points, 2)
        locations = sampling_locations(reference_points, offsets, input_spatial_shapes)
        out, weights = key_aware_deform_attn(
            self.query_proj(query).view(n, lq, m, d),
            key.view(n, s, m, d),
            value.view(n, s, m, d),
            input_spatial_shapes,
            locations,
        )
        return self.output_proj(out), locations, weights
