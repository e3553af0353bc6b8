"""Factories for every architecture: the model, its criterion and its post-processor.

``model.arch`` picks the family: the Deformable DETR family (Deformable / Efficient / Sparse / Lite DETR,
models/deformable_detr.py), DETR (models/detr.py) or Faster R-CNN + FPN (models/faster_rcnn.py).
"""

from __future__ import annotations

from torch import nn

from sdetr.detector.backbones.backbone import build_backbone
from sdetr.detector.config import LossConfig, ModelConfig
from sdetr.detector.errors import ConfigError
from sdetr.detector.losses.criterion import SetCriterion, build_weight_dict
from sdetr.detector.losses.detr_criterion import build_detr_criterion
from sdetr.detector.losses.matcher import build_matcher
from sdetr.detector.models.deformable_detr import SparseDETR
from sdetr.detector.models.detr import build_detr
from sdetr.detector.models.faster_rcnn import ModelLossCriterion, build_faster_rcnn
from sdetr.detector.transformer.deformable_transformer import DeformableTransformer
from sdetr.detector.transformer.lite_encoder import LiteEncoder
from sdetr.detector.transformer.lite_layout import STRUCTURES, parse_lite_layout
from sdetr.detector.transformer.lite_paper_encoder import PaperTextLiteEncoder

ARCHS = ("deformable_detr", "detr", "faster_rcnn")
ENCODERS = ("deformable", "lite")


