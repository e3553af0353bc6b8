"""The cost model (`sdetr.detector.cost`) and `sdetr cost` (`sdetr.platform.cli.cost`).

FLOP counts are checked against hand formulas in fvcore's convention (one multiply-add = 1, bilinear
sampling = 4 per value, LayerNorm / GroupNorm = 5 per element), the compiled deformable-attention op
against its grid_sample reference, and the R50 presets against the official figures.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdetr.detector import ops
from sdetr.detector.build import build_model
from sdetr.detector.cost import FlopReport, cost_of_preset, count_flops, measure_fps
from sdetr.detector.errors import ConfigError, SdetrError
from sdetr.detector.layers.ms_deform_attn import ms_deform_attn
from sdetr.detector.presets import get_preset
from sdetr.detector.transformer.deformable_transformer import keep_counts
from sdetr.platform.cli.cost import add_cost_parser, cmd_cost, format_table

SMALL_HW = (128, 160)


class Wrap(nn.Module):
    """Gives any function the detector's ``forward(images, masks)`` signature."""

    def __init__(self, fn, *modules):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, x, mask):
        return self.fn(x)


def flops_of(fn, x, *modules) -> FlopReport:
    return count_flops(Wrap(fn, *modules), x, None)


def tiny(name="tiny_sparse_detr_rho_0.1", overrides=None):
    return build_model(get_preset(name, overrides).model)


def small_input(h=SMALL_HW[0], w=SMALL_HW[1]):
    return torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)


def compiled_available() -> bool:
    try:
        return ops.use_compiled(torch.empty(0))
    except RuntimeError:
        return False


