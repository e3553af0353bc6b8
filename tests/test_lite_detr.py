"""Lite DETR: key-aware deformable attention (pure-PyTorch reference and module) against a slow loop, the
interleaved encoder's update schedule for each layout and structure (counted with hooks, untouched tokens
checked bitwise), config checks, a few plain-PyTorch training steps, and the encoder cost."""

from __future__ import annotations

import math

import pytest
import torch

from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.kda import KeyAwareDeformAttn, key_aware_deform_attn
from sdetr.detector.presets import get_preset
from sdetr.detector.transformer.lite_encoder import LiteEncoder, LiteEncoderLayer
from sdetr.detector.transformer.lite_layout import LiteLayout, parse_lite_layout
from sdetr.detector.transformer.lite_paper_encoder import PaperTextLiteEncoder

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
    """Loop over images, queries, heads, levels and points; returns output [N, Lq, M*D], weights.
    ``key`` None: the keys are the values."""
    key = value if key is None else key
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


@pytest.mark.parametrize("separate_key", [True, False])
def test_kda_core_equals_the_slow_loop(separate_key):
    query, key, value, shapes, locations = random_inputs()
    key = key if separate_key else None
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


@pytest.mark.parametrize(
    "box_reference, proj_key, same_loc", [(False, False, False), (True, False, False), (False, True, True)]
)
def test_kda_module_equals_the_slow_loop_with_padding(box_reference, proj_key, same_loc, monkeypatch):
    monkeypatch.setenv("SDETR_MSDA_BACKEND", "pytorch")  # the reference path (the op: test_kda_op.py)
    torch.manual_seed(0)
    c, m, points = 8, 2, 2
    attn = KeyAwareDeformAttn(c, len(SHAPES), m, points, proj_key=proj_key, same_loc=same_loc).double()
    assert (attn.key_proj is not None) == proj_key
    assert attn.sampling_offsets.out_features == m * (1 if same_loc else len(SHAPES)) * points * 2
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

    offsets = (
        attn.sampling_offsets(query).view(n, lq, m, -1, points, 2).expand(-1, -1, -1, len(SHAPES), -1, -1)
    )
    if box_reference:
        expected_loc = ref[:, :, None, :, None, :2] + offsets / points * ref[:, :, None, :, None, 2:] * 0.5
    else:
        wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)
        expected_loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    torch.testing.assert_close(locations, expected_loc)
    key = None
    if proj_key:
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
# Layouts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fields",
    [
        ("H3L1-(3+1)x2", (3, 1, 3, 2)),
        ("H2L2-(2+1)x3", (2, 2, 2, 3)),
        ("H3L1-(6+1)x1", (3, 1, 6, 1)),
        ("H1L3-(1+1)×4", (1, 3, 1, 4)),
    ],
)
def test_layout_names_parse(name, fields):
    layout = parse_lite_layout(name)
    assert layout == LiteLayout(*fields)
    assert parse_lite_layout(layout.name) == layout


@pytest.mark.parametrize("bad", ["H3L1-(3+2)x2", "H3L1", "3+1x2", "H0L4-(3+1)x2", "H3L1-(0+1)x2"])
def test_bad_layout_names_are_refused(bad):
    with pytest.raises(ConfigError, match="lite_layout"):
        parse_lite_layout(bad)


# The released code's schedules (issue #15): H = high-level queries, A = all tokens as queries.
OFFICIAL_SCHEDULES = {
    "H3L1-(3+1)x2": "HHA" * 2,
    "H2L2-(2+1)x3": "HA" * 3,
    "H3L1-(6+1)x1": "HHHHHA",
    "H3L1-(2+1)x3": "HA" * 3,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SCHEDULES))
