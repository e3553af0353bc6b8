"""The detector: backbone → input projections → deformable transformer → detection heads.

One class covers Deformable DETR (± box refinement, ± two-stage), Efficient DETR (top-k queries,
class-specific proposal head), Sparse DETR (ρ, scoring network, encoder auxiliary heads) and Lite DETR
(the interleaved encoder of transformer/lite_encoder.py); detector/build.py builds it from a config. Head
lists and their aliases under `transformer.decoder` / `transformer.encoder` are laid out exactly as in
the official code, so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.common import MLP, inverse_sigmoid
from sdetr.detector.transformer.deformable_transformer import DeformableTransformer


class SparseDETR(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
        use_enc_aux_loss: bool = False,
    ):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.use_enc_aux_loss = use_enc_aux_loss

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        projections = []
        in_channels = backbone.num_channels[-1]
        for lvl in range(num_feature_levels):
            if lvl < len(backbone.num_channels):
                conv = nn.Conv2d(backbone.num_channels[lvl], hidden_dim, kernel_size=1)
            else:
                # Extra coarser levels: stride-2 3x3 convs, the first on C5, then on the previous one.
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1)
                in_channels = hidden_dim
            projections.append(nn.Sequential(conv, nn.GroupNorm(32, hidden_dim)))
        self.input_proj = nn.ModuleList(projections)
        self.backbone = backbone

        bias_value = -math.log((1 - 0.01) / 0.01)
        nn.init.constant_(class_embed.bias, bias_value)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0.0)

        # Head order: [decoder 0..n-1, two-stage proposals, encoder 0..m-2] (official).
        num_dec = transformer.decoder.num_layers
        num_enc_aux = transformer.encoder.num_layers - 1 if use_enc_aux_loss else 0
        num_pred = num_dec + int(two_stage) + num_enc_aux
        if with_box_refine or use_enc_aux_loss:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        # Deformable DETR attaches the box heads for refinement; Sparse DETR attaches them whenever
        # two-stage is on. Doing both covers every official configuration.
        if with_box_refine or two_stage:
            transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        if use_enc_aux_loss:
            transformer.encoder.aux_heads = True
            transformer.encoder.class_embed = self.class_embed[-num_enc_aux:]
            transformer.encoder.bbox_embed = self.bbox_embed[-num_enc_aux:]
            for head in transformer.encoder.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    # -- dynamic sparsification ---------------------------------------------------------------------
    @property
    def rho(self) -> float:
        return self.transformer.rho

    def set_rho(self, rho: float) -> None:
        """Change the encoder keeping ratio of a trained Sparse DETR (dynamic sparsification)."""
        if self.transformer.enc_mask_predictor is None:
            raise ConfigError("this model was built without a scoring network (rho=0); rho cannot be changed")
        if not 0.0 < rho <= 1.0:
            raise ConfigError(f"rho must be in (0, 1], got {rho}")
        self.transformer.rho = float(rho)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """
        Args:
            images: [N, 3, H, W] normalised, zero-padded; mask: bool [N, H, W], True at padding.
        Returns:
            the official output dict: pred_logits [N, Q, K], pred_boxes [N, Q, 4] (cx, cy, w, h in [0, 1]),
            aux_outputs, enc_outputs, aux_outputs_enc, backbone_mask_prediction, sparse_token_nums,
            sampling_locations_{enc,dec}, attn_weights_{enc,dec}, spatial_shapes, level_start_index,
            mask_flatten, backbone_topk_proposals (the keys that apply to the configuration).
        """
        features, masks, pos = self.backbone(images, mask)
        srcs = [self.input_proj[lvl](feat) for lvl, feat in enumerate(features)]
        masks, pos = list(masks), list(pos)
        for lvl in range(len(features), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            level_mask = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))

        query_embed = None if self.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query_embed)

        classes, coords = [], []
        for lvl in range(t["hs"].shape[0]):
            reference = t["init_reference"] if lvl == 0 else t["inter_references"][lvl - 1]
            reference = inverse_sigmoid(reference)
            delta = self.bbox_embed[lvl](t["hs"][lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            classes.append(self.class_embed[lvl](t["hs"][lvl]))
            coords.append(coord.sigmoid())

        out = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(classes[:-1], coords[:-1])
            ]
        if self.two_stage:
            out["enc_outputs"] = {
                "pred_logits": t["enc_outputs_class"],
                "pred_boxes": t["enc_outputs_coord_unact"].sigmoid(),
            }
        if self.use_enc_aux_loss:
            out["aux_outputs_enc"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(t["enc_aux_class"], t["enc_aux_boxes"])
            ]
        for key in (
            "backbone_mask_prediction",
            "backbone_topk_proposals",
            "sparse_token_nums",
            "sampling_locations_enc",
            "attn_weights_enc",
            "sampling_locations_dec",
            "attn_weights_dec",
            "spatial_shapes",
            "level_start_index",
            "mask_flatten",
        ):
            if key in t:
                out[key] = t[key]
        return out