# --------------------------------------------------------------------------------------------------
# Single ops against hand formulas
# --------------------------------------------------------------------------------------------------
def test_linear_counts_one_per_multiply_add():
    lin = nn.Linear(7, 5)
    r = flops_of(lin, torch.randn(2, 3, 7), lin)
    assert r.total == 2 * 3 * 7 * 5
    assert r.total_all == 2 * r.total  # multiply and add counted separately


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_counts_one_per_multiply_add(groups):
    conv = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, groups=groups)
    r = flops_of(conv, torch.randn(1, 4, 16, 20), conv)
    out_h, out_w = 8, 10
    assert r.total == 8 * (4 // groups) * 3 * 3 * out_h * out_w
    assert r.by_op == {"convolution": r.total}


def test_grid_sample_counts_four_per_sampled_value():
    x, grid = torch.randn(2, 4, 5, 6), torch.rand(2, 7, 3, 2) * 2 - 1
    r = flops_of(lambda v: F.grid_sample(v, grid, align_corners=False), x)
    assert r.total == 4 * (2 * 4 * 7 * 3)
    assert r.total_all == 2 * r.total


def test_norms_count_fvcore_estimates_in_both_totals():
    ln, gn = nn.LayerNorm(16), nn.GroupNorm(4, 8)
    r = flops_of(ln, torch.randn(3, 16), ln)
    assert r.total == r.total_all == 3 * 16 * 5
    r = flops_of(gn, torch.randn(1, 8, 5, 5), gn)
    assert r.total == r.total_all == 8 * 5 * 5 * 5
    r = flops_of(lambda v: F.layer_norm(v, (16,)), torch.randn(3, 16))  # no affine: 4 per element
    assert r.total == 3 * 16 * 4


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_counts_projections_and_two_products(need_weights):
    """The decoder's self-attention (q = k != v) as fvcore traced it in torch 1.x: three input projections,
    the q·kᵀ and attn·v bmm's, the output projection. The fused (sdpa) and the bmm paths agree."""
    length, dim, heads = 10, 32, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    tgt, pos = torch.randn(1, length, dim), torch.randn(1, length, dim)

    def attend(x):
        q = k = x + pos
        return mha(q, k, x, need_weights=need_weights)[0]

    r = flops_of(attend, tgt, mha)
    projections = 4 * length * dim * dim
    products = 2 * heads * length * length * (dim // heads)
    assert r.total == projections + products


def test_ms_deform_attn_counts_four_per_sampled_value_on_both_paths(monkeypatch):
    n, lq, m, d, levels, points = 1, 6, 2, 8, 2, 3
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(n, 26, m, d)
    loc = torch.rand(n, lq, m, levels, points, 2)
    attn = torch.rand(n, lq, m, levels, points).softmax(-1)
    expected = ops.ms_deform_attn_flops(value.shape, loc.shape)
    assert expected == 4 * n * lq * m * d * levels * points

    def run(v):
        return ms_deform_attn(v, shapes, starts, loc, attn)

    monkeypatch.setenv(ops.BACKEND_ENV, "pytorch")
    reference = flops_of(run, value)
    assert reference.total == expected and "grid_sampler_2d" in reference.by_op
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    if not compiled_available():
        pytest.skip("the compiled ms_deform_attn op is not available here")
    compiled = flops_of(run, value)
    assert compiled.total == expected and compiled.by_op == {"ms_deform_attn": expected}


# --------------------------------------------------------------------------------------------------
# Whole detectors
# --------------------------------------------------------------------------------------------------
def test_compiled_op_and_grid_sample_paths_give_the_same_detector_flops(monkeypatch):
    if not compiled_available():
        pytest.skip("the compiled ms_deform_attn op is not available here")
    model = tiny()
    images, masks = small_input()
    compiled = count_flops(model, images, masks)
    monkeypatch.setenv(ops.BACKEND_ENV, "pytorch")
    reference = count_flops(model, images, masks)
    assert compiled.total == reference.total and compiled.total_all == reference.total_all
    assert compiled.by_part == reference.by_part
    assert compiled.by_op.pop("ms_deform_attn") == reference.by_op.pop("grid_sampler_2d") > 0
    assert compiled.by_op == reference.by_op


def test_breakdown_sums_to_total_and_model_state_is_restored():
    model = tiny().train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    r = count_flops(model, *small_input())
    assert model.training and before == {n: p.requires_grad for n, p in model.named_parameters()}
    assert set(r.by_part) == {
        "backbone",
        "input_proj",
        "encoder",
        "enc_aux_heads",
        "decoder",
        "transformer_other",
        "heads",
    }
    assert min(r.by_part.values()) > 0
    assert sum(r.by_part.values()) == pytest.approx(r.total)
    assert sum(r.by_op.values()) == pytest.approx(r.total)
    assert r.gflops_without_enc_aux_heads == pytest.approx((r.total - r.by_part["enc_aux_heads"]) / 1e9)


def test_sparse_encoder_flops_follow_rho_exactly():
    """Encoder FLOPs against the hand formula for k = int(S·ρ) + 1 kept tokens, rising with ρ."""
    model = tiny()
    c = get_preset("tiny_sparse_detr_rho_0.1").model
    images, masks = small_input()
    with torch.no_grad():
        shapes = model.eval()(images, masks)["spatial_shapes"]
    tokens = int(shapes.prod(1).sum())
    sampled = c.nheads * c.num_feature_levels * c.enc_n_points  # sampled points per query
    previous = 0.0
    for rho in (0.1, 0.2, 0.5, 1.0):
        model.set_rho(rho)
        r = count_flops(model, images, masks)
        k = int(keep_counts(torch.tensor([tokens]), rho))  # int(S·ρ) + 1, at most S
        per_query = (
            c.hidden_dim * sampled * 3  # sampling offsets (x, y) and attention weights
            + c.hidden_dim * c.hidden_dim  # output projection
            + 4 * (c.hidden_dim // c.nheads) * sampled  # bilinear sampling of D = C / M values per point
            + 2 * c.hidden_dim * c.dim_feedforward  # FFN
            + 2 * 5 * c.hidden_dim  # two LayerNorms
        )
        value_proj = tokens * c.hidden_dim * c.hidden_dim
        assert r.by_part["encoder"] == c.enc_layers * (value_proj + k * per_query)
        head = c.hidden_dim * c.num_classes + 2 * c.hidden_dim * c.hidden_dim + c.hidden_dim * 4
        assert r.by_part["enc_aux_heads"] == (c.enc_layers - 1) * k * head
        assert r.by_part["encoder"] > previous
        previous = r.by_part["encoder"]


@pytest.mark.parametrize(
    "name, official",
    [
        ("r50_deformable_detr", 172.9),
        ("r50_efficient_detr", 177.3),
        pytest.param("swint_deformable_detr", 180.4, marks=pytest.mark.slow),
        pytest.param("swint_efficient_detr", 184.8, marks=pytest.mark.slow),
    ],
)
def test_official_gflops_at_the_fixed_input(name, official):
    """Sparse DETR's README (fvcore on one random 3x850x1040 image). About 6 s each on 2 idle CPU cores,
    several times that when they are shared."""
    images, masks = torch.randn(1, 3, 850, 1040), torch.zeros(1, 850, 1040, dtype=torch.bool)
    r = count_flops(build_model(get_preset(name).model), images, masks)
    assert round(r.gflops, 1) == official, (r.gflops, r.by_part)


def test_val_mode_is_the_mean_over_images_not_the_last(tmp_path):
    from sdetr.detector.data import build_dataset
    from sdetr.detector.data.synth import generate_synthetic_coco

    generate_synthetic_coco(tmp_path / "synth", n_train=0, n_val=3, seed=1, min_size=96, max_size=200)
    cfg = get_preset("tiny_deformable_detr")
    cfg.data.root = str(tmp_path / "synth")
    res = cost_of_preset(cfg, val_images=3, device="cpu", fps=False)
    model = build_model(cfg.model)
    dataset = build_dataset("val", cfg.data)
    each = []
    for i in range(3):
        img = dataset[i][0]
        each.append(count_flops(model, img[None], torch.zeros(1, *img.shape[-2:], dtype=torch.bool)).gflops)
    assert len(set(each)) > 1  # the images differ in size, so the mean is not any single value
    assert res["gflops"] == pytest.approx(sum(each) / 3)
    assert res["input_mode"] == "val" and res["val_images"] == 3


def test_val_mode_needs_enough_images(tmp_path):
    from sdetr.detector.data.synth import generate_synthetic_coco

    generate_synthetic_coco(tmp_path / "synth", n_train=0, n_val=2, seed=1, min_size=96, max_size=128)
    cfg = get_preset("tiny_deformable_detr")
    cfg.data.root = str(tmp_path / "synth")
    with pytest.raises(SdetrError, match="has 2 images"):
        cost_of_preset(cfg, val_images=5, device="cpu", fps=False)


def test_measure_fps_reports_batch_latency():
    model = tiny("tiny_deformable_detr")
    res = measure_fps(model, 2, torch.randn(3, *SMALL_HW), "cpu", warmup=1, iters=2)
    assert res["batch_size"] == 2 and res["iters"] == 2
    assert res["latency_ms"] > 0 and res["fps"] == pytest.approx(2e3 / res["latency_ms"])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse(*argv):
    parser = argparse.ArgumentParser(prog="sdetr")
    add_cost_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["cost", *argv])


REQUIRED_KEYS = {
    "preset",
    "params_trainable",
    "params_total",
    "gflops",
    "gflops_all",
    "input",
    "fps_b1",
    "fps_b4",
    "latency_ms",
}


def test_json_output_has_the_required_keys(capsys):
    assert (
        cmd_cost(parse("tiny_sparse_detr_rho_0.1", "--input", "128x160", "--set", "rho=0.2", "--json")) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= REQUIRED_KEYS
    assert res["preset"] == "tiny_sparse_detr_rho_0.1" and res["rho"] == 0.2 and res["input"] == "3x128x160"
    assert res["params_paper"] < res["params_trainable"] <= res["params_total"]
    assert 0 < res["gflops_without_enc_aux_heads"] < res["gflops"] < res["gflops_all"]
    # CPU: latency at batch 1 only.
    assert res["device"] == "cpu" and res["latency_ms"] > 0 and res["fps_b1"] > 0 and res["fps_b4"] is None


def test_no_fps_skips_timing_and_text_output_reads_well(capsys):
    assert cmd_cost(parse("tiny_deformable_detr", "--input", "128x160", "--no-fps")) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "parameters" in out and "latency" not in out


def test_table_lists_the_named_presets(capsys):
    argv = ("tiny_deformable_detr", "tiny_efficient_detr", "--table", "--input", "128x160", "--no-fps")
    assert cmd_cost(parse(*argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| tiny_")]
    assert [r.split("|")[1].strip() for r in rows] == ["tiny_deformable_detr", "tiny_efficient_detr"]
    assert "FPS" not in "\n".join(lines)


def test_table_columns_follow_the_device():
    base = {
        "preset": "p",
        "rho": 0.1,
        "params_paper": 41e6,
        "gflops": 100.0,
        "gflops_without_enc_aux_heads": 99.0,
        "gflops_all": 200.0,
        "input_mode": "fixed",
        "input": "3x850x1040",
        "device": "cuda",
    }
    gpu = format_table([{**base, "fps_b1": 20.0, "fps_b4": 25.0, "latency_ms": 50.0}])
    assert "| FPS" in gpu and "B4FPS" in gpu and "25.0" in gpu
    cpu = format_table([{**base, "device": "cpu", "fps_b1": 0.5, "fps_b4": None, "latency_ms": 2000.0}])
    assert "Latency b1 (ms)" in cpu and "2000" in cpu and "FPS" not in cpu


@pytest.mark.parametrize(
    "argv, message",
    [
        (("no_such_preset",), "unknown preset"),
        (("r50_deformable_detrr",), "did you mean r50_deformable_detr"),
        (("tiny_deformable_detr", "--input", "850"), "expected HEIGHTxWIDTH"),
        (("tiny_deformable_detr", "--input", "axb"), "expected HEIGHTxWIDTH"),
        (("tiny_deformable_detr", "--input", "16x900"), "at least 64"),
        (("tiny_deformable_detr", "--val", "0"), "positive"),
        (("tiny_deformable_detr", "--data", "/nowhere"), "only used with --val"),
        (("tiny_deformable_detr", "--set", "rho=abc"), "expected a number"),
        (("tiny_deformable_detr", "--set", "rho=0.2"), "needs two_stage=true"),
        (("tiny_deformable_detr", "--device", "tpu"), "--device"),
        ((), "give one PRESET"),
    ],
)
def test_user_errors_are_clear(argv, message):
    with pytest.raises(ConfigError, match=message):
        cmd_cost(parse(*argv))


def test_val_mode_with_a_missing_data_root_is_a_user_error(tmp_path):
    with pytest.raises(SdetrError, match="does not exist"):
        cmd_cost(parse("tiny_deformable_detr", "--val", "2", "--data", str(tmp_path / "none"), "--no-fps"))
