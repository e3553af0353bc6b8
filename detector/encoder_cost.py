"""The transformer encoder's cost alone, and its share of Deformable DETR's encoder (Lite DETR's measure).

Lite DETR compares detectors by their encoder GFLOPs (the paper's Table 3: Deformable DETR's encoder 90
GFLOPs, its H3L1-(3+1)x2 35). `encoder_cost` counts the encoder of a configuration on its own, in the
papers' convention (`sdetr.detector.cost`), at the token grid an ``H x W`` image gives (one unpadded
image: strides 8, 16, 32 and 64, each side rounded up as the backbone's stride-2 convolutions do), against
the dense 6-layer Deformable DETR encoder of the same width, levels and points. The encoder alone runs in
seconds where a whole R50 detector at 850 x 1040 takes a minute on a CPU; its count equals the
``encoder`` part of `count_flops` on the whole detector (tested).
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdetr.detector.config import Config, ModelConfig
from sdetr.detector.cost import _CUSTOM_MAPPING, FIXED_INPUT_HW, _papers

# Lite DETR (Li et al., CVPR 2023), Table 3, R50, 50 epochs: layout -> (AP, GFLOPs, encoder GFLOPs), and
# Deformable DETR's (46.8 AP, 177 GFLOPs, encoder 90), in the paper's order.
PAPER_TABLE3 = {
    "Deformable DETR": (46.8, 177.0, 90.0),
    "H2L2-(2+1)x3": (45.8, 108.0, 23.0),
    "H3L1-(6+1)x1": (45.9, 115.0, 30.0),
    "H3L1-(3+1)x2": (46.2, 119.0, 35.0),
    "H3L1-(2+1)x3": (46.7, 123.0, 39.0),
}


def level_shapes(input_hw: tuple[int, int], num_levels: int) -> list[tuple[int, int]]:
    """Token grid of each level for an ``H x W`` image: stride 8 (C3), then halved per level, rounded up
    (a stride-2 convolution with padding 1 maps n to ceil(n / 2))."""
    h, w = input_hw
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    shapes = []
    for _ in range(num_levels):
        shapes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return shapes


def reference_config(cfg: ModelConfig) -> ModelConfig:
    """Deformable DETR's encoder for ``cfg``: dense, 6 layers (the paper's), same width, levels and points."""
    ref = copy.deepcopy(cfg)
    ref.encoder, ref.enc_layers, ref.rho = "deformable", 6, 0.0
    ref.use_kda = ref.dec_use_kda = ref.proj_key = ref.same_loc = ref.use_enc_aux_loss = False
    return ref


@torch.no_grad()
def encoder_flops(cfg: ModelConfig, input_hw: tuple[int, int] = FIXED_INPUT_HW, seed: int = 0) -> float:
    """FLOPs (papers' convention) of the eval-mode transformer encoder of ``cfg`` on random tokens of the
    grid of one ``H x W`` image (no padding). Dense encoders only (Sparse DETR's cost depends on ρ·tokens)."""
    from sdetr.detector import ops
    from sdetr.detector.build import build_model

    if cfg.arch != "deformable_detr" or cfg.rho > 0:
        raise ValueError(
            "encoder_flops: dense Deformable DETR-family encoders only (arch=deformable_detr, rho=0)"
        )
    encoder = build_model(cfg).transformer.encoder.eval()
    shapes = level_shapes(input_hw, cfg.num_feature_levels)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, int(sizes.sum()), cfg.hidden_dim, generator=g)
    pos = torch.randn(src.shape, generator=g)
    valid_ratios = torch.ones(1, len(shapes), 2)
    mask = torch.zeros(src.shape[:2], dtype=torch.bool)
    # Loading the compiled ops registers their FLOP formulas; FlopCounterMode copies the registry when built.
    ops.use_compiled(src)
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_MAPPING)
    with counter:
        encoder(src, spatial_shapes, level_start_index, valid_ratios, pos, mask)
    counts = Counter(counter.flop_counts["Global"])
    return float(sum(_papers(op, n) for op, n in counts.items()))


def encoder_cost(
    cfg: Config | ModelConfig,
    input_hw: tuple[int, int] = FIXED_INPUT_HW,
    reference_gflops: float | None = None,
) -> dict:
    """``{"encoder_gflops", "reference_gflops", "share"}``: the encoder of ``cfg`` and Deformable DETR's
    (`reference_config`) at ``input_hw``; pass ``reference_gflops`` to reuse a count for several presets
    of one width."""
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    enc = encoder_flops(model_cfg, input_hw) / 1e9
    if reference_gflops is None:
        reference_gflops = encoder_flops(reference_config(model_cfg), input_hw) / 1e9
    return {"encoder_gflops": enc, "reference_gflops": reference_gflops, "share": enc / reference_gflops}


def lite_encoder_table(backbone: str = "r50", input_hw: tuple[int, int] = FIXED_INPUT_HW) -> list[dict]:
    """One row per Lite DETR layout preset (``<backbone>_lite_detr_*``), in the paper's order, with the
    paper's encoder GFLOPs and share beside the measured ones."""
    from sdetr.detector.presets import LITE_LAYOUTS, get_preset

    by_layout = {layout: suffix for suffix, layout in LITE_LAYOUTS.items()}
    paper_ref = PAPER_TABLE3["Deformable DETR"][2]
    rows, reference = [], None
    for layout in (k for k in PAPER_TABLE3 if k in by_layout):
        preset = f"{backbone}_lite_detr_{by_layout[layout]}"
        cost = encoder_cost(get_preset(preset), input_hw, reference)
        reference = cost["reference_gflops"]
        paper_enc = PAPER_TABLE3[layout][2]
        rows.append(
            {
                "preset": preset,
                "layout": layout,
                **cost,
                "paper_encoder_gflops": paper_enc,
                "paper_share": paper_enc / paper_ref,
            }
        )
    return rows
