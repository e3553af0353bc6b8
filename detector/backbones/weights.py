"""Backbone weights: torchvision's ImageNet weights, local files and SCRL checkpoints, renamed for our bodies.

``model.backbone_weights``:
  * ``none``: random initialisation;
  * ``imagenet``: torchvision's ImageNet weights (downloaded, or read from the torch hub cache);
  * a path: an SCRL checkpoint (``online_network_state_dict`` with ``encoder.*`` keys, as the official
    ``--scrl_pretrained_path``) or a backbone state_dict with torchvision or official names, optionally
    wrapped in ``model``/``state_dict`` or prefixed ``backbone.0.body.`` (a whole detector checkpoint).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from sdetr.detector.backbones.resnet import RESNETS
from sdetr.detector.checkpoint import read_checkpoint
from sdetr.detector.errors import CheckpointError

log = logging.getLogger(__name__)

_IMAGENET_WEIGHTS = {
    # The official repo used torchvision's pretrained=True, i.e. the V1 weights.
    "resnet18": lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": lambda: torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": lambda: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "swin_t": lambda: torchvision.models.Swin_T_Weights.IMAGENET1K_V1,
}

_SCRL_ENCODER = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

# Checkpoint keys with no counterpart in the detection backbone (classification heads, Swin's final
# norm and the classification Swin's precomputed attn_mask buffers): dropped without complaint.
_IGNORED = re.compile(r"^(fc|head|norm)\.|\.attn_mask$")
# Model keys that a pretraining checkpoint legitimately lacks: Swin's detection output norms.
_MAY_BE_MISSING = re.compile(r"^norm\d+\.|\.num_batches_tracked$")


def load_imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``name``, renamed for our body; CheckpointError when offline."""
    weights = _IMAGENET_WEIGHTS[name]()
    try:
        state_dict = weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket/SSL errors, a truncated cache file...
        file = weights.url.rsplit("/", 1)[-1]
        raise CheckpointError(
            f"backbone_weights 'imagenet': cannot get {name}'s ImageNet weights from {weights.url} "
            f"(no network? {type(exc).__name__}: {exc}). Download that file on a machine with internet "
            f"and set model.backbone_weights=/path/to/{file} "
            f"(or put it in {torch.hub.get_dir()}/checkpoints/)"
        ) from None
    return translate_torchvision_swin(state_dict) if name == "swin_t" else state_dict


def read_backbone_weights(path: str | Path, name: str) -> dict[str, Tensor]:
    """The backbone state_dict of the local file ``path``, with the names of ``name``'s body."""
    try:
        # The project's one reading policy: CPU, weights only (plus the official args Namespace).
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"model.backbone_weights: {exc}") from None
    return extract_backbone_state_dict(ckpt, name, str(path))


def extract_backbone_state_dict(ckpt: Any, name: str, source: str) -> dict[str, Tensor]:
    """Find the backbone weights in a loaded checkpoint and give them our body's names."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"backbone_weights {source!r}: expected a dict of tensors, got {type(ckpt).__name__}"
        )
    if "online_network_state_dict" in ckpt:  # SCRL
        if name not in RESNETS:
            raise CheckpointError(
                f"backbone_weights {source!r}: an SCRL (ResNet) checkpoint, but backbone is {name}"
            )
        state_dict = {}
        for key, value in ckpt["online_network_state_dict"].items():
            if not key.startswith("encoder."):  # projector / predictor heads
                continue
            index, rest = key[len("encoder.") :].split(".", 1)
            if index not in _SCRL_ENCODER:
                raise CheckpointError(f"backbone_weights {source!r}: unexpected SCRL encoder key {key!r}")
            state_dict[f"{_SCRL_ENCODER[index]}.{rest}"] = value
        return state_dict

    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    state_dict = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state_dict:
        raise CheckpointError(f"backbone_weights {source!r}: no tensors found (keys: {_preview(ckpt)})")
    for prefix in ("module.", "backbone.0.body."):  # DDP wrapper; a whole detector checkpoint
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if name == "swin_t" and any(k.startswith("features.") for k in state_dict):
        state_dict = translate_torchvision_swin(state_dict)
    return state_dict


def load_backbone_weights(body: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``body``, failing loudly on anything but the expected gaps.

    Classification-only keys (`_IGNORED`) are dropped, and Swin's detection output norms may be absent;
    any other missing or unexpected key, or a shape mismatch, raises a CheckpointError listing them.
    """
    state_dict = {k: v for k, v in state_dict.items() if not _IGNORED.search(k)}
    own = body.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    result = body.load_state_dict(state_dict, strict=False) if not mismatched else None
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_preview(mismatched)}")
    else:
        missing = [k for k in result.missing_keys if not _MAY_BE_MISSING.search(k)]
        if missing:
            problems.append(f"missing keys: {_preview(missing)}")
        if result.unexpected_keys:
            problems.append(f"unexpected keys: {_preview(result.unexpected_keys)}")
    if problems:
        raise CheckpointError(
            f"backbone_weights {source!r} does not fit the backbone: " + "; ".join(problems)
        )
    loaded = len(state_dict)
    log.info(
        "backbone: loaded %d tensors from %s (%d model keys left at init)",
        loaded,
        source,
        len(result.missing_keys),
    )


def _preview(items, limit: int = 8) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


# torchvision's SwinTransformer.features is [patch embedding, stage 0, merge 0, stage 1, merge 1, ...].
_TV_MLP = {"0": "fc1", "3": "fc2"}


def translate_torchvision_swin(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``swin_t/s/b`` state_dict to the official detection Swin names.

    The classification head (``head.*``) and final ``norm.*`` have no counterpart and are dropped; the
    detection output norms ``norm1..3`` are therefore absent (the official ImageNet loading leaves them
    freshly initialised too). ``relative_position_index`` is stored flat by torchvision and reshaped.
    Keys that match no known pattern are kept unchanged so that the loader can report them.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "norm.")):
            continue
        new = _translate_tv_key(key)
        if new.endswith("relative_position_index") and value.dim() == 1:
            n = int(round(value.numel() ** 0.5))
            value = value.view(n, n)
        out[new] = value
    return out


def _translate_tv_key(key: str) -> str:
    m = re.fullmatch(r"features\.0\.(0|2)\.(\w+)", key)
    if m:
        return f"patch_embed.{'proj' if m[1] == '0' else 'norm'}.{m[2]}"
    m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if not m:
        return key
    index, rest = int(m[1]), m[2]
    stage = (index - 1) // 2
    if index % 2 == 0:  # a PatchMerging: same inner names
        return f"layers.{stage}.downsample.{rest}"
    block, sub = rest.split(".", 1)
    mlp = re.fullmatch(r"mlp\.(\d+)\.(\w+)", sub)
    if mlp and mlp[1] in _TV_MLP:
        sub = f"mlp.{_TV_MLP[mlp[1]]}.{mlp[2]}"
    return f"layers.{stage}.blocks.{block}.{sub}"
