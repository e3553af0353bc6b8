"""The DETR and Faster R-CNN + FPN baselines: published parameter counts, official key trees, losses,
post-processing, FLOP counting, and forward / backward through the common detector interface."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from sdetr.detector.build import build_criterion, build_model, count_parameters
from sdetr.detector.cost import count_flops
from sdetr.detector.errors import ConfigError
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.losses.detr_criterion import DETRMatcher, DETRSetCriterion
from sdetr.detector.models.detr import DETR
from sdetr.detector.models.faster_rcnn import RCNN_LOSSES, FasterRCNNFPN, ModelLossCriterion
from sdetr.detector.presets import get_preset
from sdetr.platform.training.engine import train_one_epoch


def batch(sizes=((96, 128), (72, 100)), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    masks = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g)
        masks[i, :hi, :wi] = False
    targets = [
        {
            "labels": torch.tensor([1, 3, 2]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]]),
            "iscrowd": torch.tensor([0, 0, 1]),
        },
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return images, masks, targets[: len(sizes)]


# --------------------------------------------------------------------------------------------------
# Published sizes and key trees
# --------------------------------------------------------------------------------------------------
def test_detr_r50_parameters_match_the_official_count():
    """DETR's main.py prints 41302368 trainable parameters for R50 (the tables' 41M)."""
    model = build_model(get_preset("r50_detr").model)
    assert count_parameters(model, trainable_only=True) == 41_302_368
    assert round(count_parameters(model, trainable_only=True) / 1e6) == 41
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["class_embed.weight"] == (92, 256)
    assert sd["query_embed.weight"] == (100, 256)
    assert sd["input_proj.weight"] == (256, 2048, 1, 1)
    assert sd["transformer.encoder.layers.5.self_attn.in_proj_weight"] == (768, 256)
    assert sd["transformer.decoder.layers.5.multihead_attn.out_proj.weight"] == (256, 256)
    assert sd["transformer.decoder.layers.0.linear1.weight"] == (2048, 256)
    assert sd["transformer.decoder.norm.weight"] == (256,)
    assert sd["bbox_embed.layers.2.weight"] == (4, 256)
    assert "backbone.0.body.layer4.2.conv3.weight" in sd
    assert not any(k.startswith("transformer.encoder.norm") for k in sd)  # post-norm: none


def test_faster_rcnn_matches_torchvision_keys_and_count():
    """Same state_dict tree as torchvision's fasterrcnn_resnet50_fpn (so its COCO weights load) and its
    published 41,755,286 parameters (the tables' 42M)."""
    model = build_model(get_preset("r50_faster_rcnn_fpn").model)
    assert isinstance(model, FasterRCNNFPN)
    assert count_parameters(model, trainable_only=False) == 41_755_286
    # The stem and layer1 are frozen, as torchvision's default of 3 trainable backbone layers.
    assert count_parameters(model, trainable_only=True) == 41_532_886
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    # torchvision without weights uses BatchNorm2d (weight/bias trainable, num_batches_tracked); ours is
    # FrozenBatchNorm2d, as torchvision's own pretrained model.
    ref = {
        k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k in ours}, strict=True)


