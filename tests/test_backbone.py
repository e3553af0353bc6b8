"""Backbones, Swin-T and the sine position encoding (random init, no downloads)."""

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sdetr.detector.backbones.backbone import Joiner, build_backbone
from sdetr.detector.backbones.resnet import FrozenBatchNorm2d
from sdetr.detector.backbones.swin import (
    SwinTransformer,
    SwinTransformerBlock,
    shifted_window_mask,
    swin_t,
)
from sdetr.detector.backbones.weights import (
    load_backbone_weights,
    read_backbone_weights,
    translate_torchvision_swin,
)
from sdetr.detector.config import ModelConfig
from sdetr.detector.errors import CheckpointError, ConfigError
from sdetr.detector.layers.position_encoding import PositionEmbeddingSine, build_position_encoding


def padded_batch():
    """Two images, 3x160x224 and 3x200x130, zero-padded to 200x224 (neither side a multiple of 32 or 7*4)."""
    sizes = [(160, 224), (200, 130)]
    images = torch.zeros(2, 3, 200, 224)
    mask = torch.ones(2, 200, 224, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    return images, mask


def narrow_swin(**kwargs) -> SwinTransformer:
    """A Swin with the Swin-T layout but few channels: same code paths, a fraction of the time."""
    return SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), **kwargs)


def frozen_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


# -- shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, channels",
    [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048]), ("swin_t", [192, 384, 768])],
)
def test_joiner_outputs(name, channels):
    joiner = build_backbone(ModelConfig(backbone=name)).eval()
    assert isinstance(joiner, Joiner)
    assert joiner.strides == [8, 16, 32]
    assert joiner.num_channels == channels
    images, mask = padded_batch()
    with torch.no_grad():
        features, masks, pos = joiner(images, mask)

    # ceil(200 / s) x ceil(224 / s) for both the ResNet convolutions and Swin's padded patching/merging.
    expected_hw = [(25, 28), (13, 14), (7, 7)]
    assert [tuple(f.shape) for f in features] == [(2, c, h, w) for c, (h, w) in zip(channels, expected_hw)]
    assert [tuple(m.shape) for m in masks] == [(2, h, w) for h, w in expected_hw]
    assert [tuple(p.shape) for p in pos] == [(2, 256, h, w) for h, w in expected_hw]
    assert all(m.dtype == torch.bool for m in masks)
    assert all(p.dtype == torch.float32 for p in pos)
    assert all(torch.isfinite(f).all() for f in features)

    # Nearest downsampling of the mask: stride-8 row r is padding iff 8r >= 160 (image 0), column c iff
    # 8c >= 130 (image 1).
    m0 = masks[0]
    assert not m0[0, :20].any() and m0[0, 20:].all()
    assert not m0[1, :, :17].any() and m0[1, :, 17:].all()
    # The detector encodes its extra 4th level with the second element alone.
    assert torch.equal(joiner[1](masks[2]), pos[2])


def test_joiner_state_dict_names():
    joiner = build_backbone(ModelConfig(backbone="resnet18"))
    keys = list(joiner.state_dict())
    # Inside the detector (attribute "backbone") these become backbone.0.body.*, the official names.
    assert all(k.startswith("0.body.") for k in keys)
    assert "0.body.layer4.1.bn2.running_var" in keys
    assert "0.body.fc.weight" not in keys


def test_resnet50_dilation():
    joiner = build_backbone(ModelConfig(backbone="resnet50", dilation=True)).eval()
    assert joiner.strides == [8, 16, 16]
    with torch.no_grad():
        features, _, _ = joiner(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 12), (4, 6), (4, 6)]


# -- freezing --------------------------------------------------------------------------------------
def test_resnet50_frozen_parameters():
    body = build_backbone(ModelConfig(backbone="resnet50"))[0].body
    frozen = frozen_names(body)
    # FrozenBatchNorm2d holds buffers only, so the frozen parameters are the stem and layer1 convolutions.
    assert frozen == {n for n, _ in body.named_parameters() if n.startswith(("conv1.", "layer1."))}
    assert len(frozen) == 1 + 3 * 3 + 1  # conv1, three bottlenecks of 3 convs, one downsample conv
    assert sum(p.numel() for n, p in body.named_parameters() if n in frozen) == 222_400
    assert sum(p.numel() for p in body.parameters() if p.requires_grad) == 23_232_512

    bn_body = build_backbone(ModelConfig(backbone="resnet50", backbone_norm="bn"))[0].body
    assert isinstance(bn_body.bn1, nn.BatchNorm2d)
    assert {"bn1.weight", "layer1.0.bn3.bias", "layer1.0.downsample.1.weight"} <= frozen_names(bn_body)
    assert "layer2.0.bn1.weight" not in frozen_names(bn_body)

    trainable = build_backbone(ModelConfig(backbone="resnet50", backbone_freeze_early=False))[0].body
    assert frozen_names(trainable) == set()


