"""Forward/backward of every preset, and the sparse encoder's token selection."""

from __future__ import annotations

import pytest
import torch

from sdetr.detector.build import build_model
from sdetr.detector.errors import ConfigError
from sdetr.detector.presets import get_preset, preset_names
from sdetr.detector.transformer.deformable_transformer import DeformableTransformer


def padded_batch(sizes, seed=0):
    """Random images of different sizes, zero-padded into one batch with a padding mask."""
    g = torch.Generator().manual_seed(seed)
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g)
        mask[i, :hi, :wi] = False
    return images, mask


# DETR and Faster R-CNN have their own outputs; test_baselines.py covers them.
DEFORMABLE_FAMILY = [p for p in preset_names() if get_preset(p).model.arch == "deformable_detr"]


@pytest.mark.parametrize("preset", DEFORMABLE_FAMILY)
def test_forward_backward_every_preset(preset):
    cfg = get_preset(preset).model
    # Fewer queries keep the CPU test quick; the architecture is otherwise the preset's.
    cfg.num_queries = 20
    model = build_model(cfg)
    images, mask = padded_batch([(96, 128), (72, 100)])
    out = model(images, mask)
    n_classes = cfg.num_classes
    assert out["pred_logits"].shape == (2, 20, n_classes)
    assert out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert ("enc_outputs" in out) == cfg.two_stage
    assert ("aux_outputs_enc" in out) == cfg.use_enc_aux_loss
    assert ("backbone_mask_prediction" in out) == (cfg.rho > 0)
    loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].sum()
    for aux in out.get("aux_outputs_enc", []):
        loss = loss + aux["pred_boxes"].sum() + aux["pred_logits"].mean()
    if "backbone_mask_prediction" in out:
        loss = loss + out["backbone_mask_prediction"].mean()
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    # Most parameters get a gradient from this loss (the decoder's last-layer-only paths aside).
    assert len(with_grad) > 0.7 * len(trainable)
    assert all(torch.isfinite(p.grad).all() for p in with_grad)


def tiny_transformer(rho: float) -> DeformableTransformer:
    torch.manual_seed(0)
    t = DeformableTransformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=1,
        dim_feedforward=64,
        dropout=0.0,
        num_feature_levels=2,
        two_stage=True,
        two_stage_num_proposals=10,
        rho=rho,
    )
    # The two-stage head normally comes from the detector; a small one suffices here.
    from sdetr.detector.layers.common import MLP

    t.decoder.class_embed = torch.nn.ModuleList([torch.nn.Linear(32, 3) for _ in range(2)])
    t.decoder.bbox_embed = torch.nn.ModuleList([MLP(32, 32, 4, 3) for _ in range(2)])
    return t.eval()


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 16), (6, 8)]
    srcs = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    pos = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    masks = []
    for h, w in shapes:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, h // 2 :, :] = True  # the second image is padded at the bottom
        m[1, :, w * 3 // 4 :] = True
        masks.append(m)
    return srcs, masks, pos


def flat_src(srcs):
    return torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)


def test_sparse_encoder_leaves_unselected_tokens_untouched():
    t = tiny_transformer(rho=0.2)
    srcs, masks, pos = transformer_inputs()
    with torch.no_grad():
        out = t(srcs, masks, pos, None)
    src = flat_src(srcs)
    changed = (out["memory"] - src).abs().amax(-1) > 0
    keep = out["sparse_token_nums"]
    valid = (~out["mask_flatten"]).sum(1)
    assert keep.tolist() == [int(v * 0.2) + 1 for v in valid.tolist()]
    for i in range(2):
        selected = set(out["backbone_topk_proposals"][i, : keep[i]].tolist())
        assert set(changed[i].nonzero().flatten().tolist()) == selected
        assert not (set(out["mask_flatten"][i].nonzero().flatten().tolist()) & selected)


def test_sparse_at_rho_1_equals_dense_encoder():
    t = tiny_transformer(rho=1.0)
    srcs, masks, pos = transformer_inputs()
    with torch.no_grad():
        sparse = t(srcs, masks, pos, None)
        t.rho = 0.0  # same weights, dense encoder: every token is a query
        dense = t(srcs, masks, pos, None)
    valid = ~sparse["mask_flatten"]
    torch.testing.assert_close(sparse["memory"][valid], dense["memory"][valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse["sparse_token_nums"], valid.sum(1))


def test_changing_rho_changes_updated_tokens():
    model = build_model(get_preset("tiny_sparse_detr_rho_0.1").model).eval()
    images, mask = padded_batch([(128, 160), (128, 96)])
    counts = {}
    for rho in (0.1, 0.3, 0.6):
        model.set_rho(rho)
        with torch.no_grad():
            out = model(images, mask)
        valid = (~out["mask_flatten"]).sum(1)
        assert out["sparse_token_nums"].tolist() == [int(v * rho) + 1 for v in valid.tolist()]
        counts[rho] = int(out["sparse_token_nums"].sum())
        assert out["aux_outputs_enc"][0]["pred_logits"].shape[1] == int(out["sparse_token_nums"].max())
    assert counts[0.1] < counts[0.3] < counts[0.6]


def test_set_rho_rejects_bad_values():
    model = build_model(get_preset("tiny_sparse_detr_rho_0.1").model)
    with pytest.raises(ConfigError, match="rho"):
        model.set_rho(1.5)
    dense = build_model(get_preset("tiny_deformable_detr").model)
    with pytest.raises(ConfigError, match="scoring network"):
        dense.set_rho(0.2)


@pytest.mark.parametrize(
    "override, message",
    [
        (["rho=0.2", "two_stage=false", "eff_query_init=false", "eff_specific_head=false"], "two_stage"),
        (["rho=1.5"], "rho"),
        (["hidden_dim=48"], "multiple of 32"),
        (["backbone=resnet51"], "resnet51"),
    ],
)
def test_bad_model_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(get_preset("tiny_sparse_detr_rho_0.1", override).model)
