"""Sparse DETR's scoring network (the official "mask predictor").

It predicts, for every encoder token, how likely the decoder is to attend to it; it is trained on the
binarised decoder attention map (see dam.py) and its top-ρ tokens become the encoder's queries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScoringNetwork(nn.Module):
    """LayerNorm → Linear → GELU, local/global split (the global half averaged over tokens), then an MLP
    256→128→64→1 with GELUs.

    Args:
        in_dim: token channels.
        h_dim: hidden width (the official model uses d_model for both).
    """

    def __init__(self, in_dim: int = 256, h_dim: int = 256):
        super().__init__()
        self.h_dim = h_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, h_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(h_dim, h_dim // 2),
            nn.GELU(),
            nn.Linear(h_dim // 2, h_dim // 4),
            nn.GELU(),
            nn.Linear(h_dim // 4, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, S, C] -> scores [N, S, 1]"""
        z = self.layer1(x)
        local, global_ = z.split(self.h_dim // 2, dim=-1)
        # The official code averages over all tokens, padding included (those were zeroed beforehand).
        global_ = global_.mean(dim=1, keepdim=True).expand(-1, local.shape[1], -1)
        return self.layer2(torch.cat([local, global_], dim=-1))
