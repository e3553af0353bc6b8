"""ResNet-18/34/50 bodies returning strides 8/16/32, with the official frozen BatchNorm."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from sdetr.detector.errors import ConfigError

RESNETS = ("resnet18", "resnet34", "resnet50")


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