@pytest.mark.parametrize(
    "preset, override, message",
    [
        ("tiny_detr", ["two_stage=true"], "two_stage=true applies to arch=deformable_detr"),
        ("tiny_detr", ["encoder=lite"], "encoder=lite apply to arch=deformable_detr"),
        ("tiny_faster_rcnn_fpn", ["backbone=swin_t"], "undilated ResNet"),
        ("tiny_faster_rcnn_fpn", ["use_kda=true"], "use_kda=true applies"),
        ("tiny_detr", ["arch=yolo"], "arch 'yolo'"),
    ],
)
def test_bad_baseline_config_is_a_clear_error(preset, override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(get_preset(preset, override).model)


# --------------------------------------------------------------------------------------------------
# DETR's losses and post-processing
# --------------------------------------------------------------------------------------------------
def test_detr_matcher_uses_minus_the_softmax_probability():
    matcher = DETRMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    logits = torch.tensor([[[0.0, 3.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    ((rows, cols),) = matcher({"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    cost = matcher.cost_matrices(logits, torch.rand(1, 3, 4), targets)[0]
    torch.testing.assert_close(cost, -logits[0].softmax(-1)[:, [0, 1]])


def test_detr_cross_entropy_weighs_no_object_by_eos_coef():
    num_classes, eos = 3, 0.1
    crit = DETRSetCriterion(num_classes, DETRMatcher(1.0, 5.0, 2.0), {"loss_ce": 1.0}, eos_coef=eos)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, num_classes + 1, generator=g)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.rand(1, 4, 4, generator=g) * 0.2 + 0.4
    boxes[0, 2] = box[0]  # query 2 is the obvious match of the one target
    logits[0, 2, 1] = 5.0
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, [{"labels": torch.tensor([1]), "boxes": box}])
    logp = logits[0].log_softmax(-1)
    # Matched query 2 -> class 1 (weight 1); the other three -> no-object (weight eos).
    expected = -(logp[2, 1] + eos * (logp[0, 3] + logp[1, 3] + logp[3, 3])) / (1 + 3 * eos)
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"] == 0


def test_detr_criterion_from_config_has_detr_coefficients():
    cfg = get_preset("r50_detr")
    crit = build_criterion(cfg.model, cfg.loss)
    assert isinstance(crit, DETRSetCriterion) and crit.eos_coef == 0.1
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (1.0, 5.0, 2.0)
    assert crit.weight_dict["loss_ce"] == 1.0 and crit.weight_dict["loss_bbox"] == 5.0
    assert crit.weight_dict["loss_giou_4"] == 2.0 and "loss_ce_5" not in crit.weight_dict


def test_postprocess_reads_detr_logits_as_softmax_with_no_object():
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 0, 2] = 4.0  # query 0: class 2
    logits[0, 1, 3] = 9.0  # query 1: no object (its best real class is still reported, with a low score)
    logits[0, 2, 0] = 2.0  # query 2: class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]]])
    out = {"pred_logits": logits, "pred_boxes": boxes, "class_activation": "softmax"}
    (res,) = PostProcess(num_select=2)(out, torch.tensor([[100, 200]]))
    assert res["labels"].tolist() == [2, 0]
    torch.testing.assert_close(res["scores"], logits[0, [0, 2]].softmax(-1)[[0, 1], [2, 0]])
    torch.testing.assert_close(res["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_postprocess_scales_faster_rcnn_detections():
    det = {
        "boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]),
        "scores": torch.tensor([0.3, 0.9]),
        "labels": torch.tensor([4, 1]),
    }
    (res,) = PostProcess()({"detections": [det]}, torch.tensor([[100, 200]]))
    assert res["scores"].tolist() == pytest.approx([0.9, 0.3]) and res["labels"].tolist() == [1, 4]
    torch.testing.assert_close(
        res["boxes"], torch.tensor([[0.0, 0.0, 200.0, 100.0], [20.0, 20.0, 100.0, 60.0]])
    )


# --------------------------------------------------------------------------------------------------
# Forward / backward of every new preset
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny_detr", "r50_detr"])
def test_detr_forward_backward(preset):
    cfg = get_preset(preset)
    model = build_model(cfg.model)
    assert isinstance(model, DETR)
    images, masks, targets = batch()
    out = model(images, masks)
    q, k = cfg.model.num_queries, cfg.model.num_classes + 1
    assert out["pred_logits"].shape == (2, q, k) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == cfg.model.dec_layers - 1
    criterion = build_criterion(cfg.model, cfg.loss)
    losses = criterion(out, targets)
    total = criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    without = {n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0}
    # DETR's decoder starts from tgt = 0: the first self-attention's values are 0, so its projection
    # weights (and the LayerNorm after it, fed a constant) get no gradient at this step; all else does.
    assert without <= {
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.0.self_attn.out_proj.weight",
        "transformer.decoder.layers.0.norm1.weight",
    }
    assert all(torch.isfinite(p.grad).all() for n, p in trainable.items() if n not in without)


@pytest.mark.parametrize("preset", ["tiny_faster_rcnn_fpn", "r50_faster_rcnn_fpn"])
def test_faster_rcnn_forward_backward_and_detections(preset):
    cfg = get_preset(preset)
    model = build_model(cfg.model)
    images, masks, targets = batch(((128, 160), (96, 120)))
    criterion = build_criterion(cfg.model, cfg.loss)
    assert isinstance(criterion, ModelLossCriterion)
    losses = criterion(model.train()(images, masks, targets), targets)
    assert set(losses) == set(RCNN_LOSSES)
    total = criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "layer4" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        out = model.eval()(images, masks)
    assert len(out["detections"]) == 2
    for det in out["detections"]:
        assert det["boxes"].shape[-1] == 4 and len(det["boxes"]) == len(det["scores"]) <= 100
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="needs the targets"):
        model.train()(images, masks)


def test_train_one_epoch_passes_targets_to_faster_rcnn_only():
    cfg = get_preset("tiny_faster_rcnn_fpn")
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, masks, targets = batch()
    stats = train_one_epoch(model, criterion, [(images, masks, targets)], optimizer, torch.device("cpu"))
    assert stats["steps"] == 1 and math.isfinite(stats["loss"])
    assert {"loss_classifier", "loss_objectness"} <= set(stats)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def test_detr_encoder_flops_follow_the_dense_attention_formula():
    """Per layer and token: q/k/v/out projections 4C², the FFN 2CF, two LayerNorms 10C; per layer the
    q·kᵀ and attention·v products 2S²C (one multiply-add = 1)."""
    cfg = get_preset("tiny_detr").model
    model = build_model(cfg)
    images, masks = torch.randn(1, 3, 128, 160), torch.zeros(1, 128, 160, dtype=torch.bool)
    r = count_flops(model, images, masks)
    s = (128 // 32) * (160 // 32)
    c, f = cfg.hidden_dim, cfg.dim_feedforward
    per_layer = s * (4 * c * c + 2 * c * f + 10 * c) + 2 * s * s * c
    assert r.by_part["encoder"] == cfg.enc_layers * per_layer
    assert r.by_part["decoder"] > 0 and r.by_part["backbone"] > 0
    assert sum(r.by_part.values()) == pytest.approx(r.total)


def test_faster_rcnn_flops_have_rpn_and_roi_parts():
    model = build_model(get_preset("tiny_faster_rcnn_fpn").model)
    r = count_flops(model, torch.randn(1, 3, 128, 160), torch.zeros(1, 128, 160, dtype=torch.bool))
    assert min(r.by_part["backbone"], r.by_part["rpn"], r.by_part["roi_heads"]) > 0
    assert sum(r.by_part.values()) == pytest.approx(r.total)
    assert model.training  # restored


# --------------------------------------------------------------------------------------------------
# Training through the single-process trainer
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    from sdetr.detector.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root / "set", n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    return root / "set"


def train_tiny(preset: str, data, out, epochs: int = 2):
    from sdetr.platform.training.local import train

    overrides = [
        f"data.root={data}",
        f"train.output_dir={out}",
        f"optim.epochs={epochs}",
        "optim.batch_size=2",
        "optim.lr_drop=100",
        "data.train_scales=[128]",
        "data.random_crop=false",
        "data.val_scale=128",
        "data.num_workers=0",
        "train.progress=false",
    ]
    return train(get_preset(preset, overrides), log=lambda *_: None)


@pytest.mark.parametrize("preset", ["tiny_detr", "tiny_faster_rcnn_fpn"])
def test_tiny_baselines_train_and_evaluate(preset, small_synth, tmp_path):
    history = train_tiny(preset, small_synth, tmp_path / "run")
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and r["train_steps"] == 2 for r in history)
    assert {"AP", "AP50"} <= set(history[-1])
    assert (
        sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "checkpoint_epoch0001.pth"
    )
