"""Small building blocks shared by the transformers and heads."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def activation_fn(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r} (relu or gelu)")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class Float32Linear(nn.Linear):
    """An `nn.Linear` that computes in fp32 under autocast (same parameters and state_dict keys).

    For the layers that place things: the sampling offsets and attention weights of deformable attention
    (and KDA's offsets). bf16 keeps 8 significant bits (a value rounded by up to 0.4 %), and learning where
    to look suffered: a `mini_*` Sparse DETR trained 300 steps under bf16 autocast ended 12 points of AP50
    below fp32, 5 with these layers and the box heads in fp32 (docs/benchmarks.md, "Demo"). They are a
    fraction of a percent of the FLOPs.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLUs (DETR's box head), of `Float32Linear` layers: in fp32
    under autocast, as box deltas are added to logit-space reference points, where bf16 would round them.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            Float32Linear(i, o) for i, o in zip([input_dim] + dims, dims + [output_dim])
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x
