"""Named presets, spelled like the official repositories' config files.

A preset is a small set of overrides on top of the `Config` defaults, so the defaults stay in one
place (config.py). `r50_*`/`swint_*` reproduce the official models exactly; `tiny_*` are narrow and
shallow variants for CPU work (ResNet-18, small images).

Beyond the official Sparse DETR configurations: Lite DETR's interleaved encoder as its released code
builds it (key-aware attention in the encoder and the decoder, keys from the value projection, offsets per
level, a d_model-wide feed-forward layer for the low-level tokens) on the two-stage + box refinement
detector, one preset per layout of the paper's Table 3 (`*_lite_detr_h3l1_3p1x2` = H3L1-(3+1)x2,
`*_lite_detr_h2l2_2p1x3` = H2L2-(2+1)x3, `*_lite_detr_h3l1_6p1x1` = H3L1-(6+1)x1,
`*_lite_detr_h3l1_2p1x3` = H3L1-(2+1)x3), and the baselines of the papers' tables: DETR (`r50_detr`)
and torchvision's Faster R-CNN + FPN (`r50_faster_rcnn_fpn`), each with a `tiny_` version.

`mini_*` (the README's demo) are as small as `tiny_*` to train but keep the R50 models' proportions: in
R50 Deformable DETR the encoder is half of the cost (86 of 173 GFLOPs), in `tiny_deformable_detr` 6 %,
so sparsifying the tiny encoder saves almost nothing. `mini_*` widen and deepen the encoder over the same
ResNet-18 (128 wide, 8 heads, 6 layers; 42 % of the cost) and train on smaller images.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from sdetr.detector.config import Config
from sdetr.detector.errors import ConfigError

RHOS = (0.1, 0.2, 0.3, 0.4, 0.5)

_BOX_REFINE = {"with_box_refine": True}
_TWO_STAGE = {"with_box_refine": True, "two_stage": True}
_EFFICIENT = {**_TWO_STAGE, "eff_query_init": True, "eff_specific_head": True}


def _sparse(rho: float) -> dict[str, Any]:
    return {**_EFFICIENT, "rho": rho, "use_enc_aux_loss": True}


# Preset suffix -> Lite DETR layout (the paper's names).
LITE_LAYOUTS = {
    "h3l1_3p1x2": "H3L1-(3+1)x2",
    "h2l2_2p1x3": "H2L2-(2+1)x3",
    "h3l1_6p1x1": "H3L1-(6+1)x1",
    "h3l1_2p1x3": "H3L1-(2+1)x3",
}


def _lite(layout: str) -> dict[str, Any]:
    # The released code's structure and attention (the config defaults: lite_structure=official,
    # proj_key=false, same_loc=false, small_expand=true); KDA in the decoder too, as released.
    return {**_TWO_STAGE, "encoder": "lite", "lite_layout": layout, "use_kda": True, "dec_use_kda": True}


_DETECTORS: dict[str, dict[str, Any]] = {
    "deformable_detr": {},
    "deformable_detr_plus_iterative_bbox_refinement": _BOX_REFINE,
    "deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage": _TWO_STAGE,
    "efficient_detr": _EFFICIENT,
    **{f"sparse_detr_rho_{rho}": _sparse(rho) for rho in RHOS},
    **{f"lite_detr_{suffix}": _lite(layout) for suffix, layout in LITE_LAYOUTS.items()},
}

# Small enough to train on 2 CPU cores in minutes: ResNet-18, a 64-wide transformer with 2+2 layers,
# images with a short side around 256 px. The synthetic data set has 5 categories (ids 1..5).
_TINY_MODEL = {
    "backbone": "resnet18",
    "backbone_freeze_early": False,
    "backbone_norm": "bn",
    "hidden_dim": 64,
    "nheads": 4,
    "enc_layers": 2,
    "dec_layers": 2,
    "dim_feedforward": 256,
    "dropout": 0.0,
    "num_queries": 50,
    "num_classes": 6,
}
_TINY_DATA = {
    "root": "data/synth",
    "train_scales": [192, 224, 256, 288],
    "train_max_size": 400,
    "crop_resize_scales": [160, 200, 240],
    "crop_min_size": 128,
    "crop_max_size": 240,
    "val_scale": 256,
    "val_max_size": 400,
    "num_workers": 1,
}
# From random init the backbone learns at the transformer's rate. The schedule fits the learning
# benchmark's 15 minutes on 2 CPU cores (1000 synthetic images per epoch).
_TINY_OPTIM = {"lr": 4e-4, "lr_backbone": 4e-4, "batch_size": 4, "epochs": 5, "lr_drop": 4}


# The tiny backbone under an encoder with R50 Deformable DETR's share of the cost: per token, 6 layers of
# width 128 (8 heads of 16, FFN 4x as in R50) cost about what ResNet-18 spends per token's 8x8..64x64
# pixels. Images with a short side of 160 px (the synthetic shapes stay >= 6 px) make a trial of a few
# hundred steps fit the README's demo on 2 CPU cores; no random crop, which a short schedule cannot afford.
_MINI_MODEL = {**_TINY_MODEL, "hidden_dim": 128, "nheads": 8, "enc_layers": 6, "dec_layers": 3,
               "dim_feedforward": 512}  # fmt: skip
_MINI_DATA = {
    **_TINY_DATA,
    "train_scales": [128, 144, 160, 176, 192],
    "train_max_size": 288,
    "random_crop": False,
    "val_scale": 160,
    "val_max_size": 288,
}
# Twice the tiny learning rate: the demo's trials get ~300 steps, and AdamW with clipping at 0.1 stays stable.
_MINI_OPTIM = {**_TINY_OPTIM, "lr": 8e-4, "lr_backbone": 8e-4}


# DETR (Carion et al.): C5 only, 6+6 dense layers with FFN 2048, 100 queries, softmax classes with
# a no-object column (eos_coef 0.1), matcher class cost 1, CE coefficient 1; lr 1e-4 / backbone 1e-5.
_DETR = {
    "model": {"arch": "detr", "dim_feedforward": 2048, "num_queries": 100},
    "loss": {"set_cost_class": 1.0, "cls_loss_coef": 1.0},
    "optim": {"lr": 1e-4, "lr_backbone": 1e-5, "sqrt_lr_scaling": False},
}
# torchvision's Faster R-CNN + FPN; it trains the whole network at one lr and without clipping.
_FASTER_RCNN = {
    "model": {"arch": "faster_rcnn"},
    "optim": {"lr": 1e-4, "lr_backbone": 1e-4, "sqrt_lr_scaling": False, "clip_max_norm": 0.0},
}
_BASELINES = {"detr": _DETR, "faster_rcnn_fpn": _FASTER_RCNN}
# Faster R-CNN uses only these of the tiny model's fields (the FPN is hidden_dim wide).
_TINY_RCNN_KEYS = ("backbone", "backbone_freeze_early", "backbone_norm", "hidden_dim", "num_classes")


def _build_table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, model in _DETECTORS.items():
        table[f"r50_{name}"] = {"model": {"backbone": "resnet50", **model}}
        table[f"swint_{name}"] = {"model": {"backbone": "swin_t", **model}}
        table[f"tiny_{name}"] = {
            "model": {**_TINY_MODEL, **model},
            "data": dict(_TINY_DATA),
            "optim": dict(_TINY_OPTIM),
        }
        table[f"mini_{name}"] = {
            "model": {**_MINI_MODEL, **model},
            "data": dict(_MINI_DATA),
            "optim": dict(_MINI_OPTIM),
        }
    for name, base in _BASELINES.items():
        table[f"r50_{name}"] = {**base, "model": {"backbone": "resnet50", **base["model"]}}
        tiny_model = _TINY_MODEL
        if base["model"]["arch"] == "faster_rcnn":
            tiny_model = {k: v for k, v in _TINY_MODEL.items() if k in _TINY_RCNN_KEYS}
        table[f"tiny_{name}"] = {
            **base,
            # The tiny sizes win over the baseline's (e.g. DETR's 100 queries and FFN 2048).
            "model": {**base["model"], **tiny_model},
            "data": dict(_TINY_DATA),
            "optim": {**base.get("optim", {}), **_TINY_OPTIM},
        }
    return table


PRESETS: dict[str, dict[str, Any]] = _build_table()


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Build the `Config` of a preset, then apply ``key=value`` overrides."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `sdetr model list` shows them all"
        raise ConfigError(f"unknown preset {name!r}{hint}")
    data = copy.deepcopy(PRESETS[name])
    cfg = Config.from_dict({"preset": name, **data}, source=f"preset {name}")
    return cfg.override(overrides)
