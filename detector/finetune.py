"""Fine-tuning: initialise a detector from a checkpoint trained on other classes.

``load_for_finetuning(model, checkpoint)`` copies every weight of an official ``.pth`` or an sdetr
checkpoint into ``model`` except the class-dependent layers when their class count differs; those keep the
official initialisation ``build_model`` gave them. Which layers depend on the classes:

* the Deformable DETR family (`SparseDETR`): every ``class_embed.i`` (decoder heads, the two-stage
  proposal head, Sparse DETR's encoder auxiliary heads) and their aliases under
  ``transformer.decoder.class_embed`` / ``transformer.encoder.class_embed``: a Linear with the focal
  bias prior ``-log((1 - 0.01) / 0.01)`` (all copies identical at init, as the official code);
* DETR: ``class_embed`` (num_classes + 1 outputs, the last one no-object), PyTorch's Linear init;
* Faster R-CNN: ``roi_heads.box_predictor`` (``cls_score`` and the class-specific ``bbox_pred``),
  torchvision's `FastRCNNPredictor` init.

Everything else must match key for key and shape for shape: a checkpoint of another architecture,
backbone or width is refused with a `CheckpointError` naming a few of the differing keys and their counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdetr.detector.checkpoint import model_state_dict, read_checkpoint
from sdetr.detector.errors import CheckpointError

FOCAL_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
# Module-name prefixes of the class-dependent layers, per architecture (state_dict keys start with these).
_CLASS_HEADS = {
    "deformable_detr": (
        "class_embed.",
        "transformer.decoder.class_embed.",
        "transformer.encoder.class_embed.",
    ),
    "detr": ("class_embed.",),
    "faster_rcnn": ("roi_heads.box_predictor.",),
}
_SHOWN = 4  # differing keys named in an error message


@dataclass
class LoadReport:
    """What `load_for_finetuning` did, key by key (state_dict keys of the model, aliases included).

    loaded: model keys whose values come from the checkpoint.
    reinitialised: class-dependent model keys left at their official initialisation (class count differs).
    skipped: checkpoint keys not loaded (the checkpoint's class-dependent tensors).
    """

    source: str
    arch: str
    checkpoint_classes: int
    model_classes: int
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"initialised from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.reinitialised)} re-initialised, {len(self.skipped)} skipped "
            f"(classes: checkpoint {self.checkpoint_classes}, model {self.model_classes})"
        ]
        if self.reinitialised:
            lines.append("  re-initialised (class-dependent): " + _show(self.reinitialised, 8))
        if self.skipped:
            lines.append("  skipped from the checkpoint: " + _show(self.skipped, 8))
        return "\n".join(lines)


def _show(keys: list[str], n: int = _SHOWN) -> str:
    return ", ".join(keys[:n]) + (f" … ({len(keys)} in all)" if len(keys) > n else "")


def model_arch(model: nn.Module) -> str:
    """``deformable_detr``, ``detr`` or ``faster_rcnn`` for a model `build_model` made."""
    from sdetr.detector.models.deformable_detr import SparseDETR
    from sdetr.detector.models.detr import DETR
    from sdetr.detector.models.faster_rcnn import FasterRCNNFPN

    for cls, arch in ((SparseDETR, "deformable_detr"), (DETR, "detr"), (FasterRCNNFPN, "faster_rcnn")):
        if isinstance(model, cls):
            return arch
    raise CheckpointError(f"fine-tuning: unknown model type {type(model).__name__}")


def class_dependent_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of ``model`` whose shape depends on the number of classes."""
    prefixes = _CLASS_HEADS[model_arch(model)]
    return [k for k in model.state_dict() if k.startswith(prefixes)]


@torch.no_grad()
def reinit_class_heads(model: nn.Module) -> None:
    """Give the class-dependent layers their official initialisation again (see the module docstring)."""
    arch = model_arch(model)
    if arch == "deformable_detr":
        # One fresh head copied into every slot: the official heads are deep copies of one Linear.
        first = model.class_embed[0]
        fresh = nn.Linear(first.in_features, first.out_features).to(first.weight.device)
        nn.init.constant_(fresh.bias, FOCAL_PRIOR_BIAS)
        for head in model.class_embed:
            head.weight.copy_(fresh.weight)
            head.bias.copy_(fresh.bias)
    elif arch == "detr":
        model.class_embed.reset_parameters()
    else:
        model.roi_heads.box_predictor.cls_score.reset_parameters()
        model.roi_heads.box_predictor.bbox_pred.reset_parameters()


def _num_classes(state: dict[str, torch.Tensor], arch: str) -> int:
    """Class count of a state_dict's head (DETR: without the no-object column)."""
    key = {"deformable_detr": "class_embed.0.bias", "detr": "class_embed.bias"}.get(
        arch, "roi_heads.box_predictor.cls_score.bias"
    )
    if key not in state:
        return -1
    return int(state[key].shape[0]) - (1 if arch == "detr" else 0)


def _mismatch_error(
    source: str, missing: list[str], unexpected: list[str], shapes: list[str]
) -> CheckpointError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} model keys missing from the checkpoint ({_show(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint keys the model lacks ({_show(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ ({_show(shapes)})")
    return CheckpointError(
        f"{source}: another architecture or backbone than this model: {'; '.join(parts)}. Fine-tuning "
        "re-initialises only the class-dependent layers; pick the preset the checkpoint was trained with"
    )


def load_for_finetuning(
    model: nn.Module,
    checkpoint: str | Path | dict[str, Any],
    reset_class_heads: bool | None = None,
    source: str | None = None,
) -> LoadReport:
    """Initialise ``model`` (fresh from `build_model`) from ``checkpoint`` for training on other classes.

    Args:
        model: the detector to fine-tune, with its own ``num_classes``; modified in place (only when the
            checkpoint fits: on error nothing is loaded).
        checkpoint: a ``.pth`` file (official: ``{"model", "args"}``; sdetr: ``{"model", "config", ...}``;
            Ray's ``state.pth``) or its already-read dict. Folders are resolved by the caller.
        reset_class_heads: None re-initialises the class-dependent layers when the class counts differ
            and loads them when they are equal; True always re-initialises them (same count, other
            categories); False refuses a differing count.
        source: how to name the checkpoint in messages (default: the path).
    Returns:
        a `LoadReport` (print it).
    """
    if isinstance(checkpoint, dict):
        obj, source = checkpoint, source or "checkpoint"
    else:
        obj, source = read_checkpoint(checkpoint), source or str(checkpoint)
    try:
        state = model_state_dict(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    arch = model_arch(model)
    own = model.state_dict()
    heads = set(class_dependent_keys(model))
    report = LoadReport(source, arch, _num_classes(state, arch), _num_classes(own, arch))

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in heads and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise _mismatch_error(source, missing, unexpected, shapes)

    differ = any(state[k].shape != own[k].shape for k in heads)
    if differ and reset_class_heads is False:
        raise CheckpointError(
            f"{source}: {report.checkpoint_classes} classes, the model has {report.model_classes}; "
            "the class-dependent layers would have to be re-initialised"
        )
    reset = differ if reset_class_heads is None else reset_class_heads
    if reset:
        reinit_class_heads(model)
        own = model.state_dict()
    new_state = {}
    for k, value in own.items():
        if reset and k in heads:
            new_state[k] = value
            report.reinitialised.append(k)
            report.skipped.append(k)
        else:
            new_state[k] = state[k]
            report.loaded.append(k)
    model.load_state_dict(new_state, strict=True)
    return report


def checkpoint_categories(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The category map a checkpoint was trained with (``CategoryMap.to_dict()`` under ``categories``),
    or None (official checkpoints, and sdetr runs from before category maps: raw COCO-style ids)."""
    cats = obj.get("categories")
    return cats if isinstance(cats, dict) else None