def test_layout_schedules(name):
    layout = parse_lite_layout(name)
    letters = {"high": "H", "all": "A", "low": "L"}
    assert "".join(letters[k] for k in layout.schedule("official")) == OFFICIAL_SCHEDULES[name]
    # Six layers each, as the released code's enc_layers; the paper-text reading adds K low-level layers.
    assert layout.num_layers("official") == 6
    paper = "".join(letters[k] for k in layout.schedule("paper_text"))
    assert paper == ("H" * layout.high_updates + "L") * layout.blocks
    with pytest.raises(ConfigError, match="lite_structure"):
        layout.schedule("reading")


# --------------------------------------------------------------------------------------------------
# The interleaved encoders: which queries each layer takes, untouched tokens, update counts
# --------------------------------------------------------------------------------------------------
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


def record_calls(enc):
    """Hooks on every encoder layer: (query, all tokens, low_tokens) at each call, in order."""
    calls = []

    def pre(_module, args, kwargs):
        calls.append((args[0].clone(), args[3].clone(), kwargs.get("low_tokens", 0)))

    layers = [m for m in enc.modules() if isinstance(m, LiteEncoderLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(pre, with_kwargs=True)
    return calls


def check_schedule(enc, expected_kinds):
    """Run the encoder; check each layer's queries, its keys/values and which tokens it changed."""
    lay = enc.layout
    src, shapes, start, ratios, pos, padding = encoder_inputs()
    split = int(start[lay.low_levels])
    calls = record_calls(enc)
    with torch.no_grad():
        memory = enc(src, shapes, start, ratios, pos, padding)["memory"]
    assert len(calls) == len(expected_kinds)
    states = [tokens for _, tokens, _ in calls] + [memory]
    torch.testing.assert_close(states[0], src, rtol=0, atol=0)
    updates = {"low": 0, "high": 0}
    parts = {"low": slice(None, split), "high": slice(split, None)}
    for i, (kind, (query, tokens, low_tokens)) in enumerate(zip(expected_kinds, calls)):
        before, after = states[i], states[i + 1]
        assert torch.equal(tokens, before)  # keys and values: all tokens, current
        updated = {"high": ["high"], "low": ["low"], "all": ["low", "high"]}[kind]
        queries = torch.cat([before[:, parts[p]] for p in updated], 1)
        assert torch.equal(query, queries)
        assert low_tokens == (split if kind == "all" else 0)
        for part, sl in parts.items():
            if part in updated:  # every token of an updated group changed ...
                assert ((after[:, sl] - before[:, sl]).abs().amax(-1) > 0).all()
                updates[part] += 1
            else:  # ... and the other group is bitwise untouched
                assert torch.equal(after[:, sl], before[:, sl])
    return updates


@pytest.mark.parametrize("use_kda", [True, False])
@pytest.mark.parametrize("layout", sorted(OFFICIAL_SCHEDULES))
def test_official_schedule_and_untouched_tokens(layout, use_kda):
    torch.manual_seed(0)
    enc = LiteEncoder(layout, 16, 32, 0.0, n_levels=4, n_heads=2, n_points=2, use_kda=use_kda, low_ffn_dim=16)
    lay = enc.layout
    updates = check_schedule(enc.eval(), enc.schedule)
    # High-level tokens: A updates per block (the all-token layer is the A-th); low-level: one per block.
    assert updates == {"high": lay.high_updates * lay.blocks, "low": lay.blocks}
    assert enc.num_layers == 6


@pytest.mark.parametrize("layout", ["H3L1-(3+1)x2", "H2L2-(2+1)x3"])
def test_paper_text_schedule_and_untouched_tokens(layout):
    torch.manual_seed(0)
    enc = PaperTextLiteEncoder(layout, 16, 32, 0.0, n_levels=4, n_heads=2, n_points=2, proj_key=True)
    lay = enc.layout
    updates = check_schedule(enc.eval(), lay.schedule("paper_text"))
    assert updates == {"high": lay.high_updates * lay.blocks, "low": lay.blocks}
    assert all(layer.self_attn.key_proj is not None for layer in enc.modules() if hasattr(layer, "norm2"))


def test_low_level_tokens_take_the_narrow_ffn_in_the_all_token_layers():
    enc = LiteEncoder("H3L1-(3+1)x2", 16, 64, 0.0, n_levels=4, n_heads=2, n_points=2, low_ffn_dim=16).eval()
    for kind, layer in zip(enc.schedule, enc.layers):
        assert layer.linear1.out_features == 64
        assert layer.small_expand == (kind == "all")
        if kind == "all":
            assert layer.linear12.out_features == 16 and layer.linear22.in_features == 16
    src, shapes, start, ratios, pos, padding = encoder_inputs()
    split = int(start[1])
    rows = {"linear1": [], "linear12": []}
    for layer in enc.layers:
        for name in rows:
            if hasattr(layer, name):
                getattr(layer, name).register_forward_hook(
                    lambda _m, a, _o, n=name: rows[n].append(a[0].shape[1])
                )
    with torch.no_grad():
        enc(src, shapes, start, ratios, pos, padding)
    high = src.shape[1] - split
    assert rows["linear12"] == [split, split]  # the low-level tokens, once per block
    assert rows["linear1"] == [high] * 6  # the high-level tokens in every layer
    shared = LiteEncoder("H3L1-(3+1)x2", 16, 64, n_levels=4, n_heads=2, n_points=2, low_ffn_dim=0)
    assert not any(layer.small_expand for layer in shared.layers)


def test_detector_runs_the_schedule_on_each_level_split():
    cfg = get_preset("tiny_lite_detr_h2l2_2p1x3").model
    cfg.num_queries = 20
    model = build_model(cfg).eval()
    enc = model.transformer.encoder
    assert isinstance(enc, LiteEncoder) and enc.layout == LiteLayout(2, 2, 2, 3)
    lengths = []
    for layer in enc.layers:
        assert isinstance(layer.self_attn, KeyAwareDeformAttn) and layer.self_attn.key_proj is None
        layer.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    for layer in model.transformer.decoder.layers:  # KDA in the decoder too, as released
        assert isinstance(layer.cross_attn, KeyAwareDeformAttn)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 160), torch.zeros(1, 128, 160, dtype=torch.bool))
    sizes = out["spatial_shapes"].prod(1).tolist()
    assert lengths == [sum(sizes[2:]), sum(sizes)] * 3


