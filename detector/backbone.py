"""Backbones (ResNet-18/34/50, Swin-T) returning strides 8/16/32, joined with the position encoding.

`build_backbone` returns a `Joiner` = ``nn.Sequential(Backbone, PositionEmbeddingSine)`` so that the
detector's parameters are named ``backbone.0.body.*`` as in the official checkpoints.

Weights (``model.backbone_weights``):
  * ``none``: random initialisation;
  * ``imagenet``: torchvision's ImageNet weights (downloaded, or read from the torch hub cache);
  * a path: an SCRL checkpoint (``online_network_state_dict`` with ``encoder.*`` keys, as the official
    ``--scrl_pretrained_path``) or a backbone state_dict with torchvision or official names, optionally
    wrapped in ``model``/``state_dict`` or prefixed ``backbone.0.body.`` (a whole detector checkpoint).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from sdetr.detector.checkpoint import read_checkpoint
from sdetr.detector.config import ModelConfig
from sdetr.detector.errors import CheckpointError, ConfigError
from sdetr.detector.position_encoding import PositionEmbeddingSine, build_position_encoding
from sdetr.detector.swin import SwinTransformer, swin_t, translate_torchvision_swin

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50")
BACKBONES = (*RESNETS, "swin_t")
NORMS = ("frozen_bn", "bn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, nothing trains).

    As in DETR, ``eps`` is added before the rsqrt (torchvision's old version lacked it, which gives NaNs
    for channels with zero variance). ``num_batches_tracked`` of a BatchNorm checkpoint is dropped on load.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]"""
        # One multiply-add per element, with the per-channel scale folded beforehand.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


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


