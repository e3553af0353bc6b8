"""The deformable transformer of Deformable DETR, Efficient DETR and Sparse DETR.

Flattens the multi-scale maps into tokens, selects the tokens the sparse encoder updates (scoring
network, top-ρ per image), runs the encoder, makes two-stage proposals and the decoder's queries
(learned, two-stage, or Efficient DETR's top-k memory), and runs the decoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sdetr.detector.layers.kda import KeyAwareDeformAttn
from sdetr.detector.layers.ms_deform_attn import LevelShapes, MSDeformAttn, level_sizes
from sdetr.detector.transformer.decoder import DeformableDecoder, DeformableDecoderLayer
from sdetr.detector.transformer.encoder import DeformableEncoder, DeformableEncoderLayer, gather_tokens
from sdetr.detector.transformer.scoring import ScoringNetwork


def valid_ratio(mask: Tensor) -> Tensor:
    """mask [N, H, W] (True = padding) -> [N, 2] (w, h) fraction of the map that is image."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def keep_counts(valid_tokens: Tensor, rho: float) -> Tensor:
    """Tokens kept per image: int(valid·ρ)+1 as the official code, never more than the valid tokens."""
    return torch.minimum((valid_tokens * rho).int() + 1, valid_tokens.int()).clamp(min=1)


def topk_bound(num_tokens: int, rho: float) -> int:
    """The batch's top-k count from the token count alone (no data-dependent value), used under
    torch.export: at least every image's `keep_counts` (those use float32, official; ``int(S·ρ) + 2``
    covers its rounding), at most S. The encoder writes back only each image's own count of rows, so the
    extra row or two change nothing but the work; eager runs keep the official max over the images."""
    return torch.sym_min(torch.sym_int(num_tokens * rho) + 2, num_tokens)


