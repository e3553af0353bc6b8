"""Lite DETR: key-aware deformable attention against a slow loop, the interleaved encoder's update
schedule (counted with hooks, untouched tokens checked bitwise), config checks, and a training step."""

from __future__ import annotations

import math

import pytest
import torch

from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.kda import KeyAwareDeformAttn, key_aware_deform_attn
from sdetr.detector.presets import get_preset
from sdetr.detector.transformer.lite_encoder import (
    LiteEncoder,
    LiteEncoderLayer,
    LiteLayout,
    parse_lite_layout,
)

SHAPES = [(6, 8), (3, 4), (2, 2)]


# --------------------------------------------------------------------------------------------------
# KDA against an explicit loop
# --------------------------------------------------------------------------------------------------
def bilinear(feat: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """feat [H, W, D] sampled at normalised (x, y), pixel centres at (i + 0.5) / W, zeros outside."""
    h, w, _ = feat.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(feat.shape[-1], dtype=feat.dtype)
    for xi, wx in ((x0, 1 - fx), (x0 + 1, fx)):
        for yi, wy in ((y0, 1 - fy), (y0 + 1, fy)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * feat[yi, xi]
    return out


def slow_kda(query, key, value, shapes, locations):
    """Loop over images, queries, heads, levels and points; returns output [N, Lq, M*D], weights."""
    n, lq, m, d = query.shape
    levels, points = locations.shape[3], locations.shape[4]
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=query.dtype)
    weights = torch.zeros(n, lq, m, levels, points, dtype=query.dtype)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                keys, values = [], []
                for lvl, (h, w) in enumerate(shapes):
                    s = starts[lvl]
                    k_map = key[b, s : s + h * w, head].reshape(h, w, d)
                    v_map = value[b, s : s + h * w, head].reshape(h, w, d)
                    for p in range(points):
                        x, y = locations[b, q, head, lvl, p].tolist()
                        keys.append(bilinear(k_map, x, y))
                        values.append(bilinear(v_map, x, y))
                scores = torch.stack([torch.dot(query[b, q, head], k) / math.sqrt(d) for k in keys])
                attn = torch.softmax(scores, 0)
                out[b, q, head] = sum(a * v for a, v in zip(attn, values))
                weights[b, q, head] = attn.view(levels, points)
    return out.flatten(2), weights


def random_inputs(n=2, lq=5, m=2, d=4, points=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(n, lq, m, d, generator=g, dtype=torch.float64)
    key = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    # Some locations fall outside [0, 1]: their samples are (partly) zero padding.
    locations = torch.rand(n, lq, m, len(SHAPES), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    return query, key, value, torch.tensor(SHAPES), locations


def test_kda_core_equals_the_slow_loop():
    query, key, value, shapes, locations = random_inputs()
    out, weights = key_aware_deform_attn(query, key, value, shapes, locations)
    ref_out, ref_weights = slow_kda(query, key, value, SHAPES, locations)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 5, 2, dtype=torch.float64))


def test_kda_weights_depend_on_the_keys():
    """Plain deformable attention's weights come from the query only; KDA's change with the keys."""
    query, key, value, shapes, locations = random_inputs()
    _, w1 = key_aware_deform_attn(query, key, value, shapes, locations)
    _, w2 = key_aware_deform_attn(query, key * 2.0, value, shapes, locations)
    assert (w1 - w2).abs().max() > 1e-3


@pytest.mark.parametrize("box_reference", [False, True])
def test_kda_module_equals_the_slow_loop_with_padding(box_reference):
    torch.manual_seed(0)
    c, m, points = 8, 2, 2
    attn = KeyAwareDeformAttn(c, len(SHAPES), m, points).double()
    with torch.no_grad():  # non-trivial offsets
        attn.sampling_offsets.weight.normal_(0, 0.3)
    n, lq = 2, 4
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(n, lq, c, dtype=torch.float64)
    src = torch.randn(n, s, c, dtype=torch.float64)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[1, 40:] = True
    ref = torch.rand(n, lq, len(SHAPES), 4 if box_reference else 2, dtype=torch.float64)
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, 48, 60])
    out, locations, weights = attn(query, ref, src, shapes, starts, mask)

    offsets = attn.sampling_offsets(query).view(n, lq, m, len(SHAPES), points, 2)
    if box_reference:
        expected_loc = ref[:, :, None, :, None, :2] + offsets / points * ref[:, :, None, :, None, 2:] * 0.5
    else:
        wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)
        expected_loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    torch.testing.assert_close(locations, expected_loc)
    key = attn.key_proj(src).masked_fill(mask[..., None], 0).view(n, s, m, c // m)
    value = attn.value_proj(src).masked_fill(mask[..., None], 0).view(n, s, m, c // m)
    q = attn.query_proj(query).view(n, lq, m, c // m)
    ref_out, ref_weights = slow_kda(q, key, value, SHAPES, expected_loc.detach())
    torch.testing.assert_close(out, attn.output_proj(ref_out), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)


def test_kda_gradients_match_finite_differences():
    query, key, value, shapes, locations = random_inputs(n=1, lq=2, m=2, d=2, points=2)
    inputs = [t.requires_grad_() for t in (query, key, value, locations)]

    def f(q, k, v, loc):
        return key_aware_deform_attn(q, k, v, shapes, loc)[0]

    # fast_mode checks random projections of the Jacobian (seconds instead of a minute on 2 cores).
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------------
# The interleaved encoder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fields",
    [
        ("H3L1-(3+1)x2", (3, 1, 3, 2)),
        ("H2L2-(2+1)x3", (2, 2, 2, 3)),
        ("H1L3-(1+1)×4", (1, 3, 1, 4)),
    ],
)
def test_layout_names_parse(name, fields):
    layout = parse_lite_layout(name)
    assert layout == LiteLayout(*fields)
    assert layout.num_layers == fields[3] * (fields[2] + 1)
    assert parse_lite_layout(layout.name) == layout


@pytest.mark.parametrize("bad", ["H3L1-(3+2)x2", "H3L1", "3+1x2", "H0L4-(3+1)x2", "H3L1-(0+1)x2"])
def test_bad_layout_names_are_refused(bad):
    with pytest.raises(ConfigError, match="lite_layout"):
        parse_lite_layout(bad)


def encoder_inputs(c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    spatial_shapes = torch.tensor(shapes)
    start = torch.cat([torch.zeros(1, dtype=torch.long), spatial_shapes.prod(1).cumsum(0)[:-1]])
    s = int(spatial_shapes.prod(1).sum())
    src = torch.randn(2, s, c, generator=g)
    pos = torch.randn(2, s, c, generator=g)
    masks = []
    for h, w in shapes:  # the second image is padded on the right
        mk = torch.zeros(2, h, w, dtype=torch.bool)
        mk[1, :, max(1, w * 3 // 4) :] = True
        masks.append(mk)
    from sdetr.detector.transformer.deformable_transformer import valid_ratio

    valid_ratios = torch.stack([valid_ratio(mk) for mk in masks], 1)
    padding = torch.cat([mk.flatten(1) for mk in masks], 1)
    return src, spatial_shapes, start, valid_ratios, pos, padding


@pytest.mark.parametrize("use_kda", [True, False])
@pytest.mark.parametrize("layout", ["H3L1-(3+1)x2", "H2L2-(2+1)x3"])
def test_interleaved_schedule_and_untouched_tokens(layout, use_kda):
    torch.manual_seed(0)
    enc = LiteEncoder(
        layout, d_model=16, d_ffn=32, dropout=0.0, n_levels=4, n_heads=2, n_points=2, use_kda=use_kda
    ).eval()
    lay = enc.layout
    src, shapes, start, ratios, pos, padding = encoder_inputs()
    split = int(start[lay.low_levels])

    calls = []  # (kind, query, all tokens) at each layer call, in order

    def hook(kind):
        def pre(_module, args):
            calls.append((kind, args[0].clone(), args[3].clone()))

        return pre

    for block in enc.blocks:
        for layer in block.high:
            layer.register_forward_pre_hook(hook("high"))
        block.low.register_forward_pre_hook(hook("low"))
    with torch.no_grad():
        memory = enc(src, shapes, start, ratios, pos, padding)["memory"]

    kinds = [k for k, _, _ in calls]
    assert kinds == (["high"] * lay.high_updates + ["low"]) * lay.blocks
    assert kinds.count("low") == lay.blocks and kinds.count("high") == lay.blocks * lay.high_updates
    states = [tokens for _, _, tokens in calls] + [memory]
    torch.testing.assert_close(states[0], src, rtol=0, atol=0)
    for i, (kind, query, tokens) in enumerate(calls):
        before, after = states[i], states[i + 1]
        assert torch.equal(tokens, before)
        updated = slice(split, None) if kind == "high" else slice(None, split)
        kept = slice(None, split) if kind == "high" else slice(split, None)
        # The query is exactly the part this step updates; the rest is bitwise untouched ...
        assert torch.equal(query, before[:, updated])
        assert torch.equal(after[:, kept], before[:, kept])
        # ... and every token of the updated part changed.
        assert ((after[:, updated] - before[:, updated]).abs().amax(-1) > 0).all()
    # Low-level tokens: one update per block, so they change exactly K times in all.
    low_changes = sum(
        not torch.equal(states[i][:, :split], states[i + 1][:, :split]) for i in range(len(calls))
    )
    assert low_changes == lay.blocks


def test_low_level_ffn_can_be_narrow():
    enc = LiteEncoder("H3L1-(3+1)x2", d_model=16, d_ffn=64, n_levels=4, n_heads=2, n_points=2, low_ffn_dim=16)
    for block in enc.blocks:
        assert block.low.linear1.out_features == 16
        assert all(layer.linear1.out_features == 64 for layer in block.high)


def test_detector_runs_the_schedule_on_each_level_split():
    cfg = get_preset("tiny_lite_detr_h2l2_2p1x3").model
    cfg.num_queries = 20
    model = build_model(cfg).eval()
    enc = model.transformer.encoder
    assert isinstance(enc, LiteEncoder) and enc.layout == LiteLayout(2, 2, 2, 3)
    lengths = []
    for layer in enc.modules():
        if isinstance(layer, LiteEncoderLayer):
            assert isinstance(layer.self_attn, KeyAwareDeformAttn)
            layer.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        out = model(images, torch.zeros(1, 128, 160, dtype=torch.bool))
    sizes = out["spatial_shapes"].prod(1).tolist()
    low, high = sum(sizes[:2]), sum(sizes[2:])
    assert lengths == ([high] * 2 + [low]) * 3


@pytest.mark.parametrize(
    "override, message",
    [
        (["lite_layout=H3L1"], "lite_layout"),
        (["lite_layout=H2L1-(3+1)x2"], "num_feature_levels"),
        (["rho=0.1"], "does not combine"),
        (["encoder=sparse"], "encoder 'sparse'"),
        (["lite_low_ffn_dim=-1"], "lite_low_ffn_dim"),
    ],
)
def test_bad_lite_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(get_preset("tiny_lite_detr_h3l1_3p1x2", override).model)


def test_kda_needs_the_lite_encoder():
    with pytest.raises(ConfigError, match="use_kda=true needs encoder=lite"):
        build_model(get_preset("tiny_deformable_detr", ["use_kda=true"]).model)


def test_existing_presets_keep_the_deformable_encoder():
    for name in ("r50_deformable_detr", "r50_sparse_detr_rho_0.1", "tiny_efficient_detr"):
        cfg = get_preset(name).model
        assert (cfg.arch, cfg.encoder, cfg.use_kda) == ("deformable_detr", "deformable", False)


# --------------------------------------------------------------------------------------------------
# Training losses through the shared criterion
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny_lite_detr_h3l1_3p1x2", "tiny_lite_detr_h2l2_2p1x3"])
def test_lite_preset_losses_backpropagate_into_kda(preset):
    cfg = get_preset(preset)
    cfg.model.num_queries = 20
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    losses = criterion(model(images, masks), targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_giou_0"} <= set(losses)
    total = criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "transformer.encoder" in n}
    for part in ("key_proj", "query_proj", "value_proj", "sampling_offsets", "output_proj"):
        named = [g for n, g in grads.items() if f"self_attn.{part}.weight" in n]
        assert named and all(
            g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in named
        ), part


def test_tiny_lite_detr_trains_through_the_trainer(tmp_path):
    from sdetr.detector.data.synth import generate_synthetic_coco
    from sdetr.platform.train import train

    generate_synthetic_coco(tmp_path / "set", n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    overrides = [
        f"data.root={tmp_path / 'set'}",
        f"train.output_dir={tmp_path / 'run'}",
        "optim.epochs=2",
        "optim.batch_size=2",
        "optim.lr_drop=100",
        "data.train_scales=[128]",
        "data.random_crop=false",
        "data.val_scale=128",
        "data.num_workers=0",
        "train.progress=false",
    ]
    history = train(get_preset("tiny_lite_detr_h3l1_3p1x2", overrides), log=lambda *_: None)
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and r["train_steps"] == 2 for r in history)
    assert {"AP", "AP50"} <= set(history[-1])


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------
def test_cost_table_reports_the_encoder_gflops(capsys):
    import argparse
    import json

    from sdetr.detector.cost import cost_of_preset
    from sdetr.platform.cost_cli import add_cost_parser, cmd_cost

    parser = argparse.ArgumentParser(prog="sdetr")
    add_cost_parser(parser.add_subparsers(dest="command"))
    argv = ["cost", "tiny_lite_detr_h3l1_3p1x2", "--table", "--input", "256x320", "--no-fps"]
    assert cmd_cost(parser.parse_args([*argv, "--json"])) == 0
    lite = json.loads(capsys.readouterr().out)
    assert cmd_cost(parser.parse_args(argv)) == 0
    table = capsys.readouterr().out
    assert "Encoder GFLOPs" in table and f"| {lite['gflops_encoder']:.1f} " in table
    # Against the same detector with a dense 6-layer encoder (Deformable DETR's depth): the same
    # backbone, projections, decoder and heads, and a cheaper encoder despite its 8 layers.
    dense = cost_of_preset(
        "tiny_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage",
        ["enc_layers=6"],
        input_hw=(256, 320),
        device="cpu",
        fps=False,
    )
    for part in ("backbone", "input_proj", "decoder", "transformer_other"):
        assert lite["gflops_by_part"][part] == pytest.approx(dense["gflops_by_part"][part])
    assert 0 < lite["gflops_encoder"] < dense["gflops_encoder"]
    assert lite["gflops_encoder"] == lite["gflops_by_part"]["encoder"]


@pytest.mark.slow
def test_r50_lite_encoder_flops_at_the_fixed_input():
    """The measured figures at 3x850x1040 (see the cost table): H3L1-(3+1)x2's encoder is 72% of the
    two-stage Deformable DETR encoder's 86.0 GFLOPs (the paper reports about 40%; see docs)."""
    from sdetr.detector.cost import count_flops

    images, masks = torch.randn(1, 3, 850, 1040), torch.zeros(1, 850, 1040, dtype=torch.bool)
    enc = {}
    for name in (
        "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage",
        "r50_lite_detr_h3l1_3p1x2",
    ):
        enc[name] = count_flops(build_model(get_preset(name).model), images, masks).by_part["encoder"] / 1e9
    dense, lite = enc.values()
    assert round(dense, 1) == 86.0 and round(lite, 1) == 62.0
