"""Deformable DETR decoder: self-attention, deformable cross-attention, FFN, iterative box refinement."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.detector.layers.common import activation_fn, clones, inverse_sigmoid
from sdetr.detector.layers.kda import KeyAwareDeformAttn
from sdetr.detector.layers.ms_deform_attn import LevelShapes, MSDeformAttn


class DeformableDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention (key-aware with ``use_kda``, as Lite DETR's released
    code: keys = values, offsets per level), FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        use_kda: bool = False,
    ):
        super().__init__()
        attn = KeyAwareDeformAttn if use_kda else MSDeformAttn
        self.cross_attn = attn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Tensor | None,
        level_shapes: LevelShapes | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            tgt, query_pos: [N, Q, C]
            reference_points: [N, Q, L, 2 or 4]
            memory: [N, S, C]
        Returns:
            tgt [N, Q, C], sampling locations [N, Q, M, L, P, 2], attention weights [N, Q, M, L, P]
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        out, locations, weights = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
            level_shapes,
        )
        tgt = self.norm1(tgt + self.dropout1(out))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(ffn))
        return tgt, locations, weights


class DeformableDecoder(nn.Module):
    """Decoder returning every layer's output.

    With iterative box refinement the detector attaches its `bbox_embed` list here: each layer's head
    refines the reference boxes for the next layer (detached, as in the official code).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor | None,
        level_shapes: LevelShapes | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            tgt, query_pos: [N, Q, C]; reference_points: [N, Q, 2] points or [N, Q, 4] boxes (sigmoid space).
            valid_ratios: [N, L, 2]
            level_shapes: the (H_l, W_l) as Python ints (`level_sizes`); None: from ``spatial_shapes``.
        Returns:
            hs [layers, N, Q, C], references [layers, N, Q, 2|4] (the reference fed to the next layer),
            sampling_locations [N, layers, Q, M, L, P, 2], attn_weights [N, layers, Q, M, L, P]
        """
        output = tgt
        hs, references, locations_all, weights_all = [], [], [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ratios = valid_ratios[:, None]
            reference_input = reference_points[:, :, None] * ratios
            output, locations, weights = layer(
                output,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                level_shapes,
            )
            locations_all.append(locations)
            weights_all.append(weights)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    refined = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    )
                    refined = refined.sigmoid()
                reference_points = refined.detach()
            hs.append(output)
            references.append(reference_points)
        return {
            "hs": torch.stack(hs),
            "references": torch.stack(references),
            "sampling_locations": torch.stack(locations_all, dim=1),
            "attn_weights": torch.stack(weights_all, dim=1),
        }