def test_swin_frozen_parameters():
    body = build_backbone(ModelConfig(backbone="swin_t"))[0].body
    frozen = frozen_names(body)
    assert frozen == {n for n, _ in body.named_parameters() if n.startswith(("patch_embed.", "layers.0."))}
    assert "layers.0.downsample.reduction.weight" in frozen
    assert "layers.1.blocks.0.norm1.weight" not in frozen
    assert sum(p.numel() for n, p in body.named_parameters() if n in frozen) == 304_086
    assert sum(p.numel() for p in body.parameters()) == 27_520_506

    trainable = build_backbone(ModelConfig(backbone="swin_t", backbone_freeze_early=False))[0].body
    assert frozen_names(trainable) == set()


# -- FrozenBatchNorm2d -----------------------------------------------------------------------------
def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    bn.num_batches_tracked += 7
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked must be dropped, not reported
    assert "num_batches_tracked" not in frozen.state_dict()
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


# -- Swin ------------------------------------------------------------------------------------------
OFFICIAL_SWIN_T_KEYS = {
    "patch_embed.proj.weight": (96, 3, 4, 4),
    "patch_embed.proj.bias": (96,),
    "patch_embed.norm.weight": (96,),
    "layers.0.blocks.0.norm1.weight": (96,),
    "layers.0.blocks.1.attn.relative_position_bias_table": (169, 3),
    "layers.0.blocks.1.attn.relative_position_index": (49, 49),
    "layers.0.blocks.0.attn.qkv.weight": (288, 96),
    "layers.0.blocks.0.attn.qkv.bias": (288,),
    "layers.0.blocks.0.attn.proj.weight": (96, 96),
    "layers.0.blocks.0.norm2.bias": (96,),
    "layers.0.blocks.0.mlp.fc1.weight": (384, 96),
    "layers.0.blocks.0.mlp.fc2.weight": (96, 384),
    "layers.0.downsample.reduction.weight": (192, 384),
    "layers.0.downsample.norm.weight": (384,),
    "layers.2.blocks.5.attn.relative_position_bias_table": (169, 12),
    "layers.2.downsample.reduction.weight": (768, 1536),
    "layers.3.blocks.1.mlp.fc2.bias": (768,),
    "norm1.weight": (192,),
    "norm2.bias": (384,),
    "norm3.weight": (768,),
}


def test_swin_state_dict_matches_official_names():
    sd = swin_t().state_dict()
    for key, shape in OFFICIAL_SWIN_T_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert not any(k.startswith(("layers.3.downsample", "norm0", "norm.", "head")) for k in sd)
    assert not any("attn_mask" in k for k in sd)
    # 2+2+6+2 blocks of 14 tensors, 3 patch mergings of 3, patch embedding 4, three output norms of 2.
    assert len(sd) == 12 * 14 + 3 * 3 + 4 + 3 * 2


