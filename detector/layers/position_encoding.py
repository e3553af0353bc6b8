"""Sine position encoding of a padded image batch (Deformable DETR's variant of DETR's).

Each valid pixel gets its row and column index counted inside its own image (padding excluded), so
the encoding of an image does not depend on how much padding the batch added around it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sdetr.detector.config import ModelConfig
from sdetr.detector.errors import ConfigError


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding; no parameters and no buffers.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels (y first, then x).
        temperature: base of the geometric progression of wavelengths.
        normalize: divide the positions by the image's height/width so they lie in (0, scale].
        scale: the range of the normalised positions (2*pi: one period of the slowest frequency).
        center: normalise pixel centres, (i - 0.5) / n (Deformable DETR); False: i / n (DETR).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        center: bool = True,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.center = center

    def forward(self, mask: Tensor) -> Tensor:
        """Encode the valid pixels of each image.

        Args:
            mask: bool [B, H, W], True on padding.

        Returns:
            float32 [B, 2*num_pos_feats, H, W]: ``[sin, cos, sin, cos, ...]`` of y, then the same of x.
        """
        not_mask = ~mask
        # 1-based row/column indices of the valid pixels (padding sits right/bottom, so it never shifts them).
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # Deformable DETR centres each pixel (the -0.5), unlike DETR which normalises the raw counts.
            shift = 0.5 if self.center else 0.0
            y_embed = (y_embed - shift) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - shift) / (x_embed[:, :, -1:] + eps) * self.scale

        # Channel pairs (2i, 2i+1) share the frequency temperature^(-2i/num_pos_feats).
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, num_pos_feats]
        pos_y = y_embed[:, :, :, None] / dim_t
        # Even channels take the sine, odd channels the cosine, interleaved.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )


def build_position_encoding(cfg: ModelConfig) -> PositionEmbeddingSine:
    if cfg.position_embedding not in ("sine", "v2"):  # "v2" is the official alias of "sine"
        raise ConfigError(
            f"model.position_embedding {cfg.position_embedding!r}: unknown position encoding, "
            "the only one implemented is 'sine'"
        )
    if cfg.hidden_dim % 2:
        raise ConfigError(f"model.hidden_dim {cfg.hidden_dim}: must be even (half per axis of the encoding)")
    return PositionEmbeddingSine(cfg.hidden_dim // 2, normalize=True, scale=cfg.position_embedding_scale)
