"""Reading and writing checkpoints, including the official Sparse DETR / Deformable DETR ones."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdetr.detector.errors import CheckpointError

if TYPE_CHECKING:
    from sdetr.detector.config import ModelConfig


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``.pth`` on the CPU without executing arbitrary pickled code.

    Official checkpoints carry their argparse ``Namespace`` under ``args``; that one class is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def model_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: under ``model`` (official and sdetr) or the dict itself."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no 'model' state_dict of tensors")
    return state


def load_model_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load an official or sdetr checkpoint into ``model``; returns the whole checkpoint dict.

    Errors list the missing / unexpected keys and shape mismatches instead of torch's wall of text.
    """
    obj = read_checkpoint(path)
    state = model_state_dict(obj)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):

        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … ({len(items)} in all)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise CheckpointError(
            f"{path}: does not fit this model ({'; '.join(parts)}); is it the right preset?"
        )
    model.load_state_dict(state, strict=strict)
    return obj


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Official argparse flag → sdetr ModelConfig field (same name unless listed).
_OFFICIAL_BACKBONES = {"resnet50": "resnet50", "swin-t": "swin_t", "swin_t": "swin_t"}
_OFFICIAL_FLAGS = (
    "dilation", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout",
    "num_feature_levels", "enc_n_points", "dec_n_points", "num_queries", "aux_loss", "with_box_refine",
    "two_stage", "eff_query_init", "eff_specific_head", "rho", "use_enc_aux_loss",
)  # fmt: skip


def model_config_from_official_args(args: argparse.Namespace | dict) -> ModelConfig:
    """The ModelConfig of an official checkpoint, from the ``args`` it was saved with."""
    from sdetr.detector.config import ModelConfig

    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    cfg = ModelConfig()
    backbone = str(values.get("backbone", "resnet50"))
    if backbone not in _OFFICIAL_BACKBONES:
        raise CheckpointError(f"official checkpoint uses backbone {backbone!r}, which sdetr does not build")
    cfg.backbone = _OFFICIAL_BACKBONES[backbone]
    for name in _OFFICIAL_FLAGS:
        if name in values and values[name] is not None:
            setattr(cfg, name, type(getattr(cfg, name))(values[name]))
    if values.get("dataset_file", "coco") != "coco":
        raise CheckpointError(f"official checkpoint was trained on {values['dataset_file']!r}, not COCO")
    return cfg
