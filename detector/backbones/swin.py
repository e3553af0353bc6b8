"""Swin Transformer backbone for detection (Liu et al. 2021), as Sparse DETR's Swin-T.

Module, parameter and buffer names are exactly those of the official detection Swin
(``models/swin_transformer/swin_transformer.py`` of kakaobrain/sparse-detr), so its checkpoints load
strictly: ``patch_embed.{proj,norm}``, ``layers.N.blocks.M.{norm1,attn,norm2,mlp.fc1,mlp.fc2}``,
``layers.N.downsample.{reduction,norm}`` and one output LayerNorm ``normI`` per returned stage I.

Like the official code, a feature map whose size is not a multiple of the window is padded with zeros
(after ``norm1``) to the next multiple; those padded tokens, and the tokens of the batch's image
padding, take part in attention like real ones. Only the cyclic shift is masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging
from torchvision.ops import StochasticDepth


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches, linearly projected.

    Input [B, 3, H, W] -> [B, embed_dim, ceil(H/patch), ceil(W/patch)] (right/bottom zero padding).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class Mlp(nn.Module):
    """Token-wise feed-forward network: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B*nW, window_size**2, C], windows in raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: [B*nW, window_size**2, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """Additive attention mask of the cyclically shifted windows of an ``h`` x ``w`` map (window multiples).

    After rolling by ``-shift_size`` the last window row/column mixes tokens that were far apart (the
    wrapped-around border and the rest); tokens from different such regions must not attend to each other.

    Returns:
        float [nW, window_size**2, window_size**2]: 0 within a region, -100 across (the official value).
    """
    region = torch.zeros((1, h, w, 1), device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in slices:
        for ws in slices:
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window_size).squeeze(-1)  # [nW, N]
    diff = region[:, None, :] - region[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: channels C.
        window_size: side of the square window.
        num_heads: heads (C must be divisible by them).
        qkv_bias: learn a bias for the query/key/value projection.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5

        # One bias per head for each of the (2*Ws-1)^2 possible relative offsets inside a window.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # For each (query, key) pair of a window, the row of the table holding its offset. Persistent, as in
        # the official code, so official checkpoints carry it and load strictly.
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        )
        coords = coords.flatten(1)  # [2, N]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # [N, N, 2] >= 0
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1])

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            x: [B*nW, N, C] tokens of each window (N = window_size**2).
            mask: [nW, N, N] additive mask (shifted windows) or None.

        Returns:
            [B*nW, N, C]
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B*nW, heads, N, head_dim]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each a residual branch with stochastic depth.

    Args:
        dim: channels C.
        num_heads: attention heads.
        window_size: window side.
        shift_size: cyclic shift (0 for W-MSA, window_size // 2 for SW-MSA).
        mlp_ratio: MLP hidden width / C.
        qkv_bias: learn a bias for the query/key/value projection.
        drop_path: probability of dropping each residual branch per sample.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias)
        # torchvision's "row" stochastic depth is timm's DropPath (per-sample, rescaled by 1/keep).
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """
        Args:
            x: [B, H, W, C]
            attn_mask: `shifted_window_mask` of the padded map (used only when shift_size > 0).

        Returns:
            [B, H, W, C]
        """
        b, h, w, c = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x)
        # Pad after the norm, as the official code: padded tokens are exact zeros.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift_size > 0:
            # Unlike torchvision, keep shifting even when the map fits in one window (the official behaviour).
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None
        windows = self.attn(window_partition(x, ws), mask=attn_mask)
        x = window_reverse(windows, ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :h, :w, :]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then optional patch merging.

    Args:
        dim: channels C of the stage.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: window side.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: learn a bias for the query/key/value projection.
        drop_path: stochastic-depth probability of each block.
        downsample: end with a 2x2 patch merging (-> 2C channels, half resolution).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        # torchvision's PatchMerging has the official names (reduction, norm) and the same 2x2 gather
        # order and odd-size padding, on the [B, H, W, C] layout used here.
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, H, W, C] -> (stage output [B, H, W, C], next stage's input [B, ceil(H/2), ceil(W/2), 2C])."""
        h, w = x.shape[1:3]
        ws = self.window_size
        # The mask depends only on the padded size, so all shifted blocks of the stage share it.
        attn_mask = shifted_window_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift_size, x.device)
        attn_mask = attn_mask.to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask)
        x_down = self.downsample(x) if self.downsample is not None else x
        return x, x_down


class SwinTransformer(nn.Module):
    """Hierarchical Swin backbone returning the stages in ``out_indices``, each through its own LayerNorm.

    Args:
        embed_dim: channels of the first stage (doubling at every stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: learn a bias for the query/key/value projections.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all blocks.
        patch_size: side of the input patches (stride of the first stage).
        patch_norm: LayerNorm after the patch projection.
        out_indices: stages to return (0-based); stage i has stride patch_size * 2**i.
        frozen_stages: -1 trains everything; 0 freezes the patch embedding; k >= 2 also freezes stages
            0..k-2 (with their patch merging), as the official ``_freeze_stages``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.2,
        patch_size: int = 4,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (1, 2, 3),
        frozen_stages: int = -1,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, patch_norm=patch_norm)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    self.num_features[i],
                    depth,
                    num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=drop_path[first : first + depth],
                    downsample=i < self.num_layers - 1,
                )
            )
        # Fresh LayerNorms on the returned stages (not in ImageNet checkpoints: they start at identity).
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        self.strides = [patch_size * 2**i for i in self.out_indices]
        self.out_channels = [self.num_features[i] for i in self.out_indices]
        self.apply(_init_weights)
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        # The official code also puts these modules in eval mode here, which the trainer's model.train()
        # undoes; freezing is therefore only requires_grad (Swin has no batch statistics to protect).
        if self.frozen_stages >= 0:
            self.patch_embed.requires_grad_(False)
        for i in range(max(0, self.frozen_stages - 1)):
            self.layers[i].requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """[B, 3, H, W] -> {"0": [B, C_0, H_0, W_0], ...} for the stages in ``out_indices``, in order.

        H_i = ceil(H / (patch_size * 2**i)) (each patch merging rounds odd sizes up).
        """
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # [B, H/4, W/4, C]
        outs: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x_out, x = layer(x)
            if i in self.out_indices:
                x_out = getattr(self, f"norm{i}")(x_out)
                outs[str(len(outs))] = x_out.permute(0, 3, 1, 2).contiguous()
        return outs


def _init_weights(m: nn.Module) -> None:
    # The official initialisation: truncated-normal linear weights, zero biases, identity LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def swin_t(
    drop_path_rate: float = 0.2, out_indices: Sequence[int] = (1, 2, 3), frozen_stages: int = -1
) -> SwinTransformer:
    """Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7 (the official swin_tiny_patch4_window7)."""
    return SwinTransformer(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        drop_path_rate=drop_path_rate,
        out_indices=out_indices,
        frozen_stages=frozen_stages,
    )