def validate_model_config(cfg: ModelConfig) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"model config: {msg}")

    if cfg.arch not in ARCHS:
        raise bad(f"arch {cfg.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.encoder not in ENCODERS:
        raise bad(f"encoder {cfg.encoder!r} is not one of {', '.join(ENCODERS)}")
    if cfg.arch != "deformable_detr":
        # The Deformable DETR family's options mean nothing to DETR and Faster R-CNN: refuse them.
        flags = ("with_box_refine", "two_stage", "eff_query_init", "eff_specific_head", "use_enc_aux_loss")
        for flag in (*flags, "use_kda", "dec_use_kda", "proj_key", "same_loc"):
            if getattr(cfg, flag):
                raise bad(f"{flag}=true applies to arch=deformable_detr only (arch is {cfg.arch})")
        if cfg.rho > 0 or cfg.encoder != "deformable":
            raise bad(f"rho and encoder=lite apply to arch=deformable_detr only (arch is {cfg.arch})")
        if cfg.hidden_dim < 1 or cfg.num_classes < 1 or cfg.num_queries < 1:
            raise bad("hidden_dim, num_classes and num_queries must be >= 1")
        if cfg.arch == "detr":
            if cfg.hidden_dim % cfg.nheads != 0:
                raise bad(f"hidden_dim ({cfg.hidden_dim}) must be divisible by nheads ({cfg.nheads})")
            if cfg.enc_layers < 0 or cfg.dec_layers < 1:
                raise bad("DETR needs enc_layers >= 0 and dec_layers >= 1")
        elif not cfg.backbone.startswith("resnet") or cfg.dilation:
            raise bad(f"arch=faster_rcnn needs an undilated ResNet backbone, got {cfg.backbone}")
        return
    if cfg.encoder == "lite":
        layout = parse_lite_layout(cfg.lite_layout)
        if layout.num_levels != cfg.num_feature_levels:
            raise bad(
                f"lite_layout {cfg.lite_layout} uses {layout.num_levels} levels (H + L) but "
                f"num_feature_levels is {cfg.num_feature_levels}"
            )
        if cfg.lite_structure not in STRUCTURES:
            raise bad(f"lite_structure {cfg.lite_structure!r} is not one of {', '.join(STRUCTURES)}")
        if cfg.rho > 0 or cfg.use_enc_aux_loss:
            raise bad("encoder=lite does not combine with Sparse DETR's rho > 0 or use_enc_aux_loss")
        if cfg.lite_low_ffn_dim < 0:
            raise bad(
                f"lite_low_ffn_dim must be >= 0 (0 = the structure's default), got {cfg.lite_low_ffn_dim}"
            )
        for flag in ("proj_key", "same_loc"):
            if getattr(cfg, flag) and not cfg.use_kda:
                raise bad(
                    f"{flag}=true is an option of the encoder's key-aware attention: it needs use_kda=true"
                )
    else:
        for flag in ("use_kda", "dec_use_kda", "proj_key", "same_loc"):
            if getattr(cfg, flag):
                raise bad(f"{flag}=true needs encoder=lite (key-aware attention is part of Lite DETR)")
    if not 0.0 <= cfg.rho <= 1.0:
        raise bad(f"rho must be in [0, 1] (0 = dense encoder), got {cfg.rho}")
    if cfg.rho > 0 and not cfg.two_stage:
        raise bad(
            "rho > 0 (Sparse DETR) needs two_stage=true: the scoring network reads the two-stage projection"
        )
    for flag in ("eff_query_init", "eff_specific_head"):
        if getattr(cfg, flag) and not cfg.two_stage:
            raise bad(f"{flag}=true needs two_stage=true")
    if cfg.hidden_dim % 32 != 0:
        raise bad(
            "hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projections), "
            f"got {cfg.hidden_dim}"
        )
    if cfg.hidden_dim % cfg.nheads != 0:
        raise bad(f"hidden_dim ({cfg.hidden_dim}) must be divisible by nheads ({cfg.nheads})")
    if cfg.num_feature_levels < 3:
        raise bad(f"num_feature_levels must be >= 3 (C3-C5 plus extra levels), got {cfg.num_feature_levels}")
    if cfg.enc_layers < 1 or cfg.dec_layers < 1:
        raise bad("enc_layers and dec_layers must be >= 1")
    if cfg.num_classes < 1 or cfg.num_queries < 1:
        raise bad("num_classes and num_queries must be >= 1")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The detector ``cfg`` describes. Every arch is called as ``model(images, masks)``; see
    `SparseDETR.forward`, `sdetr.detector.models.detr.DETR` and `sdetr.detector.models.faster_rcnn`."""
    validate_model_config(cfg)
    if cfg.arch == "detr":
        return build_detr(cfg)
    if cfg.arch == "faster_rcnn":
        return build_faster_rcnn(cfg)
    backbone = build_backbone(cfg)
    encoder = None
    if cfg.encoder == "lite":
        official = cfg.lite_structure == "official"
        if official:
            # The released small_expand: the low-level tokens' own FFN, hidden_dim wide by default.
            low_ffn_dim = (cfg.lite_low_ffn_dim or cfg.hidden_dim) if cfg.small_expand else 0
        else:
            low_ffn_dim = cfg.lite_low_ffn_dim
        encoder = (LiteEncoder if official else PaperTextLiteEncoder)(
            cfg.lite_layout,
            d_model=cfg.hidden_dim,
            d_ffn=cfg.dim_feedforward,
            dropout=cfg.dropout,
            activation="relu",
            n_levels=cfg.num_feature_levels,
            n_heads=cfg.nheads,
            n_points=cfg.enc_n_points,
            use_kda=cfg.use_kda,
            proj_key=cfg.proj_key,
            same_loc=cfg.same_loc,
            low_ffn_dim=low_ffn_dim,
        )
    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        activation="relu",
        num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points,
        enc_n_points=cfg.enc_n_points,
        two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries,
        eff_query_init=cfg.eff_query_init,
        eff_specific_head=cfg.eff_specific_head,
        rho=cfg.rho,
        use_enc_aux_loss=cfg.use_enc_aux_loss,
        encoder=encoder,
        dec_use_kda=cfg.dec_use_kda,
    )
    return SparseDETR(
        backbone,
        transformer,
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        num_feature_levels=cfg.num_feature_levels,
        aux_loss=cfg.aux_loss,
        with_box_refine=cfg.with_box_refine,
        two_stage=cfg.two_stage,
        use_enc_aux_loss=cfg.use_enc_aux_loss,
    )


def count_parameters(
    model: nn.Module, trainable_only: bool = True, include_enc_aux_heads: bool = True
) -> int:
    """Unique parameters (shared heads counted once). The papers count Sparse DETR without the encoder
    auxiliary heads, which are only used for training. Works for every arch."""
    skip: set[int] = set()
    encoder = getattr(getattr(model, "transformer", None), "encoder", None)
    if not include_enc_aux_heads and getattr(encoder, "aux_heads", False):
        for lst in (encoder.class_embed, encoder.bbox_embed):
            skip.update(id(p) for p in lst.parameters())
    return sum(
        p.numel() for p in model.parameters() if id(p) not in skip and (p.requires_grad or not trainable_only)
    )


def build_criterion(model_cfg: ModelConfig, loss_cfg: LossConfig) -> nn.Module:
    """The criterion of ``model_cfg.arch``: `SetCriterion` for the Deformable DETR family,
    DETR's softmax criterion, or the pass-through of Faster R-CNN's own losses. Each has
    ``criterion(outputs, targets) -> loss dict`` and ``weighted_total(loss_dict)``."""
    if model_cfg.arch == "detr":
        return build_detr_criterion(model_cfg, loss_cfg)
    if model_cfg.arch == "faster_rcnn":
        return ModelLossCriterion()
    losses = ["labels", "boxes", "cardinality", "corr"]
    if model_cfg.rho > 0:
        losses.append("mask_prediction")
    return SetCriterion(
        num_classes=model_cfg.num_classes,
        matcher=build_matcher(loss_cfg),
        weight_dict=build_weight_dict(model_cfg, loss_cfg),
        losses=losses,
        focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma,
        eff_specific_head=model_cfg.eff_specific_head,
    )