def test_structure_and_attention_options_reach_the_model():
    cfg = get_preset(
        "tiny_lite_detr_h3l1_3p1x2",
        ["lite_structure=paper_text", "proj_key=true", "same_loc=true", "small_expand=false"],
    ).model
    enc = build_model(cfg).transformer.encoder
    assert isinstance(enc, PaperTextLiteEncoder) and enc.num_layers == 8
    attn = enc.blocks[0].high[0].self_attn
    assert attn.key_proj is not None and attn.same_loc
    enc = build_model(
        get_preset("tiny_lite_detr_h3l1_3p1x2", ["small_expand=false"]).model
    ).transformer.encoder
    assert not any(layer.small_expand for layer in enc.layers)
    enc = build_model(
        get_preset("tiny_lite_detr_h3l1_3p1x2", ["lite_low_ffn_dim=32"]).model
    ).transformer.encoder
    assert [layer.linear12.out_features for layer in enc.layers if layer.small_expand] == [32, 32]


@pytest.mark.parametrize(
    "override, message",
    [
        (["lite_layout=H3L1"], "lite_layout"),
        (["lite_layout=H2L1-(3+1)x2"], "num_feature_levels"),
        (["lite_structure=text"], "lite_structure"),
        (["rho=0.1"], "does not combine"),
        (["encoder=sparse"], "encoder 'sparse'"),
        (["lite_low_ffn_dim=-1"], "lite_low_ffn_dim"),
        (["use_kda=false", "same_loc=true"], "needs use_kda=true"),
    ],
)
def test_bad_lite_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(get_preset("tiny_lite_detr_h3l1_3p1x2", override).model)


