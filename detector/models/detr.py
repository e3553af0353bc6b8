"""DETR (Carion et al., ECCV 2020): the dense-attention baseline of the Deformable / Sparse DETR tables.

ResNet C5 → 1x1 projection → a post-norm transformer (6 encoder layers of full self-attention over the
C5 tokens, 6 decoder layers over 100 learned queries) → a softmax classifier with a no-object column and
a 3-layer box MLP applied to every decoder layer's (LayerNorm-ed) output. Module names follow the
official code (``backbone.0.body``, ``input_proj``, ``query_embed``, ``transformer.encoder.layers.i``,
``transformer.decoder.layers.i.multihead_attn``, ``transformer.decoder.norm``, ``class_embed``,
``bbox_embed``), so an official checkpoint's keys match. Its losses are in losses/detr_criterion.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.detector.backbones.backbone import build_backbone
from sdetr.detector.config import ModelConfig
from sdetr.detector.layers.common import MLP, activation_fn, clones
from sdetr.detector.layers.position_encoding import PositionEmbeddingSine


class TransformerEncoderLayer(nn.Module):
    """Self-attention (position added to queries and keys) + FFN, post-norm."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str = "relu"
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos: [S, N, C]; padding_mask: bool [N, S] (True = padding) -> [S, N, C]"""
        q = k = src + pos
        attn = self.self_attn(q, k, value=src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, FFN; post-norm."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str = "relu"
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(
        self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """tgt, query_pos: [Q, N, C]; memory, pos: [S, N, C]; padding_mask: bool [N, S] -> [Q, N, C]"""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.multihead_attn(
            tgt + query_pos, memory + pos, value=memory, key_padding_mask=padding_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class TransformerDecoder(nn.Module):
    """Returns every layer's output after the shared final LayerNorm (DETR's return_intermediate)."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """-> [layers, Q, N, C]"""
        out = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, padding_mask)
            out.append(self.norm(tgt))
        return torch.stack(out)


class DETRTransformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.d_model = d_model
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """
        Args:
            src, pos: [N, C, H, W]; mask: bool [N, H, W] (True = padding); query_embed: [Q, C].
        Returns:
            hs [layers, N, Q, C]
        """
        n = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # [S, N, C]
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).expand(-1, n, -1)  # [Q, N, C]
        memory = self.encoder(src, pos, mask)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, mask)
        return hs.transpose(1, 2)


class DETR(nn.Module):
    """``model(images, masks)`` → ``pred_logits`` [N, Q, K+1] (last column: no object), ``pred_boxes``
    [N, Q, 4] (cx, cy, w, h in [0, 1]), ``aux_outputs`` (one dict per earlier decoder layer) and
    ``class_activation = "softmax"`` (tells `PostProcess` to read the logits as DETR's)."""

    def __init__(
        self,
        backbone: nn.Module,
        transformer: DETRTransformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = True,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """images: [N, 3, H, W] normalised, zero-padded; mask: bool [N, H, W], True at padding."""
        features, masks, pos = self.backbone(images, mask)  # DETR uses the last level (C5) only
        hs = self.transformer(self.input_proj(features[-1]), masks[-1], self.query_embed.weight, pos[-1])
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "class_activation": "softmax"}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return out


def build_detr(cfg: ModelConfig) -> DETR:
    """DETR from the model config: ``backbone*`` fields, hidden_dim, nheads, enc_layers, dec_layers,
    dim_feedforward, dropout, num_queries, num_classes, aux_loss. The backbone's C5 output is used."""
    backbone = build_backbone(cfg)
    # DETR's sine encoding normalises i / n, not Deformable DETR's (i - 0.5) / n.
    backbone[1] = PositionEmbeddingSine(
        cfg.hidden_dim // 2, normalize=True, scale=cfg.position_embedding_scale, center=False
    )
    transformer = DETRTransformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
    )
    return DETR(backbone, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss)
