"""Multi-scale deformable attention (Zhu et al., Deformable DETR).

`ms_deform_attn` is the single entry point the model calls. Its pure-PyTorch path
(`ms_deform_attn_pytorch`, bilinear `grid_sample` with ``align_corners=False``) is the reference; when
the compiled op from ``csrc/`` is available it is used instead (see `sdetr.detector.ops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.detector.layers.common import Float32Linear

# Per-level (H_l, W_l) as Python ints (symbolic under torch.export), next to the `spatial_shapes` tensor.
LevelShapes = Sequence[tuple[int, int]]


def level_sizes(spatial_shapes: Tensor, level_shapes: LevelShapes | None = None) -> list[tuple[int, int]]:
    """The per-level (H, W) as Python ints: ``level_shapes`` when given (the model passes them, taken from
    the feature maps' ``.shape``, which torch.export and the ONNX exporter treat symbolically), else read
    back from ``spatial_shapes`` (eager callers of the layers; data-dependent under export)."""
    if level_shapes is not None:
        return [(h, w) for h, w in level_shapes]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_shapes: LevelShapes | None = None,
) -> Tensor:
    """Reference implementation.

    Args:
        value: [N, S, M, D] values of all levels, flattened and concatenated (S = sum H_l*W_l).
        spatial_shapes: long [L, 2], (H_l, W_l) per level.
        level_start_index: long [L], offset of each level in S (unused here, kept for the op's signature).
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y) in [0, 1] of each level.
        attention_weights: [N, Lq, M, L, P], softmax-normalised over L*P.
        level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from ``spatial_shapes``.

    Returns:
        [N, Lq, M*D]
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = level_sizes(spatial_shapes, level_shapes)
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


def init_sampling_offsets(linear: nn.Linear, n_heads: int, n_levels: int, n_points: int) -> None:
    """Official init of the offset predictor: zero weights; the bias points head m in direction
    2πm/M (scaled to the unit square's border), its p-th point p + 1 steps out, the same on every level."""
    nn.init.constant_(linear.weight, 0.0)
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    with torch.no_grad():
        linear.bias.copy_(grid.view(-1))


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Where each head samples each level.

    Args:
        reference_points: [N, Lq, L, 2] normalised (x, y), or [N, Lq, L, 4] boxes (cx, cy, w, h).
        offsets: [N, Lq, M, L, P, 2] predicted offsets: pixels of each level for points, fractions of
            the half box per point for boxes.
        spatial_shapes: long [L, 2], (H_l, W_l).
    Returns:
        [N, Lq, M, L, P, 2] normalised (x, y).
    """
    if reference_points.shape[-1] == 2:
        # Offsets are in pixels of each level: normalise by (W, H).
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        # Offsets are relative to the box size: P points spread over half the box.
        n_points = offsets.shape[-2]
        return (
            reference_points[:, :, None, :, None, :2]
            + offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_shapes: LevelShapes | None = None,
) -> Tensor:
    """Dispatch to the compiled op when it is available, else to the PyTorch reference."""
    from sdetr.detector import ops

    if ops.use_compiled(value):
        return torch.ops.sdetr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, level_shapes
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the official parameter names and initialisation.

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
        self.sampling_offsets = Float32Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Float32Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        init_sampling_offsets(self.sampling_offsets, self.n_heads, self.n_levels, self.n_points)
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

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
            query: [N, Lq, C]
            reference_points: [N, Lq, L, 2] normalised (x, y), or [N, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, C]
            input_spatial_shapes: long [L, 2]
            input_level_start_index: long [L]
            input_padding_mask: bool [N, S], True at padding (those values are zeroed).
            level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from the tensor.

        Returns:
            output [N, Lq, C], sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P]
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = sampling_locations(reference_points, offsets, input_spatial_shapes)
        output = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights, level_shapes
        )
        return self.output_proj(output), locations, weights
