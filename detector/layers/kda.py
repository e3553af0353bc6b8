"""Key-aware deformable attention (KDA) of Lite DETR (Li et al., CVPR 2023).

Plain deformable attention predicts each sampling point's weight from the query alone. KDA samples keys
as well as values at the deformable locations and weighs the points by their keys' similarity to the
query, as in ordinary attention restricted to the sampled points:

    K = S(X W_K, p + Δp),  V = S(X W_V, p + Δp),  A = softmax_{levels × points}(Q K^T / √d)  (per head)

where S is bilinear sampling (``grid_sample``, ``align_corners=False``, zeros outside the map) and d the
channels per head. As the released code (``MSDeformAttn`` with ``key_aware=True``): the query is projected
(``query_proj``, in place of ``attention_weights``); the keys are the value projection unless ``proj_key``
(then ``key_proj``), so one sample serves as key and value; the offsets are per level unless ``same_loc``
(one set per head, shared by the levels).

`kda` is the entry point the model calls: the compiled op ``torch.ops.sdetr.kda`` (C++ on CPU, Triton on
GPU; `sdetr.detector.ops.kda`) when it is available, else the pure-PyTorch `key_aware_deform_attn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.detector.layers.common import Float32Linear
from sdetr.detector.layers.ms_deform_attn import (
    LevelShapes,
    init_sampling_offsets,
    level_sizes,
    sampling_locations,
)


def key_aware_deform_attn(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    level_shapes: LevelShapes | None = None,
) -> tuple[Tensor, Tensor]:
    """The KDA core in pure PyTorch (the reference): sample keys and values, weigh the samples by
    softmax(q·k / √d) per head.

    Args:
        query: [N, Lq, M, D] projected queries, per head.
        key: [N, S, M, D] projected keys, or None: the keys are the values (sampled once).
        value: [N, S, M, D] projected values of all levels, flattened and concatenated (S = sum H_l·W_l).
        spatial_shapes: long [L, 2], (H_l, W_l) per level.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y) in [0, 1] of each level.
        level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from ``spatial_shapes``.

    Returns:
        output [N, Lq, M·D] and the attention weights [N, Lq, M, L, P] (softmax over L·P).
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = level_sizes(spatial_shapes, level_shapes)
    # Keys and values share the sampling locations: sample them in one grid_sample per level.
    maps = value if key is None else torch.cat([key, value], dim=-1)
    c = maps.shape[-1]
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, level in enumerate(maps.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        # [N, H*W, M, C] -> [N*M, C, H, W]
        kv = level.permute(0, 2, 3, 1).reshape(n * m, c, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(kv, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, C, Lq, L*P]
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    sampled_key, sampled_value = (sampled, sampled) if key is None else sampled.split(d, dim=1)
    q = query.permute(0, 2, 3, 1).reshape(n * m, d, lq)  # [N*M, D, Lq]
    scores = torch.einsum("bdql,bdq->bql", sampled_key, q) / math.sqrt(d)  # [N*M, Lq, L*P]
    weights = scores.softmax(-1)
    out = torch.einsum("bdql,bql->bdq", sampled_value, weights)  # [N*M, D, Lq]
    out = out.reshape(n, m * d, lq).transpose(1, 2).contiguous()
    weights = weights.view(n, m, lq, n_levels, n_points).transpose(1, 2)
    return out, weights


def kda(
    query: Tensor,
    value: Tensor,
    key: Tensor | None,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    level_shapes: LevelShapes | None = None,
) -> tuple[Tensor, Tensor]:
    """Dispatch to the compiled op when it is available, else to the PyTorch reference (same shapes as
    `key_aware_deform_attn`)."""
    from sdetr.detector import ops  # the op's package loads (and may build) the library

    if ops.use_compiled_kda(value):
        out, weights = torch.ops.sdetr.kda(
            query, value, key, spatial_shapes, level_start_index, sampling_locations
        )
        return out, weights
    return key_aware_deform_attn(query, key, value, spatial_shapes, sampling_locations, level_shapes)


class KeyAwareDeformAttn(nn.Module):
    """Multi-scale key-aware deformable attention; a drop-in replacement of `MSDeformAttn`.

    Parameters (the official names): ``sampling_offsets``, ``value_proj``, ``key_proj`` (only with
    ``proj_key``), ``query_proj``, ``output_proj``; no ``attention_weights`` layer.

    Args:
        d_model: channels C.
        n_levels: feature levels L.
        n_heads: attention heads M (C must be divisible by M).
        n_points: sampling points P per head and level.
        proj_key: keys from their own projection (``key_proj``); False: the keys are the projected values.
        same_loc: one set of P offsets per head, used on every level; False: offsets per level.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        proj_key: bool = False,
        same_loc: bool = False,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.proj_key = proj_key
        self.same_loc = same_loc
        offset_levels = 1 if same_loc else n_levels
        self.sampling_offsets = Float32Linear(d_model, n_heads * offset_levels * n_points * 2)
        self.value_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model) if proj_key else None
        self.query_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        offset_levels = 1 if self.same_loc else self.n_levels
        init_sampling_offsets(self.sampling_offsets, self.n_heads, offset_levels, self.n_points)
        for lin in (self.value_proj, self.key_proj, self.query_proj, self.output_proj):
            if lin is not None:
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
        level_shapes: LevelShapes | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [N, Lq, C] (with its position embedding added).
            reference_points: [N, Lq, L, 2] normalised (x, y), or [N, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, C] the tokens keys and values are made from.
            input_spatial_shapes: long [L, 2]
            input_level_start_index: long [L]
            input_padding_mask: bool [N, S], True at padding (those keys and values are zeroed).
            level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from the tensor.

        Returns:
            output [N, Lq, C], sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P]
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        m, d = self.n_heads, self.d_model // self.n_heads
        value = self.value_proj(input_flatten)
        key = self.key_proj(input_flatten) if self.key_proj is not None else None
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
            if key is not None:
                key = key.masked_fill(input_padding_mask[..., None], 0.0)
        if self.same_loc:
            offsets = self.sampling_offsets(query).view(n, lq, m, 1, self.n_points, 2)
            offsets = offsets.expand(-1, -1, -1, self.n_levels, -1, -1)
        else:
            offsets = self.sampling_offsets(query).view(n, lq, m, self.n_levels, self.n_points, 2)
        locations = sampling_locations(reference_points, offsets, input_spatial_shapes)
        out, weights = kda(
            self.query_proj(query).view(n, lq, m, d),
            value.view(n, s, m, d),
            None if key is None else key.view(n, s, m, d),
            input_spatial_shapes,
            input_level_start_index,
            locations,
            level_shapes,
        )
        return self.output_proj(out), locations, weights