# -- ResNet ----------------------------------------------------------------------------------------
def build_resnet(name: str, norm: str = "frozen_bn", dilation: bool = False, freeze_early: bool = True):
    """A torchvision ResNet (random init) returning layer2/3/4 as "0", "1", "2".

    Returns:
        (body, strides, num_channels)
    """
    norm_layer = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}[norm]
    try:
        net = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer
        )
    except NotImplementedError as exc:  # BasicBlock (resnet18/34) cannot dilate
        raise ConfigError(f"model.dilation: not supported by {name} ({exc})") from None
    if freeze_early:
        # The official rule: only parameters of layer2..4 train (the stem and layer1 stay as pretrained).
        for pname, param in net.named_parameters():
            if not any(k in pname for k in ("layer2", "layer3", "layer4")):
                param.requires_grad_(False)

    stride = _module_stride(net.conv1) * _module_stride(net.maxpool)
    strides, channels = [], []
    for i in range(1, 5):
        layer = getattr(net, f"layer{i}")
        stride *= _module_stride(layer)
        if i >= 2:
            strides.append(stride)
            channels.append([m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels)
    body = IntermediateLayerGetter(net, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
    return body, strides, channels


def _module_stride(module: nn.Module) -> int:
    """Largest stride of the convolutions/pooling in ``module`` (a dilated layer has stride 1)."""
    strides = [1]
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            s = m.stride
            strides.append(s[0] if isinstance(s, tuple) else s)
    return max(strides)


# -- weights ---------------------------------------------------------------------------------------
_IMAGENET_WEIGHTS = {
    # The official repo used torchvision's pretrained=True, i.e. the V1 weights.
    "resnet18": lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": lambda: torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": lambda: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "swin_t": lambda: torchvision.models.Swin_T_Weights.IMAGENET1K_V1,
}

_SCRL_ENCODER = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

# Checkpoint keys with no counterpart in the detection backbone (classification heads, Swin's final
# norm and the classification Swin's precomputed attn_mask buffers): dropped without complaint.
_IGNORED = re.compile(r"^(fc|head|norm)\.|\.attn_mask$")
# Model keys that a pretraining checkpoint legitimately lacks: Swin's detection output norms.
_MAY_BE_MISSING = re.compile(r"^norm\d+\.|\.num_batches_tracked$")


def load_imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``name``, renamed for our body; CheckpointError when offline."""
    weights = _IMAGENET_WEIGHTS[name]()
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket/SSL errors, a truncated cache file...
        file = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"backbone_weights 'imagenet': cannot get {name}'s ImageNet weights from {weights.url} "
            f"(no network? {type(exc).__name__}: {exc}). Download that file on a machine with internet "
            f"and set model.backbone_weights=/path/to/{file} "
            f"(or put it in {torch.hub.get_dir()}/checkpoints/)"
        ) from None
    return translate_torchvision_swin(state_dict) if name == "swin_t" else state_dict


def read_backbone_weights(path: str | Path, name: str) -> dict[str, Tensor]:
    """The backbone state_dict of the local file ``path``, with the names of ``name``'s body."""
    try:
        # The project's one reading policy: CPU, weights only (plus the official args Namespace).
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"model.backbone_weights: {exc}") from None
    return extract_backbone_state_dict(ckpt, name, str(path))


def extract_backbone_state_dict(ckpt: Any, name: str, source: str) -> dict[str, Tensor]:
    """Find the backbone weights in a loaded checkpoint and give them our body's names."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"backbone_weights {source!r}: expected a dict of tensors, got {type(ckpt).__name__}"
        )
    if "online_network_state_dict" in ckpt:  # SCRL
        if name not in RESNETS:
            raise CheckpointError(
                f"backbone_weights {source!r}: an SCRL (ResNet) checkpoint, but backbone is {name}"
            )
        state_dict = {}
        for key, value in ckpt["online_network_state_dict"].items():
            if not key.startswith("encoder."):  # projector / predictor heads
                continue
            index, rest = key[len("encoder.") :].split(".", 1)
            if index not in _SCRL_ENCODER:
                raise CheckpointError(f"backbone_weights {source!r}: unexpected SCRL encoder key {key!r}")
            state_dict[f"{_SCRL_ENCODER[index]}.{rest}"] = value
        return state_dict

    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    state_dict = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state_dict:
        raise CheckpointError(f"backbone_weights {source!r}: no tensors found (keys: {_preview(ckpt)})")
    for prefix in ("module.", "backbone.0.body."):  # DDP wrapper; a whole detector checkpoint
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if name == "swin_t" and any(k.startswith("features.") for k in state_dict):
        state_dict = translate_torchvision_swin(state_dict)
    return state_dict


def load_backbone_weights(body: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``body``, failing loudly on anything but the expected gaps.

    Classification-only keys (`_IGNORED`) are dropped, and Swin's detection output norms may be absent;
    any other missing or unexpected key, or a shape mismatch, raises a CheckpointError listing them.
    """
    state_dict = {k: v for k, v in state_dict.items() if not _IGNORED.search(k)}
    own = body.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    result = body.load_state_dict(state_dict, strict=False) if not mismatched else None
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_preview(mismatched)}")
    else:
        missing = [k for k in result.missing_keys if not _MAY_BE_MISSING.search(k)]
        if missing:
            problems.append(f"missing keys: {_preview(missing)}")
        if result.unexpected_keys:
            problems.append(f"unexpected keys: {_preview(result.unexpected_keys)}")
    if problems:
        raise CheckpointError(
            f"backbone_weights {source!r} does not fit the backbone: " + "; ".join(problems)
        )
    loaded = len(state_dict)
    log.info(
        "backbone: loaded %d tensors from %s (%d model keys left at init)",
        loaded,
        source,
        len(result.missing_keys),
    )


def _preview(items, limit: int = 8) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


# -- factory ---------------------------------------------------------------------------------------
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


__all__ = [
    "BACKBONES",
    "Backbone",
    "FrozenBatchNorm2d",
    "Joiner",
    "SwinTransformer",
    "build_backbone",
    "build_resnet",
    "extract_backbone_state_dict",
    "load_backbone_weights",
    "load_imagenet_state_dict",
    "read_backbone_weights",
]