def test_translate_torchvision_swin_keys():
    translated = translate_torchvision_swin(torchvision.models.swin_t().state_dict())
    own = swin_t().state_dict()
    # Only the detection output norms have no torchvision counterpart (head and final norm are dropped).
    assert set(own) - set(translated) == {f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert set(translated) <= set(own)
    assert all(translated[k].shape == own[k].shape for k in translated)


def test_translated_torchvision_swin_computes_the_same():
    # Independent check of our forward pass against torchvision's Swin (a narrow one, to keep it fast), at
    # a size where every stage is larger than a window (there the two agree; see
    # test_shift_kept_when_map_fits_one_window) and not a multiple of it, so the window padding is exercised.
    tv = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[7, 7]
    )
    ours = narrow_swin(out_indices=(0, 1, 2, 3))
    missing, unexpected = ours.load_state_dict(translate_torchvision_swin(tv.state_dict()), strict=False)
    assert unexpected == [] and all(k.startswith("norm") for k in missing)
    x = torch.randn(1, 3, 256, 288)
    with torch.no_grad():
        ours_out = list(ours.eval()(x).values())
        tv_out, y = [], x
        for i, stage in enumerate(tv.eval().features):
            y = stage(y)
            if i % 2 == 1:
                tv_out.append(F.layer_norm(y, y.shape[-1:]).permute(0, 3, 1, 2))  # our norm_i at init
    assert [tuple(o.shape[-2:]) for o in ours_out] == [(64, 72), (32, 36), (16, 18), (8, 9)]
    for a, b in zip(ours_out, tv_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_shifted_window_mask_isolates_wrapped_regions():
    torch.manual_seed(0)
    # A 7x7 map is one window. With the shift of 3, original rows/columns 0-2 wrap around and must not see
    # rows/columns 3-6.
    shifted = SwinTransformerBlock(dim=8, num_heads=2, window_size=7, shift_size=3).eval()
    plain = SwinTransformerBlock(dim=8, num_heads=2, window_size=7, shift_size=0).eval()
    plain.load_state_dict(shifted.state_dict())
    mask = shifted_window_mask(7, 7, 7, 3)
    assert mask.shape == (1, 49, 49)
    x = torch.randn(1, 7, 7, 8)
    x2 = x.clone()
    x2[0, 0, 0] = torch.randn(8)  # (not a constant shift: LayerNorm would cancel it)
    with torch.no_grad():
        d_shift = (shifted(x2, mask) - shifted(x, mask)).abs().sum(-1)[0]
        d_plain = (plain(x2, None) - plain(x, None)).abs().sum(-1)[0]
    assert d_shift[1, 1] > 1e-3  # same region as (0, 0)
    assert d_shift[6, 6] < 1e-6  # other region: masked out
    assert d_shift[0, 5] < 1e-6
    assert d_plain[6, 6] > 1e-3  # without the shift everything shares the window


def test_shift_kept_when_map_fits_one_window():
    # The official block shifts (with the mask) even when the map is a single window; torchvision skips the
    # shift there. Check that ours differs from torchvision exactly in that case.
    torch.manual_seed(0)
    tv_block = torchvision.models.swin_transformer.SwinTransformerBlock(8, 2, [7, 7], [3, 3]).eval()
    ours = SwinTransformerBlock(dim=8, num_heads=2, window_size=7, shift_size=3).eval()
    sd = {
        k.replace("mlp.0", "mlp.fc1").replace("mlp.3", "mlp.fc2"): v.view(49, 49) if "index" in k else v
        for k, v in tv_block.state_dict().items()
    }
    ours.load_state_dict(sd)
    with torch.no_grad():
        x = torch.randn(1, 14, 14, 8)
        torch.testing.assert_close(ours(x, shifted_window_mask(14, 14, 7, 3)), tv_block(x))
        x = torch.randn(1, 7, 7, 8)
        assert not torch.allclose(ours(x, shifted_window_mask(7, 7, 7, 3)), tv_block(x), atol=1e-3)


def test_swin_batch_padding():
    body = narrow_swin().eval()
    images, _ = padded_batch()
    with torch.no_grad():
        batch = list(body(images).values())
        alone_padded = list(body(images[:1]).values())
        alone_unpadded = list(body(images[:1, :, :160, :]).values())
    # Batch elements do not interact (window partitioning keeps images apart)...
    for a, b in zip(batch, alone_padded):
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)
    # ...but, as in the official Swin, padding tokens are attended to: the amount of padding changes the
    # features even where the image is. Deformable DETR's masks only apply after the backbone.
    assert alone_unpadded[2].shape[-2:] == (5, 7)
    assert (alone_unpadded[2][0, :, 0, 0] - batch[2][0, :, 0, 0]).abs().max() > 1e-3


# -- position encoding -----------------------------------------------------------------------------
def test_position_encoding_hand_computed():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000, normalize=True, scale=2 * math.pi)
    mask = torch.tensor([[[False, False, True], [False, False, True]]])  # 2x2 image padded to 2x3
    pos = pe(mask)
    assert pos.shape == (1, 8, 2, 3) and pos.dtype == torch.float32
    assert list(pe.state_dict()) == [] and list(pe.parameters()) == []

    # Valid index i (1-based) of n maps to (i - 0.5) / n * 2pi: pi/2 and 3pi/2.
    # Frequencies: channel pairs share dim_t = 10000^(2*(k//2)/4) = 1, 1, 100, 100.
    def enc(v):
        return [math.sin(v), math.cos(v), math.sin(v / 100), math.cos(v / 100)]

    half, three_half = math.pi / 2, 3 * math.pi / 2
    expected = {
        (0, 0): enc(half) + enc(half),
        (1, 0): enc(three_half) + enc(half),
        (0, 1): enc(half) + enc(three_half),
        (1, 1): enc(three_half) + enc(three_half),
    }
    for (r, c), values in expected.items():
        torch.testing.assert_close(pos[0, :, r, c], torch.tensor(values), atol=1e-5, rtol=0)
    # In the padding column x keeps the row's last count; y (0 valid pixels in that column) is meaningless.
    torch.testing.assert_close(pos[0, 4:, 1, 2], torch.tensor(enc(three_half)), atol=1e-5, rtol=0)
    # Concretely: y = pi/2 gives sin 1, cos 0.
    torch.testing.assert_close(pos[0, :2, 0, 0], torch.tensor([1.0, 0.0]), atol=1e-5, rtol=0)


