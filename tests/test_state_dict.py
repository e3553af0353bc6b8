"""The presets' state_dicts have exactly the official key trees and the published parameter counts.

`official_keys` rebuilds the expected key → shape table from the structure of the official code
(kakaobrain/sparse-detr and fundamentalvision/Deformable-DETR), independently of sdetr's modules.
"""

from __future__ import annotations

import pytest
import torchvision

from sdetr.detector.build import build_model, count_parameters
from sdetr.detector.config import ModelConfig
from sdetr.detector.presets import get_preset

D, FFN, LEVELS, HEADS, POINTS, QUERIES, CLASSES = 256, 1024, 4, 8, 4, 300, 91


def _linear(prefix: str, n_in: int, n_out: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def _norm(prefix: str, n: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _msda(prefix: str) -> dict[str, tuple]:
    return {
        **_linear(f"{prefix}.sampling_offsets", D, HEADS * LEVELS * POINTS * 2),
        **_linear(f"{prefix}.attention_weights", D, HEADS * LEVELS * POINTS),
        **_linear(f"{prefix}.value_proj", D, D),
        **_linear(f"{prefix}.output_proj", D, D),
    }


def _heads(prefix: str, indices) -> dict[str, tuple]:
    out = {}
    for new, _ in enumerate(indices):
        out.update(_linear(f"{prefix}class_embed.{new}", D, CLASSES))
        for j, (a, b) in enumerate([(D, D), (D, D), (D, 4)]):
            out.update(_linear(f"{prefix}bbox_embed.{new}.layers.{j}", a, b))
    return out


def _resnet50_keys() -> dict[str, tuple]:
    sd = torchvision.models.resnet50(weights=None).state_dict()
    return {
        f"backbone.0.body.{k}": tuple(v.shape)
        for k, v in sd.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _swin_t_keys() -> dict[str, tuple]:
    out = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.proj.bias": (96,),
        **_norm("patch_embed.norm", 96),
    }
    dims, depths, heads = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]
    for i, (dim, depth, nh) in enumerate(zip(dims, depths, heads)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            out.update(_norm(f"{p}.norm1", dim))
            out[f"{p}.attn.relative_position_bias_table"] = (169, nh)
            out[f"{p}.attn.relative_position_index"] = (49, 49)
            out.update(_linear(f"{p}.attn.qkv", dim, 3 * dim))
            out.update(_linear(f"{p}.attn.proj", dim, dim))
            out.update(_norm(f"{p}.norm2", dim))
            out.update(_linear(f"{p}.mlp.fc1", dim, 4 * dim))
            out.update(_linear(f"{p}.mlp.fc2", 4 * dim, dim))
        if i < 3:
            out[f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            out.update(_norm(f"layers.{i}.downsample.norm", 4 * dim))
    for i, dim in zip((1, 2, 3), (192, 384, 768)):
        out.update(_norm(f"norm{i}", dim))
    return {f"backbone.0.body.{k}": v for k, v in out.items()}


def official_keys(m: ModelConfig) -> dict[str, tuple]:
    keys = _resnet50_keys() if m.backbone == "resnet50" else _swin_t_keys()
    channels = [512, 1024, 2048] if m.backbone == "resnet50" else [192, 384, 768]
    for lvl, c in enumerate(channels):
        keys[f"input_proj.{lvl}.0.weight"] = (D, c, 1, 1)
        keys[f"input_proj.{lvl}.0.bias"] = (D,)
        keys.update(_norm(f"input_proj.{lvl}.1", D))
    keys["input_proj.3.0.weight"] = (D, channels[-1], 3, 3)
    keys["input_proj.3.0.bias"] = (D,)
    keys.update(_norm("input_proj.3.1", D))

    t = "transformer"
    keys[f"{t}.level_embed"] = (LEVELS, D)
    for i in range(6):
        p = f"{t}.encoder.layers.{i}"
        keys.update(_msda(f"{p}.self_attn"))
        keys.update({**_norm(f"{p}.norm1", D), **_norm(f"{p}.norm2", D)})
        keys.update({**_linear(f"{p}.linear1", D, FFN), **_linear(f"{p}.linear2", FFN, D)})
        p = f"{t}.decoder.layers.{i}"
        keys.update(_msda(f"{p}.cross_attn"))
        keys[f"{p}.self_attn.in_proj_weight"] = (3 * D, D)
        keys[f"{p}.self_attn.in_proj_bias"] = (3 * D,)
        keys.update(_linear(f"{p}.self_attn.out_proj", D, D))
        keys.update({**_norm(f"{p}.norm1", D), **_norm(f"{p}.norm2", D), **_norm(f"{p}.norm3", D)})
        keys.update({**_linear(f"{p}.linear1", D, FFN), **_linear(f"{p}.linear2", FFN, D)})
    if m.two_stage:
        keys.update({**_linear(f"{t}.enc_output", D, D), **_norm(f"{t}.enc_output_norm", D)})
        pos = D if m.eff_query_init else 2 * D
        keys.update({**_linear(f"{t}.pos_trans", 2 * D, pos), **_norm(f"{t}.pos_trans_norm", pos)})
    else:
        keys.update(_linear(f"{t}.reference_points", D, 2))
        keys["query_embed.weight"] = (QUERIES, 2 * D)
    if m.rho:
        mp = f"{t}.enc_mask_predictor"
        keys.update({**_norm(f"{mp}.layer1.0", D), **_linear(f"{mp}.layer1.1", D, D)})
        keys.update(_linear(f"{mp}.layer2.0", D, D // 2))
        keys.update(_linear(f"{mp}.layer2.2", D // 2, D // 4))
        keys.update(_linear(f"{mp}.layer2.4", D // 4, 1))

    n_heads = 6 + int(m.two_stage) + (5 if m.use_enc_aux_loss else 0)
    keys.update(_heads("", range(n_heads)))
    if m.with_box_refine or m.two_stage:
        heads = _heads(f"{t}.decoder.", range(n_heads))
        keys.update({k: v for k, v in heads.items() if ".bbox_embed." in k})
        if m.two_stage:
            keys.update({k: v for k, v in heads.items() if ".class_embed." in k})
    if m.use_enc_aux_loss:
        keys.update(_heads(f"{t}.encoder.", range(n_heads - 5, n_heads)))
    return keys


OFFICIAL_PRESETS = [
    "r50_deformable_detr",
    "r50_deformable_detr_plus_iterative_bbox_refinement",
    "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage",
    "r50_efficient_detr",
    "r50_sparse_detr_rho_0.1",
    "r50_sparse_detr_rho_0.5",
    "swint_deformable_detr",
    "swint_efficient_detr",
    "swint_sparse_detr_rho_0.3",
]


@pytest.mark.parametrize("preset", OFFICIAL_PRESETS)
def test_state_dict_matches_official_tree(preset):
    cfg = get_preset(preset).model
    model = build_model(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_keys(cfg)
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_shared_heads_alias_one_tensor():
    model = build_model(get_preset("r50_deformable_detr").model)
    sd = model.state_dict()
    assert sd["class_embed.0.weight"].data_ptr() == sd["class_embed.5.weight"].data_ptr()
    refined = build_model(get_preset("r50_sparse_detr_rho_0.1").model).state_dict()
    assert refined["class_embed.0.weight"].data_ptr() != refined["class_embed.1.weight"].data_ptr()
    assert (
        refined["transformer.encoder.class_embed.0.weight"].data_ptr()
        == refined["class_embed.7.weight"].data_ptr()
    )
    assert (
        refined["transformer.decoder.bbox_embed.6.layers.2.bias"].data_ptr()
        == refined["bbox_embed.6.layers.2.bias"].data_ptr()
    )


# Published trainable parameter counts (millions, one decimal), and the exact counts they round from.
PUBLISHED = {
    "r50_deformable_detr": (39.8, 39_847_265),
    "r50_efficient_detr": (40.8, 40_827_289),
    "r50_sparse_detr_rho_0.1": (40.9, 40_934_810),
    "swint_deformable_detr": (40.3, 40_308_613),
    "swint_efficient_detr": (41.3, 41_288_637),
    "swint_sparse_detr_rho_0.1": (41.4, 41_396_158),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_trainable_parameter_counts(preset):
    published, exact = PUBLISHED[preset]
    model = build_model(get_preset(preset).model)
    count = count_parameters(model, trainable_only=True, include_enc_aux_heads=False)
    assert round(count / 1e6, 1) == published
    assert count == exact
    if "sparse" in preset:
        # The encoder aux heads (5 class + 5 box heads) are trained but not counted in the paper.
        per_head = (D * CLASSES + CLASSES) + 2 * (D * D + D) + (D * 4 + 4)
        assert count_parameters(model) - count == 5 * per_head
