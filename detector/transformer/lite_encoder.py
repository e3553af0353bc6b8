"""Lite DETR's interleaved multi-scale encoder (Li et al., CVPR 2023) as the released code builds it.

The flattened pyramid is split into low-level tokens (the finest levels, first in the flattening) and
high-level tokens (the coarsest levels). The encoder runs the layout's schedule (`lite_layout`): in a block
of A layers, the first A - 1 update only the high-level tokens (queries: the high-level tokens; keys and
values: all tokens, with the current high-level ones), and the last takes all tokens as queries. In that
all-token layer the low-level tokens may go through their own narrow feed-forward layer (the code's
``small_expand``: d_model -> d_model -> d_model) while the high-level tokens use the normal one.

Parameter names follow the official ``TransformerEncoder`` / ``DeformableTransformerEncoderLayer``
(``layers.{i}.self_attn``, ``norm1``, ``linear1``..., and ``linear12`` / ``linear22`` / ``norm22`` for the
low-level feed-forward layer). The earlier reading of the paper's text is `lite_paper_encoder`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.common import activation_fn
from sdetr.detector.layers.kda import KeyAwareDeformAttn
from sdetr.detector.layers.ms_deform_attn import LevelShapes, MSDeformAttn, level_sizes
from sdetr.detector.transformer.encoder import encoder_reference_points
from sdetr.detector.transformer.lite_layout import ALL, HIGH, LiteLayout, parse_lite_layout


def check_levels(layout: LiteLayout, n_levels: int) -> None:
    if layout.num_levels != n_levels:
        raise ConfigError(
            f"model.lite_layout {layout.name}: H + L = {layout.num_levels} levels, "
            f"but the model has num_feature_levels={n_levels}"
        )


class LiteEncoderLayer(nn.Module):
    """(Key-aware) deformable attention of some tokens to all tokens, then a feed-forward layer (post-norm).

    Args:
        low_ffn_dim: > 0 gives the layer a second feed-forward layer of this hidden width (``linear12``,
            ``linear22``, ``norm22``) for the first ``low_tokens`` query tokens of each call.
        use_kda, proj_key, same_loc: key-aware attention (else `MSDeformAttn`) and its options.
        other args: as `DeformableEncoderLayer`.
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
        proj_key: bool = False,
        same_loc: bool = False,
        low_ffn_dim: int = 0,
    ):
        super().__init__()
        if use_kda:
            self.self_attn = KeyAwareDeformAttn(d_model, n_levels, n_heads, n_points, proj_key, same_loc)
        else:
            self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.small_expand = low_ffn_dim > 0
        if self.small_expand:
            self.linear12 = nn.Linear(d_model, low_ffn_dim)
            self.activation2 = activation_fn(activation)
            self.dropout22 = nn.Dropout(dropout)
            self.linear22 = nn.Linear(low_ffn_dim, d_model)
            self.dropout32 = nn.Dropout(dropout)
            self.norm22 = nn.LayerNorm(d_model)

    def ffn(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(x))))))

    def ffn_low(self, x: Tensor) -> Tensor:
        return self.norm22(
            x + self.dropout32(self.linear22(self.dropout22(self.activation2(self.linear12(x)))))
        )

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
        low_tokens: int = 0,
    ) -> Tensor:
        """
        Args:
            query: [N, Lq, C] the tokens this layer updates; pos: [N, Lq, C] their position embedding.
            reference_points: [N, Lq, L, 2]
            src: [N, S, C] all tokens (keys and values).
            level_shapes: the (H_l, W_l) as Python ints (`level_sizes`); None: from ``spatial_shapes``.
            low_tokens: the first ``low_tokens`` queries take the low-level feed-forward layer (if any).
        Returns:
            the updated query tokens [N, Lq, C].
        """
        out = self.self_attn(
            query + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, level_shapes
        )[0]
        query = self.norm1(query + self.dropout1(out))
        if self.small_expand and low_tokens > 0:
            return torch.cat([self.ffn_low(query[:, :low_tokens]), self.ffn(query[:, low_tokens:])], 1)
        return self.ffn(query)


class LiteEncoder(nn.Module):
    """The interleaved encoder (official structure); same call and output ``memory`` as `DeformableEncoder`.

    Args:
        layout: a `LiteLayout` (or its name); its level count must equal ``n_levels``.
        low_ffn_dim: hidden width of the low-level tokens' own feed-forward layer in the all-token layers
            (the released configuration: ``d_model``); 0 = none, they share the layer's ``d_ffn`` one.
        other args: as `LiteEncoderLayer`.
    """

    structure = "official"

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
        proj_key: bool = False,
        same_loc: bool = False,
        low_ffn_dim: int = 256,
    ):
        super().__init__()
        self.layout = parse_lite_layout(layout) if isinstance(layout, str) else layout
        check_levels(self.layout, n_levels)
        self.schedule = self.layout.schedule(self.structure)
        self.layers = nn.ModuleList(
            LiteEncoderLayer(
                d_model,
                d_ffn,
                dropout,
                activation,
                n_levels,
                n_heads,
                n_points,
                use_kda,
                proj_key,
                same_loc,
                low_ffn_dim if kind == ALL else 0,
            )
            for kind in self.schedule
        )
        self.num_layers = len(self.layers)
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
        level_shapes: LevelShapes | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            src, pos: [N, S, C] tokens of all levels, finest level first; padding_mask: bool [N, S].
            spatial_shapes: long [L, 2]; level_start_index: long [L]; valid_ratios: [N, L, 2].
            topk_inds, sparse_token_nums, output_proposals: Sparse DETR's; must be None here.
            level_shapes: the (H_l, W_l) as Python ints (`level_sizes`); None: from ``spatial_shapes``.
        Returns:
            {"memory": [N, S, C]}
        """
        if topk_inds is not None or output_proposals is not None:
            raise ValueError("LiteEncoder: token sparsification and encoder aux heads are not supported")
        # Low-level tokens are the first `split` (the finest levels come first in the flattening).
        # Counted from the level sizes (Python ints), not read from level_start_index: no data-dependent
        # value under torch.export.
        level_shapes = level_sizes(spatial_shapes, level_shapes)
        split = sum(h * w for h, w in level_shapes[: self.layout.low_levels])
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, level_shapes)
        args = (spatial_shapes, level_start_index, padding_mask, level_shapes)
        tokens = src
        for kind, layer in zip(self.schedule, self.layers):
            if kind == HIGH:
                high = layer(tokens[:, split:], pos[:, split:], reference_points[:, split:], tokens, *args)
                tokens = torch.cat([tokens[:, :split], high], 1)
            else:
                tokens = layer(tokens, pos, reference_points, tokens, *args, low_tokens=split)
        return {"memory": tokens}
