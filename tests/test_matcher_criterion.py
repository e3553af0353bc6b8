"""Hungarian matcher, set criterion (all Sparse DETR loss terms) and post-processing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdetr.detector.build import build_criterion
from sdetr.detector.config import LossConfig, ModelConfig
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.losses.criterion import SetCriterion, build_weight_dict, drop_crowd
from sdetr.detector.losses.matcher import HungarianMatcher, build_matcher


def _boxes(n: int) -> torch.Tensor:
    """Random valid (cx, cy, w, h) boxes inside the unit square."""
    wh = torch.rand(n, 2) * 0.3 + 0.05
    c = torch.rand(n, 2) * 0.5 + 0.25
    return torch.cat([c, wh], dim=1)


def _target(n: int, num_classes: int = 5, crowd: list[int] | None = None) -> dict:
    t = {"labels": torch.randint(0, num_classes, (n,)), "boxes": _boxes(n)}
    if crowd is not None:
        t["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    return t


def _xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou_scalar(a, b) -> float:
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


# -- matcher -----------------------------------------------------------------------------------------
def test_matcher_empty_targets():
    matcher = HungarianMatcher()
    out = {"pred_logits": torch.randn(3, 7, 5), "pred_boxes": _boxes(21).view(3, 7, 4)}
    targets = [_target(0), _target(2), _target(0)]
    indices = matcher(out, targets)
    assert [len(i) for i, _ in indices] == [0, 2, 0]
    for i, j in indices:
        assert i.dtype == torch.int64 and j.dtype == torch.int64 and len(i) == len(j)
    assert sorted(indices[1][1].tolist()) == [0, 1]
    # A whole batch without targets: no scipy call on empty matrices.
    for i, j in matcher(out, [_target(0)] * 3):
        assert i.numel() == 0 and j.numel() == 0


def test_matcher_picks_the_obvious_query():
    boxes = torch.tensor(
        [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.3, 0.1], [0.3, 0.7, 0.2, 0.3]]
    )
    out = {"pred_logits": torch.zeros(1, 4, 3), "pred_boxes": boxes[None]}
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.79, 0.31, 0.3, 0.1]])}
    ((i, j),) = HungarianMatcher()(out, [target])
    assert i.tolist() == [2] and j.tolist() == [0]
    # The class cost alone also decides when boxes are identical.
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 3, 1] = 5.0
    out = {"pred_logits": logits, "pred_boxes": torch.full((1, 4, 4), 0.5)}
    ((i, j),) = HungarianMatcher()(out, [{"labels": torch.tensor([1]), "boxes": torch.full((1, 4), 0.5)}])
    assert i.tolist() == [3]


def test_matcher_cost_matrix_equals_direct_computation():
    torch.manual_seed(1)
    matcher = HungarianMatcher(
        cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
    )
    logits, boxes = torch.randn(2, 4, 3), _boxes(8).view(2, 4, 4)
    targets = [_target(3, 3), _target(2, 3)]
    costs = matcher.cost_matrices(logits, boxes, targets)
    for b in range(2):
        assert costs[b].shape == (4, len(targets[b]["labels"]))
        for q in range(4):
            for t in range(len(targets[b]["labels"])):
                p = 1 / (1 + math.exp(-logits[b, q, targets[b]["labels"][t]].item()))
                pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
                pb, tb = boxes[b, q].tolist(), targets[b]["boxes"][t].tolist()
                l1 = sum(abs(x - y) for x, y in zip(pb, tb))
                want = 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * _giou_scalar(pb, tb)
                assert costs[b][q, t].item() == pytest.approx(want, abs=1e-5)


def test_matcher_permutation_invariance():
    torch.manual_seed(2)
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(1, 12, 4), _boxes(12).view(1, 12, 4)
    target = _target(5, 4)
    ((i, j),) = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
    pairs = set(zip(i.tolist(), j.tolist()))
    assert len(pairs) == 5

    qperm, tperm = torch.randperm(12), torch.randperm(5)
    permuted = {"pred_logits": logits[:, qperm], "pred_boxes": boxes[:, qperm]}
    ((pi, pj),) = matcher(permuted, [{"labels": target["labels"][tperm], "boxes": target["boxes"][tperm]}])
    mapped = {(qperm[a].item(), tperm[b].item()) for a, b in zip(pi.tolist(), pj.tolist())}
    assert mapped == pairs


def test_matcher_ignores_crowd_targets():
    boxes = _boxes(6).view(1, 6, 4)
    out = {"pred_logits": torch.zeros(1, 6, 3), "pred_boxes": boxes}
    # Target 1 is a crowd box sitting exactly on query 4: it must still never be matched.
    target = {
        "labels": torch.tensor([0, 1, 2]),
        "boxes": torch.stack([boxes[0, 0], boxes[0, 4], boxes[0, 2]]),
        "iscrowd": torch.tensor([0, 1, 0]),
    }
    ((i, j),) = HungarianMatcher()(out, [target])
    assert 1 not in j.tolist()
    assert sorted(zip(j.tolist(), i.tolist())) == [(0, 0), (2, 2)]


def test_build_matcher_reads_config():
    m = build_matcher(LossConfig(set_cost_class=1.0, set_cost_bbox=3.0, set_cost_giou=4.0, focal_alpha=0.3))
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal_alpha, m.focal_gamma) == (1.0, 3.0, 4.0, 0.3, 2.0)


# -- criterion ---------------------------------------------------------------------------------------
B, Q, C, NH, NP = 2, 10, 5, 2, 2
SHAPES = torch.tensor([[5, 6], [4, 5]])  # S = 30 + 20 = 50
STARTS = torch.tensor([0, 30])
S = 50


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


def _sparse_detr_outputs(dec_layers: int = 2, enc_layers: int = 3, rho: float = 0.3) -> dict:
    """A random Sparse-DETR-shaped output dict; every float tensor is a leaf that requires grad."""

    def head(n):
        return {"pred_logits": _leaf(torch.randn(B, n, C)), "pred_boxes": _leaf(_boxes(B * n).view(B, n, 4))}

    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, 25:30] = True  # image 1 padded on the right of both levels
    mask[1, 46:50] = True
    valid = (~mask).sum(1)
    sparse_token_nums = (valid.float() * rho).long() + 1
    k = int(sparse_token_nums.max())
    out = head(Q)
    out["aux_outputs"] = [head(Q) for _ in range(dec_layers - 1)]
    out["enc_outputs"] = head(S)
    out["aux_outputs_enc"] = [head(k) for _ in range(enc_layers - 1)]
    out["backbone_mask_prediction"] = _leaf(torch.randn(B, S))
    out["sampling_locations_dec"] = _leaf(torch.rand(B, dec_layers, Q, NH, 2, NP, 2))
    out["attn_weights_dec"] = _leaf(torch.rand(B, dec_layers, Q, NH, 2, NP).softmax(-1))
    out["spatial_shapes"] = SHAPES
    out["level_start_index"] = STARTS
    out["sparse_token_nums"] = sparse_token_nums
    out["mask_flatten"] = mask
    out["backbone_topk_proposals"] = torch.stack([torch.randperm(S)[:k] for _ in range(B)])
    return out


def _model_cfg(**kw) -> ModelConfig:
    base = {"num_classes": C, "dec_layers": 2, "enc_layers": 3, "aux_loss": True, "two_stage": True}
    base.update({"use_enc_aux_loss": True, "rho": 0.3, "eff_specific_head": True, **kw})
    return ModelConfig(**base)


def _grad_leaves(out: dict) -> dict[str, torch.Tensor]:
    leaves = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    for name in ("aux_outputs", "aux_outputs_enc"):
        for i, d in enumerate(out[name]):
            leaves.update({f"{name}[{i}].{k}": v for k, v in d.items()})
    leaves.update({f"enc_outputs.{k}": v for k, v in out["enc_outputs"].items()})
    leaves["backbone_mask_prediction"] = out["backbone_mask_prediction"]
    return leaves


def test_criterion_full_sparse_detr_outputs():
    out = _sparse_detr_outputs()
    criterion = build_criterion(_model_cfg(), LossConfig())
    targets = [_target(3, C), _target(4, C, crowd=[0, 0, 1, 0])]
    losses = criterion(out, targets)

    per_set = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    want = {"class_error", "loss_mask_prediction", "corr_mask_attn_map_dec_all"}
    want |= {"corr_mask_attn_map_dec_0", "corr_mask_attn_map_dec_1"}
    for suffix in ["", "_0", "_enc", "_enc_0", "_enc_1"]:
        want |= {k + suffix for k in per_set}
    assert set(losses) == want
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert 0.0 <= losses["corr_mask_attn_map_dec_all"].item() <= 1.0

    total = criterion.weighted_total(losses)
    manual = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)
    total.backward()
    for name, leaf in _grad_leaves(out).items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name
    # The DAM is a target (top-k selection): no gradient flows into the decoder's attention from it.
    assert out["sampling_locations_dec"].grad is None and out["attn_weights_dec"].grad is None


def test_criterion_empty_targets_are_finite_with_gradients():
    out = _sparse_detr_outputs()
    criterion = build_criterion(_model_cfg(), LossConfig())
    losses = criterion(out, [_target(0, C), _target(0, C)])
    for k, v in losses.items():
        assert torch.isfinite(v), k
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    criterion.weighted_total(losses).backward()
    for name, leaf in _grad_leaves(out).items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
    assert out["pred_logits"].grad.abs().sum() > 0  # all-negative focal loss still trains the classifier


def test_crowd_boxes_do_not_change_the_losses():
    out = _sparse_detr_outputs()
    criterion = build_criterion(_model_cfg(), LossConfig())
    plain = [_target(3, C), _target(2, C)]
    crowd_box = {"labels": torch.tensor([1]), "boxes": out["pred_boxes"][1, :1].detach().clone()}
    with_crowd = [
        {**plain[0], "iscrowd": torch.zeros(3, dtype=torch.int64)},
        {
            "labels": torch.cat([crowd_box["labels"], plain[1]["labels"]]),
            "boxes": torch.cat([crowd_box["boxes"], plain[1]["boxes"]]),
            "iscrowd": torch.tensor([1, 0, 0]),
            "image_id": torch.tensor([7]),
        },
    ]
    dropped = drop_crowd(with_crowd)
    assert len(dropped[1]["labels"]) == 2 and dropped[1]["image_id"].tolist() == [7]
    a, b = criterion(out, plain), criterion(out, with_crowd)
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6, abs=1e-7), k


def test_loss_ce_equals_hand_written_focal_loss():
    torch.manual_seed(3)
    logits, boxes = torch.randn(B, Q, C), _boxes(B * Q).view(B, Q, 4)
    targets = [_target(3, C), _target(1, C)]
    criterion = SetCriterion(C, HungarianMatcher(), {"loss_ce": 1.0}, ["labels", "boxes"], 0.25, 2.0)
    out = {"pred_logits": logits, "pred_boxes": boxes}
    indices = criterion.matcher(out, targets)
    got = criterion.loss_labels(out, targets, indices, num_boxes=4.0)["loss_ce"].item()

    positives = {
        (b, q.item(), targets[b]["labels"][t].item())
        for b, (i, j) in enumerate(indices)
        for q, t in zip(i, j)
    }
    total = 0.0
    for b in range(B):
        for q in range(Q):
            for c in range(C):
                p = 1 / (1 + math.exp(-logits[b, q, c].item()))
                if (b, q, c) in positives:
                    total += -0.25 * (1 - p) ** 2 * math.log(p)
                else:
                    total += -0.75 * p**2 * math.log(1 - p)
    assert got == pytest.approx(total / 4.0, rel=1e-5)

    # The official normalisation: mean over queries, sum over the rest, / num_boxes, then x Q.
    onehot = torch.zeros(B, Q, C)
    for b, q, c in positives:
        onehot[b, q, c] = 1
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    assert got == pytest.approx((focal.mean(1).sum() / 4.0 * Q).item(), rel=1e-5)

    boxes_loss = criterion.loss_boxes(out, targets, indices, num_boxes=4.0)
    l1 = giou = 0.0
    for b, (i, j) in enumerate(indices):
        for q, t in zip(i.tolist(), j.tolist()):
            pb, tb = boxes[b, q].tolist(), targets[b]["boxes"][t].tolist()
            l1 += sum(abs(x - y) for x, y in zip(pb, tb))
            giou += 1 - _giou_scalar(pb, tb)
    assert boxes_loss["loss_bbox"].item() == pytest.approx(l1 / 4.0, rel=1e-5)
    assert boxes_loss["loss_giou"].item() == pytest.approx(giou / 4.0, rel=1e-5)


def test_two_stage_proposal_loss_uses_binary_labels_unless_specific_head():
    torch.manual_seed(4)
    enc = {"pred_logits": torch.randn(B, S, C), "pred_boxes": _boxes(B * S).view(B, S, 4)}
    out = {"pred_logits": torch.randn(B, Q, C), "pred_boxes": _boxes(B * Q).view(B, Q, 4), "enc_outputs": enc}
    targets = [_target(3, C), _target(2, C)]
    targets[0]["labels"] = torch.tensor([1, 2, 3])
    matcher = HungarianMatcher()
    binary = SetCriterion(C, matcher, {}, ["labels", "boxes"], eff_specific_head=False)(out, targets)
    specific = SetCriterion(C, matcher, {}, ["labels", "boxes"], eff_specific_head=True)(out, targets)
    zeros = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    ref = SetCriterion(C, matcher, {}, ["labels"])
    want_binary = ref.loss_labels(enc, zeros, matcher(enc, zeros), num_boxes=5.0)["loss_ce"]
    want_specific = ref.loss_labels(enc, targets, matcher(enc, targets), num_boxes=5.0)["loss_ce"]
    assert binary["loss_ce_enc"].item() == pytest.approx(want_binary.item(), rel=1e-6)
    assert specific["loss_ce_enc"].item() == pytest.approx(want_specific.item(), rel=1e-6)
    assert binary["loss_ce_enc"].item() != pytest.approx(specific["loss_ce_enc"].item(), rel=1e-3)
    assert binary["loss_ce"].item() == specific["loss_ce"].item()  # the decoder loss is unaffected


BASE = {"loss_ce", "loss_bbox", "loss_giou"}


def _suffixed(*suffixes: str) -> set[str]:
    return {k + s for k in BASE for s in suffixes}


@pytest.mark.parametrize(
    "flags, want",
    [
        ({}, BASE),
        ({"aux_loss": True}, _suffixed("", "_0", "_1")),
        ({"two_stage": True}, _suffixed("", "_enc")),
        ({"use_enc_aux_loss": True}, _suffixed("", "_enc_0", "_enc_1", "_enc_2")),
        ({"rho": 0.1}, BASE | {"loss_mask_prediction"}),
        (
            {"aux_loss": True, "two_stage": True, "use_enc_aux_loss": True, "rho": 0.3},
            _suffixed("", "_0", "_1", "_enc", "_enc_0", "_enc_1", "_enc_2") | {"loss_mask_prediction"},
        ),
    ],
)
def test_weight_dict_keys_follow_the_official_build(flags, want):
    cfg = {"aux_loss": False, "two_stage": False, "use_enc_aux_loss": False, "rho": 0.0, **flags}
    model_cfg = ModelConfig(dec_layers=3, enc_layers=4, **cfg)
    weights = build_weight_dict(model_cfg, LossConfig(mask_prediction_coef=0.5))
    assert set(weights) == want
    coef = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask_prediction": 0.5}
    for k, v in weights.items():
        base = next(b for b in coef if k == b or k.startswith(b + "_"))
        assert v == coef[base], k
    crit = build_criterion(model_cfg, LossConfig())
    assert ("mask_prediction" in crit.losses) == (model_cfg.rho > 0)


def test_enc_aux_loss_coef_scales_only_encoder_aux_terms():
    weights = build_weight_dict(_model_cfg(), LossConfig(enc_aux_loss_coef=0.5, cls_loss_coef=3.0))
    assert weights["loss_ce_enc_0"] == 1.5 and weights["loss_bbox_enc_1"] == 2.5
    assert weights["loss_ce_enc"] == 3.0 and weights["loss_ce_0"] == 3.0 and weights["loss_ce"] == 3.0


def test_weighted_total_skips_logged_metrics():
    crit = SetCriterion(
        C, HungarianMatcher(), {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou_0": 1.0}, ["labels"]
    )
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(0.5), "class_error": torch.tensor(50.0)}
    assert crit.weighted_total(losses).item() == pytest.approx(4.5)


# -- post-processing ---------------------------------------------------------------------------------
def test_postprocess_hand_example():
    # 2 queries x 3 classes; sigmoid is monotone, so the ranking follows the logits.
    logits = torch.tensor([[[0.0, 3.0, -1.0], [2.0, -2.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    out = {"pred_logits": logits, "pred_boxes": boxes}
    (res,) = PostProcess(num_select=4)(out, torch.tensor([[100, 200]]))  # h=100, w=200
    assert res["labels"].tolist() == [1, 0, 2, 0]
    torch.testing.assert_close(res["scores"], torch.tensor([3.0, 2.0, 1.0, 0.0]).sigmoid())
    q0 = [80.0, 30.0, 120.0, 70.0]  # x in [0.4, 0.6] * 200, y in [0.3, 0.7] * 100
    q1 = [0.0, 50.0, 100.0, 100.0]
    torch.testing.assert_close(res["boxes"], torch.tensor([q0, q1, q1, q0]))

    # Fewer than num_select candidates (Q*C = 6 < 100): every pair is returned.
    (res,) = PostProcess()(out, torch.tensor([[100, 200]]))
    assert len(res["scores"]) == 6 and res["labels"].dtype == torch.int64
