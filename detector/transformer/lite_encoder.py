"""Lite DETR's interleaved multi-scale encoder (Li et al., CVPR 2023).

The flattened pyramid is split into low-level tokens (the finest levels, most of the tokens) and
high-level tokens (the coarsest levels). The encoder is K blocks; each block

1. updates the high-level tokens A times: queries are the high-level tokens, keys and values all
   tokens (the current high-level tokens and the block's low-level tokens);
2. then updates the low-level tokens once: queries are the low-level tokens, keys and values the
   updated high-level tokens and the (not yet updated) low-level tokens.

Every step is a deformable (or, with ``use_kda``, key-aware deformable) attention layer over all L
levels followed by a feed-forward layer; the low-level step may use a narrower feed-forward layer.
Layouts are named as in the paper: ``H3L1-(3+1)x2`` = 3 high-level and 1 low-level feature levels,
A = 3, K = 2 (8 layers in all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.common import activation_fn
from sdetr.detector.layers.kda import KeyAwareDeformAttn
from sdetr.detector.layers.ms_deform_attn import MSDeformAttn
from sdetr.detector.transformer.encoder import encoder_reference_points

_LAYOUT = re.compile(r"^H(\d+)L(\d+)-\((\d+)\+1\)[x×](\d+)$")


@dataclass(frozen=True)
class LiteLayout:
    """The shape of an interleaved encoder."""

    high_levels: int  # the coarsest levels, updated A times per block
    low_levels: int  # the finest levels, updated once per block
    high_updates: int  # A
    blocks: int  # K

    @property
    def name(self) -> str:
        return f"H{self.high_levels}L{self.low_levels}-({self.high_updates}+1)x{self.blocks}"

    @property
    def num_layers(self) -> int:
        return self.blocks * (self.high_updates + 1)

    @property
    def num_levels(self) -> int:
        return self.high_levels + self.low_levels


def parse_lite_layout(text: str) -> LiteLayout:
    """``"H3L1-(3+1)x2"`` -> LiteLayout(3, 1, 3, 2); a ConfigError naming the expected form otherwise."""
    m = _LAYOUT.match(text.strip().replace(" ", ""))
    if not m:
        raise ConfigError(
            f"model.lite_layout {text!r}: expected H<high levels>L<low levels>-(<A>+1)x<K>, e.g. H3L1-(3+1)x2"
        )
    layout = LiteLayout(*(int(g) for g in m.groups()))
    if min(layout.high_levels, layout.low_levels, layout.high_updates, layout.blocks) < 1:
        raise ConfigError(f"model.lite_layout {text!r}: every number must be at least 1")
    return layout


class LiteEncoderLayer(nn.Module):
    """(Key-aware) deformable attention of some tokens to all tokens, then a feed-forward layer (post-norm).

    Parameter names follow `DeformableEncoderLayer` (``self_attn``, ``norm1``, ``linear1``...).
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        use_kda: bool = True,
    ):
        super().__init__()
        attn = KeyAwareDeformAttn if use_kda else MSDeformAttn
        self.self_attn = attn(d_model, n_levels, n_heads, n_points)
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
    ) -> Tensor:
        """
        Args:
            query: [N, Lq, C] the tokens this step updates; pos: [N, Lq, C] their position embedding.
            reference_points: [N, Lq, L, 2]
            src: [N, S, C] all tokens (keys and values).
        Returns:
            the updated query tokens [N, Lq, C].
        """
        out = self.self_attn(
            query + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )[0]
        query = self.norm1(query + self.dropout1(out))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(query))))
        return self.norm2(query + self.dropout3(ffn))


class LiteBlock(nn.Module):
    """One block: ``high`` (A layers for the high-level tokens), then ``low`` (one layer)."""

    def __init__(self, high: list[LiteEncoderLayer], low: LiteEncoderLayer):
        super().__init__()
        self.high = nn.ModuleList(high)
        self.low = low


class LiteEncoder(nn.Module):
    """The interleaved encoder; same call and output ``memory`` as `DeformableEncoder` (dense mode).

    Args:
        layout: a `LiteLayout` (or its name); its level count must equal ``n_levels``.
        low_ffn_dim: hidden width of the low-level step's feed-forward layer (0 = ``d_ffn``).
        other args: as `DeformableEncoderLayer`.
    """

    def __init__(
        self,
        layout: LiteLayout | str,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        use_kda: bool = True,
        low_ffn_dim: int = 0,
    ):
        super().__init__()
        self.layout = parse_lite_layout(layout) if isinstance(layout, str) else layout
        if self.layout.num_levels != n_levels:
            raise ConfigError(
                f"model.lite_layout {self.layout.name}: H + L = {self.layout.num_levels} levels, "
                f"but the model has num_feature_levels={n_levels}"
            )

        def layer(ffn: int) -> LiteEncoderLayer:
            return LiteEncoderLayer(d_model, ffn, dropout, activation, n_levels, n_heads, n_points, use_kda)

        self.blocks = nn.ModuleList(
            LiteBlock([layer(d_ffn) for _ in range(self.layout.high_updates)], layer(low_ffn_dim or d_ffn))
            for _ in range(self.layout.blocks)
        )
        self.num_layers = self.layout.num_layers
        # Sparse DETR's encoder auxiliary heads do not apply (the detector checks this flag).
        self.aux_heads = False

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
    ) -> dict[str, Tensor]:
        """
        Args:
            src, pos: [N, S, C] tokens of all levels, finest level first; padding_mask: bool [N, S].
            spatial_shapes: long [L, 2]; level_start_index: long [L]; valid_ratios: [N, L, 2].
            topk_inds, sparse_token_nums, output_proposals: Sparse DETR's; must be None here.
        Returns:
            {"memory": [N, S, C]}
        """
        if topk_inds is not None or output_proposals is not None:
            raise ValueError("LiteEncoder: token sparsification and encoder aux heads are not supported")
        # Low-level tokens are the first `split` (the finest levels come first in the flattening).
        split = int(level_start_index[self.layout.low_levels])
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        ref_low, ref_high = reference_points[:, :split], reference_points[:, split:]
        pos_low, pos_high = pos[:, :split], pos[:, split:]
        low, high = src[:, :split], src[:, split:]
        args = (spatial_shapes, level_start_index, padding_mask)
        for block in self.blocks:
            for layer in block.high:
                high = layer(high, pos_high, ref_high, torch.cat([low, high], 1), *args)
            low = block.low(low, pos_low, ref_low, torch.cat([low, high], 1), *args)
        return {"memory": torch.cat([low, high], 1)}