class DeformableTransformer(nn.Module):
    """
    Args mirror the official flags: `two_stage`, `eff_query_init`, `eff_specific_head`, `rho` (0 = the
    dense Deformable DETR encoder; > 0 builds the scoring network, and `rho` can then be changed at
    any time, e.g. at inference) and `use_enc_aux_loss`. `encoder` replaces the Deformable DETR encoder
    with another one taking the same call (Lite DETR's `LiteEncoder`; dense mode only); `dec_use_kda`
    makes the decoder's cross-attention key-aware (Lite DETR).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        eff_query_init: bool = False,
        eff_specific_head: bool = False,
        rho: float = 0.0,
        use_enc_aux_loss: bool = False,
        encoder: nn.Module | None = None,
        dec_use_kda: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head
        self.rho = rho
        self.use_enc_aux_loss = use_enc_aux_loss

        self.enc_mask_predictor = ScoringNetwork(d_model, d_model) if rho > 0 else None
        if encoder is None:
            enc_layer = DeformableEncoderLayer(
                d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
            )
            encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        self.encoder = encoder
        dec_layer = DeformableDecoderLayer(
            d_model,
            dim_feedforward,
            dropout,
            activation,
            num_feature_levels,
            nhead,
            dec_n_points,
            dec_use_kda,
        )
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            pos_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, pos_dim)
            self.pos_trans_norm = nn.LayerNorm(pos_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    @property
    def sparse(self) -> bool:
        return self.enc_mask_predictor is not None and self.rho > 0

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (MSDeformAttn, KeyAwareDeformAttn)):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine embedding of unsigmoided boxes: [N, K, 4] -> [N, K, 2*d_model]."""
        num_pos_feats = self.d_model // 2
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * (2 * math.pi)
        pos = pos[:, :, :, None] / dim_t
        pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4)
        return pos.flatten(2)

    def encoder_output_proposals(
        self,
        memory: Tensor,
        padding_mask: Tensor,
        spatial_shapes: Tensor,
        process_output: bool = True,
        level_shapes: LevelShapes | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One proposal box per token: its cell centre, side 0.05·2^level (Deformable DETR, appendix A.4).

        Returns:
            memory projected by enc_output + enc_output_norm (padding and out-of-range tokens zeroed
            first) [N, S, C], proposals in logit space (inf where invalid) [N, S, 4], valid tokens [N].
        """
        n = memory.shape[0]
        proposals = []
        start = 0
        for lvl, (h, w) in enumerate(level_sizes(spatial_shapes, level_shapes)):
            mask = padding_mask[:, start : start + h * w].view(n, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            # = torch.linspace(0, h - 1, h) (official), exactly; arange takes a symbolic size under export.
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(n, 1, 1, 2)
            grid = (grid[None].expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        in_range = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask[..., None], float("inf"))
        proposals = proposals.masked_fill(~in_range, float("inf"))
        output = memory
        if process_output:
            output = output.masked_fill(padding_mask[..., None], 0.0).masked_fill(~in_range, 0.0)
            output = self.enc_output_norm(self.enc_output(output))
        return output, proposals, (~padding_mask).sum(-1)

    def forward(
        self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed: Tensor | None
    ) -> dict[str, Tensor | list[Tensor] | None]:
        """
        Args:
            srcs: per level [N, C, H_l, W_l]; masks: per level bool [N, H_l, W_l]; pos_embeds like srcs.
            query_embed: [Q, 2C] learned queries (single-stage) or None (two-stage).
        """
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        lvl_pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )
        # The level sizes as Python ints (symbolic under torch.export) for everything that needs them as
        # sizes, and as a tensor for the attention ops' arguments and the sampling offsets' scale.
        level_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        spatial_shapes = torch.tensor(
            [v for hw in level_shapes for v in hw], dtype=torch.long, device=src_flatten.device
        ).view(-1, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        out: dict[str, Tensor | list[Tensor] | None] = {
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "mask_flatten": mask_flatten,
        }

        # Token selection for the sparse encoder.
        sparse = self.sparse
        topk_inds = sparse_token_nums = backbone_proposals = None
        if sparse or self.use_enc_aux_loss:
            backbone_memory, backbone_proposals, valid_tokens = self.encoder_output_proposals(
                src_flatten + lvl_pos, mask_flatten, spatial_shapes, sparse, level_shapes
            )
        if sparse:
            sparse_token_nums = keep_counts(valid_tokens, self.rho)
            if torch.compiler.is_exporting():
                k = topk_bound(src_flatten.shape[1], self.rho)
            else:
                k = min(int(sparse_token_nums.max()), src_flatten.shape[1])
            scores = self.enc_mask_predictor(backbone_memory).squeeze(-1)
            # The returned prediction keeps the official padding fill (the DAM loss sees it); selection
            # uses -inf so padding is never chosen.
            out["backbone_mask_prediction"] = scores.masked_fill(mask_flatten, scores.min())
            topk_inds = torch.topk(scores.masked_fill(mask_flatten, float("-inf")), k, dim=1)[1]
            out["backbone_topk_proposals"] = topk_inds
            out["sparse_token_nums"] = sparse_token_nums

        enc = self.encoder(
            src_flatten,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            pos=lvl_pos,
            padding_mask=mask_flatten,
            topk_inds=topk_inds,
            sparse_token_nums=sparse_token_nums,
            output_proposals=backbone_proposals if self.use_enc_aux_loss else None,
            level_shapes=level_shapes,
        )
        memory = enc["memory"]
        if "sampling_locations" in enc:  # the Deformable DETR encoder's; not Lite DETR's
            out["sampling_locations_enc"] = enc["sampling_locations"]
            out["attn_weights_enc"] = enc["attn_weights"]
        if self.use_enc_aux_loss:
            out["enc_aux_class"] = enc["aux_class"]
            out["enc_aux_boxes"] = enc["aux_boxes"]

        # Decoder queries.
        n, _, c = memory.shape
        if self.two_stage:
            output_memory, output_proposals, _ = self.encoder_output_proposals(
                memory, mask_flatten, spatial_shapes, level_shapes=level_shapes
            )
            head = self.decoder.num_layers
            enc_class = self.decoder.class_embed[head](output_memory)
            enc_coord_unact = output_proposals + self.decoder.bbox_embed[head](output_memory)
            out["enc_outputs_class"] = enc_class
            out["enc_outputs_coord_unact"] = enc_coord_unact
            # Efficient DETR's class-specific head ranks by the best class; plain two-stage by class 0.
            fg_score = enc_class.max(-1).values if self.eff_specific_head else enc_class[..., 0]
            topk = torch.sym_min(self.two_stage_num_proposals, fg_score.shape[1])
            topk_proposals = torch.topk(fg_score, topk, dim=1)[1]
            topk_coords_unact = gather_tokens(enc_coord_unact, topk_proposals).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact)))
            if self.eff_query_init:
                tgt = gather_tokens(memory, topk_proposals)
                query_pos = pos_trans_out
            else:
                query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        dec = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask_flatten,
            level_shapes,
        )
        out["hs"] = dec["hs"]
        out["init_reference"] = reference_points
        out["inter_references"] = dec["references"]
        out["sampling_locations_dec"] = dec["sampling_locations"]
        out["attn_weights_dec"] = dec["attn_weights"]
        out["memory"] = memory
        return out
