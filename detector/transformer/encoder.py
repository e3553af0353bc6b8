"""Deformable DETR encoder with Sparse DETR's token sparsification.

In the dense mode (Deformable DETR) every token is a query. In the sparse mode (Sparse DETR) only the
top-k tokens chosen by the scoring network are queries and get updated; every token stays a key/value,
and the updated rows are scattered back into the full token tensor after each layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.detector.layers.common import activation_fn, clones
from sdetr.detector.layers.ms_deform_attn import LevelShapes, MSDeformAttn, level_sizes


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (or, sparse, attention of the kept tokens to all tokens) + FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        query: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
        level_shapes: LevelShapes | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query: [N, Lq, C] tokens to update (all tokens when dense, the kept ones when sparse).
            pos: [N, Lq, C] their position + level embedding.
            reference_points: [N, Lq, L, 2]
            src: [N, S, C] all tokens (keys/values).
        Returns:
            updated query [N, Lq, C], sampling locations, attention weights.
        """
        out, locations, weights = self.self_attn(
            query + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, level_shapes
        )
        query = self.norm1(query + self.dropout1(out))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(query))))
        query = self.norm2(query + self.dropout3(ffn))
        return query, locations, weights


def encoder_reference_points(
    spatial_shapes: Tensor, valid_ratios: Tensor, level_shapes: LevelShapes | None = None
) -> Tensor:
    """Each token's own centre, normalised to the valid (unpadded) area, seen from every level.

    Args:
        spatial_shapes: long [L, 2]
        valid_ratios: [N, L, 2] (w, h) fraction of each level that is not padding.
        level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from ``spatial_shapes``.
    Returns:
        [N, S, L, 2]
    """
    points = []
    device = valid_ratios.device
    for lvl, (h, w) in enumerate(level_sizes(spatial_shapes, level_shapes)):
        # = torch.linspace(0.5, h - 0.5, h) (official), exactly (step 1); arange takes a symbolic size
        # under torch.export.
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [N, S, ...], index long [N, k] -> [N, k, ...]"""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


class DeformableEncoder(nn.Module):
    """A stack of encoder layers; optional auxiliary detection heads on the kept tokens.

    `class_embed` / `bbox_embed` are attached by the detector (they alias its head lists, as in the
    official code, so the state_dict keys match).
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.aux_heads = False
        self.class_embed: nn.ModuleList | None = None
        self.bbox_embed: nn.ModuleList | None = None

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Tensor,
        padding_mask: Tensor,
        topk_inds: Tensor | None = None,
        sparse_token_nums: Tensor | None = None,
        output_proposals: Tensor | None = None,
        level_shapes: LevelShapes | None = None,
    ) -> dict[str, Tensor | list[Tensor]]:
        """
        Args:
            src, pos: [N, S, C]; padding_mask: bool [N, S].
            topk_inds: long [N, k] kept tokens per image (sparse mode) or None (dense).
            sparse_token_nums: long [N], how many of each image's k indices are really kept.
            output_proposals: [N, S, 4] unsigmoided proposal boxes (needed for the aux heads).
            level_shapes: the (H_l, W_l) as Python ints (see `level_sizes`); None: from ``spatial_shapes``.
        Returns:
            dict with memory [N, S, C], sampling_locations [N, layers, Lq, M, L, P, 2],
            attn_weights [N, layers, Lq, M, L, P], and aux_class / aux_boxes lists (aux heads).
        """
        output = src
        level_shapes = level_sizes(spatial_shapes, level_shapes)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, level_shapes)
        sparse = topk_inds is not None
        if sparse:
            reference_points = gather_tokens(reference_points, topk_inds)
            pos = gather_tokens(pos, topk_inds)
            query = gather_tokens(output, topk_inds)
            if output_proposals is not None:
                output_proposals = gather_tokens(output_proposals, topk_inds)
            scatter_index = topk_inds[..., None].expand(-1, -1, src.shape[-1])
            if sparse_token_nums is not None:
                # Rows beyond an image's own keep count are computed (the batch shares k) but not
                # written back: they point to duplicates or padding for that image.
                k = topk_inds.shape[1]
                keep = torch.arange(k, device=src.device)[None] < sparse_token_nums[:, None]
        attn_args = (spatial_shapes, level_start_index, padding_mask, level_shapes)
        locations_all, weights_all, aux_class, aux_boxes = [], [], [], []
        for lid, layer in enumerate(self.layers):
            if sparse:
                query, locations, weights = layer(query, pos, reference_points, output, *attn_args)
                if sparse_token_nums is None:
                    output = output.scatter(1, scatter_index, query)
                else:
                    current = torch.gather(output, 1, scatter_index)
                    output = output.scatter(1, scatter_index, torch.where(keep[..., None], query, current))
            else:
                output, locations, weights = layer(output, pos, reference_points, output, *attn_args)
                query = output
            locations_all.append(locations)
            weights_all.append(weights)
            if self.aux_heads and lid < self.num_layers - 1:
                aux_class.append(self.class_embed[lid](query))
                aux_boxes.append((output_proposals + self.bbox_embed[lid](query)).sigmoid())
        result: dict[str, Tensor | list[Tensor]] = {
            "memory": output,
            "sampling_locations": torch.stack(locations_all, dim=1),
            "attn_weights": torch.stack(weights_all, dim=1),
        }
        if self.aux_heads:
            result["aux_class"] = aux_class
            result["aux_boxes"] = aux_boxes
        return result
