"""Named presets, spelled like the official repositories' config files.

A preset is a small set of overrides on top of the `Config` defaults, so the defaults stay in one
place (config.py). `r50_*`/`swint_*` reproduce the official models exactly; `tiny_*` are narrow and
shallow variants for CPU work (ResNet-18, small images).
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


_DETECTORS: dict[str, dict[str, Any]] = {
    "deformable_detr": {},
    "deformable_detr_plus_iterative_bbox_refinement": _BOX_REFINE,
    "deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage": _TWO_STAGE,
    "efficient_detr": _EFFICIENT,
    **{f"sparse_detr_rho_{rho}": _sparse(rho) for rho in RHOS},
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
