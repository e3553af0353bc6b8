"""Lite DETR's interleaved encoder as this project first read the paper's text
(``lite_structure=paper_text``), kept for ablation against the released code's structure (`lite_encoder`).

Each of the K blocks

1. updates the high-level tokens A times: queries are the high-level tokens, keys and values all tokens
   (the current high-level tokens and the block's low-level tokens);
2. then updates the low-level tokens once: queries are the low-level tokens only, keys and values the
   updated high-level tokens and the (not yet updated) low-level tokens.

So ``H3L1-(3+1)x2`` has 8 layers here (6 in the released code, whose "+1" layer takes all tokens as
queries). The low-level step's feed-forward layer may be narrower. Parameters:
``blocks.{k}.high.{a}`` and ``blocks.{k}.low``, each a `LiteEncoderLayer`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.detector.layers.ms_deform_attn import LevelShapes, level_sizes
from sdetr.detector.transformer.encoder import encoder_reference_points
from sdetr.detector.transformer.lite_encoder import LiteEncoderLayer, check_levels
from sdetr.detector.transformer.lite_layout import LiteLayout, parse_lite_layout


class LiteBlock(nn.Module):
    """One block: ``high`` (A layers for the high-level tokens), then ``low`` (one layer)."""

    def __init__(self, high: list[LiteEncoderLayer], low: LiteEncoderLayer):
        super().__init__()
        self.high = nn.ModuleList(high)
        self.low = low


class PaperTextLiteEncoder(nn.Module):
    """The paper-text interleaved encoder; same call and output ``memory`` as `DeformableEncoder`.

    Args:
        layout: a `LiteLayout` (or its name); its level count must equal ``n_levels``.
        low_ffn_dim: hidden width of the low-level step's feed-forward layer (0 = ``d_ffn``).
        other args: as `LiteEncoderLayer`.
    """

    structure = "paper_text"

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
        proj_key: bool = True,
        same_loc: bool = False,
        low_ffn_dim: int = 0,
    ):
        super().__init__()
        self.layout = parse_lite_layout(layout) if isinstance(layout, str) else layout
        check_levels(self.layout, n_levels)
        self.schedule = self.layout.schedule(self.structure)

        def layer(ffn: int) -> LiteEncoderLayer:
            return LiteEncoderLayer(
                d_model, ffn, dropout, activation, n_levels, n_heads, n_points, use_kda, proj_key, same_loc
            )

        self.blocks = nn.ModuleList(
            LiteBlock([layer(d_ffn) for _ in range(self.layout.high_updates)], layer(low_ffn_dim or d_ffn))
            for _ in range(self.layout.blocks)
        )
        self.num_layers = len(self.schedule)
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
        level_shapes: LevelShapes | None = None,
    ) -> dict[str, Tensor]:
        """As `LiteEncoder.forward`: src, pos [N, S, C] finest level first -> {"memory": [N, S, C]}."""
        if topk_inds is not None or output_proposals is not None:
            raise ValueError("LiteEncoder: token sparsification and encoder aux heads are not supported")
        level_shapes = level_sizes(spatial_shapes, level_shapes)
        split = sum(h * w for h, w in level_shapes[: self.layout.low_levels])
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, level_shapes)
        ref_low, ref_high = reference_points[:, :split], reference_points[:, split:]
        pos_low, pos_high = pos[:, :split], pos[:, split:]
        low, high = src[:, :split], src[:, split:]
        args = (spatial_shapes, level_start_index, padding_mask, level_shapes)
        for block in self.blocks:
            for layer in block.high:
                high = layer(high, pos_high, ref_high, torch.cat([low, high], 1), *args)
            low = block.low(low, pos_low, ref_low, torch.cat([low, high], 1), *args)
        return {"memory": torch.cat([low, high], 1)}