@pytest.mark.parametrize("flag", ["use_kda", "dec_use_kda", "proj_key"])
def test_kda_needs_the_lite_encoder(flag):
    with pytest.raises(ConfigError, match=f"{flag}=true needs encoder=lite"):
        build_model(get_preset("tiny_deformable_detr", [f"{flag}=true"]).model)


def test_existing_presets_keep_the_deformable_encoder():
    for name in ("r50_deformable_detr", "r50_sparse_detr_rho_0.1", "tiny_efficient_detr"):
        cfg = get_preset(name).model
        assert (cfg.arch, cfg.encoder, cfg.use_kda, cfg.dec_use_kda) == (
            "deformable_detr",
            "deformable",
            False,
            False,
        )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def synthetic_batch():
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return images, masks, targets


@pytest.mark.parametrize(
    "preset", ["tiny_lite_detr_h3l1_3p1x2", pytest.param("tiny_lite_detr_h3l1_6p1x1", marks=pytest.mark.slow)]
)
def test_tiny_lite_presets_train_a_few_steps(preset):
    """Plain PyTorch: the preset's criterion, AdamW at its learning rate, three steps on one batch."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.model.num_queries = 20
    model = build_model(cfg.model).train()
    criterion = build_criterion(cfg.model, cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    images, masks, targets = synthetic_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    totals = []
    for _ in range(3):
        losses = criterion(model(images, masks), targets)
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_giou_0"} <= set(losses)
        total = criterion.weighted_total(losses)
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < totals[0]  # three steps on one batch lower its loss
    last = len(model.transformer.encoder.layers) - 1  # an all-token layer (with the low-level FFN)
    for part in ("self_attn.query_proj", "self_attn.value_proj", "self_attn.sampling_offsets", "linear12"):
        moved = [n for n, p in model.named_parameters() if f"encoder.layers.{last}.{part}" in n]
        assert moved and all(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in moved), (
            part
        )
    assert any("decoder.layers.0.cross_attn.query_proj" in n for n in before)


# --------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------
def test_encoder_cost_equals_the_encoder_part_of_the_whole_detector():
    from sdetr.detector.cost import count_flops
    from sdetr.detector.encoder_cost import encoder_cost, encoder_flops, level_shapes, reference_config

    cfg = get_preset("tiny_lite_detr_h3l1_3p1x2").model
    hw = (128, 160)
    report = count_flops(build_model(cfg), torch.randn(1, 3, *hw), torch.zeros(1, *hw, dtype=torch.bool))
    assert report.by_part["encoder"] == encoder_flops(cfg, hw)
    assert report.by_op["kda"] > 0  # the compiled op is counted by its registered formula
    cost = encoder_cost(cfg, hw)
    assert cost["reference_gflops"] * 1e9 == encoder_flops(reference_config(cfg), hw)
    assert 0.3 < cost["share"] < 0.5
    assert level_shapes((850, 1040), 4) == [(107, 130), (54, 65), (27, 33), (14, 17)]


@pytest.mark.slow
def test_r50_lite_encoder_shares_at_the_fixed_input():
    """The shares at 3x850x1040 (docs/lite_detr.md), in the paper's order, the default layout's <= 50%."""
    from sdetr.detector.encoder_cost import lite_encoder_table

    rows = lite_encoder_table("r50")
    assert [r["layout"] for r in rows] == ["H2L2-(2+1)x3", "H3L1-(6+1)x1", "H3L1-(3+1)x2", "H3L1-(2+1)x3"]
    assert [round(r["encoder_gflops"], 1) for r in rows] == [30.9, 33.0, 38.0, 42.9]
    assert round(rows[0]["reference_gflops"], 1) == 86.0
    assert rows[2]["share"] <= 0.5
