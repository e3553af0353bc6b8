"""The backbone as the detector sees it: a body (ResNet or Swin-T) returning strides 8/16/32, joined
with the position encoding.

`build_backbone` returns a `Joiner` = ``nn.Sequential(Backbone, PositionEmbeddingSine)`` so that the
detector's parameters are named ``backbone.0.body.*`` as in the official checkpoints. Weights: weights.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.detector.backbones.resnet import RESNETS, build_resnet
from sdetr.detector.backbones.swin import swin_t
from sdetr.detector.backbones.weights import (
    load_backbone_weights,
    load_imagenet_state_dict,
    read_backbone_weights,
)
from sdetr.detector.config import ModelConfig
from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.position_encoding import PositionEmbeddingSine, build_position_encoding

BACKBONES = (*RESNETS, "swin_t")
NORMS = ("frozen_bn", "bn")


class Backbone(nn.Module):
    """A feature extractor ``body`` (images -> ordered dict of maps) plus the masks of its outputs.

    Args:
        body: module mapping [B, 3, H, W] to an ordered ``{name: [B, C_l, H_l, W_l]}``.
        strides: stride of each output level.
        num_channels: channels C_l of each output level.
    """

    def __init__(self, body: nn.Module, strides: list[int], num_channels: list[int]):
        super().__init__()
        self.body = body
        self.strides = list(strides)
        self.num_channels = list(num_channels)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            images: [B, 3, H, W], zero-padded right/bottom.
            mask: bool [B, H, W], True on padding.

        Returns:
            features [B, C_l, H_l, W_l] and their padding masks bool [B, H_l, W_l], one per level.
        """
        features = list(self.body(images).values())
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in features]
        return features, masks


class Joiner(nn.Sequential):
    """``(Backbone, PositionEmbeddingSine)``; a Sequential so parameters are named ``0.body.*``."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """
        Args:
            images: [B, 3, H, W]; mask: bool [B, H, W], True on padding.

        Returns:
            features [B, C_l, H_l, W_l], masks bool [B, H_l, W_l], position encodings
            [B, hidden_dim, H_l, W_l] (in the features' dtype), one per level.
        """
        features, masks = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos


def build_backbone(cfg: ModelConfig) -> Joiner:
    """The backbone + position encoding described by ``cfg`` (weights loaded as ``cfg.backbone_weights``)."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(
            f"model.backbone {cfg.backbone!r}: unknown backbone, valid ones are {', '.join(BACKBONES)}"
        )
    if cfg.backbone_norm not in NORMS:
        raise ConfigError(f"model.backbone_norm {cfg.backbone_norm!r}: must be one of {', '.join(NORMS)}")
    position_embedding = build_position_encoding(cfg)

    if cfg.backbone in RESNETS:
        body, strides, channels = build_resnet(
            cfg.backbone,
            norm=cfg.backbone_norm,
            dilation=cfg.dilation,
            freeze_early=cfg.backbone_freeze_early,
        )
    else:
        if cfg.dilation:
            raise ConfigError(f"model.dilation: not supported by {cfg.backbone} (ResNet-50 only)")
        body = swin_t(
            drop_path_rate=cfg.swin_drop_path_rate,
            out_indices=(1, 2, 3),
            # The official build: patch embedding + first stage frozen (frozen_stages=2), else none.
            frozen_stages=2 if cfg.backbone_freeze_early else -1,
        )
        strides, channels = body.strides, body.out_channels

    weights = cfg.backbone_weights
    if weights == "imagenet":
        load_backbone_weights(body, load_imagenet_state_dict(cfg.backbone), f"imagenet ({cfg.backbone})")
    elif weights != "none":
        load_backbone_weights(body, read_backbone_weights(weights, cfg.backbone), weights)

    return Joiner(Backbone(body, strides, channels), position_embedding)