def test_build_position_encoding():
    pe = build_position_encoding(ModelConfig(hidden_dim=64, position_embedding_scale=1.0))
    assert pe.num_pos_feats == 32 and pe.scale == 1.0 and pe.normalize
    with pytest.raises(ConfigError, match="position_embedding 'learned'"):
        build_position_encoding(ModelConfig(position_embedding="learned"))


# -- configuration errors --------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="resnet101.*resnet18, resnet34, resnet50, swin_t"):
        build_backbone(ModelConfig(backbone="resnet101"))
    with pytest.raises(ConfigError, match="backbone_norm 'gn'"):
        build_backbone(ModelConfig(backbone="resnet18", backbone_norm="gn"))
    with pytest.raises(ConfigError, match="dilation"):
        build_backbone(ModelConfig(backbone="resnet18", dilation=True))
    with pytest.raises(ConfigError, match="dilation"):
        build_backbone(ModelConfig(backbone="swin_t", dilation=True))


# -- weights ---------------------------------------------------------------------------------------
SCRL_MAP = {
    "conv1": "encoder.0",
    "bn1": "encoder.1",
    **{f"layer{i}": f"encoder.{i + 3}" for i in range(1, 5)},
}


def test_load_scrl_checkpoint(tmp_path):
    source = torchvision.models.resnet50()
    with torch.no_grad():
        source.layer4[2].bn3.running_var.uniform_(1, 2)
    encoder = {}
    for key, value in source.state_dict().items():
        top, rest = key.split(".", 1)
        if top in SCRL_MAP:
            encoder[f"{SCRL_MAP[top]}.{rest}"] = value
    encoder["projector.0.weight"] = torch.randn(4, 4)  # SCRL's heads are skipped
    path = tmp_path / "scrl.pth"
    torch.save({"online_network_state_dict": encoder, "epoch": 3}, path)

    body = build_backbone(ModelConfig(backbone="resnet50", backbone_weights=str(path)))[0].body
    torch.testing.assert_close(body.conv1.weight, source.conv1.weight, atol=0, rtol=0)
    torch.testing.assert_close(
        body.layer4[2].bn3.running_var, source.layer4[2].bn3.running_var, atol=0, rtol=0
    )
    torch.testing.assert_close(body.layer1[0].downsample[0].weight, source.layer1[0].downsample[0].weight)
    assert not body.conv1.weight.requires_grad  # loading does not undo the freezing


def test_load_plain_state_dict_and_mismatch(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"model": source.state_dict()}, path)
    body = build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(path)))[0].body
    torch.testing.assert_close(body.layer3[1].conv2.weight, source.layer3[1].conv2.weight, atol=0, rtol=0)

    with pytest.raises(CheckpointError, match=r"r18\.pth.*does not fit.*(shape mismatch|missing keys)"):
        build_backbone(ModelConfig(backbone="resnet50", backbone_weights=str(path)))


def test_load_official_swin_names(tmp_path):
    source, target = narrow_swin(), narrow_swin()
    path = tmp_path / "swin.pth"
    # A whole-detector checkpoint: backbone keys prefixed like the official ones, plus others.
    sd = {f"backbone.0.body.{k}": v for k, v in source.state_dict().items()}
    sd["transformer.level_embed"] = torch.zeros(4, 256)
    torch.save({"model": sd, "epoch": 49}, path)
    load_backbone_weights(target, read_backbone_weights(path, "swin_t"), str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, atol=0, rtol=0)

    # The same weights without one block's tensors: a clear error naming them.
    del sd["backbone.0.body.layers.1.blocks.0.mlp.fc1.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(
        CheckpointError, match=r"swin.pth' does not fit.*missing keys: layers\.1\.blocks\.0\.mlp\.fc1\.weight"
    ):
        load_backbone_weights(target, read_backbone_weights(path, "swin_t"), str(path))


def test_imagenet_swin_via_torchvision(monkeypatch):
    # Stand in for the download: torchvision's swin_t state_dict, translated on load.
    source = torchvision.models.swin_t().state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, **kw: source)
    body = build_backbone(ModelConfig(backbone="swin_t", backbone_weights="imagenet"))[0].body
    torch.testing.assert_close(body.layers[1].blocks[0].mlp.fc2.weight, source["features.3.0.mlp.3.weight"])
    torch.testing.assert_close(body.patch_embed.norm.bias, source["features.0.2.bias"])


def test_checkpoint_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="backbone_weights.*nope.pth.*not found"):
        build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(missing)))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="backbone_weights.*garbage.pth.*not a readable"):
        build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(garbage)))

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match=r"no network.*resnet50-0676ba61\.pth"):
        build_backbone(ModelConfig(backbone="resnet50", backbone_weights="imagenet"))
