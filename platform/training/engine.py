"""One training epoch and one evaluation pass: shared by the single-process trainer and Ray workers."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sdetr.detector.errors import SdetrError
from sdetr.detector.evaluation.coco_eval import evaluate_detections, results_to_detections
from sdetr.detector.precision import amp_dtype

# Loss terms worth logging per step (the rest are per-layer copies of these); the last four are
# Faster R-CNN's.
LOGGED_LOSSES = (
    "loss_ce",
    "loss_bbox",
    "loss_giou",
    "loss_mask_prediction",
    "class_error",
    "loss_classifier",
    "loss_box_reg",
    "loss_objectness",
    "loss_rpn_box_reg",
)


def to_device(images, masks, targets, device):
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, masks, targets


def autocast(device: torch.device, amp: str):
    """``train.amp`` as an autocast context: bf16 on CPU or GPU, fp16 on a GPU (a ConfigError on CPU)."""
    dtype = amp_dtype(amp, device.type)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class NonFiniteLoss(SdetrError):
    pass


def _forward_train(model: nn.Module, images, masks, targets):
    """``model(images, masks)``; models that compute their own losses (``takes_targets``, e.g. Faster
    R-CNN) also get the targets. Looks through a DDP wrapper."""
    if getattr(getattr(model, "module", model), "takes_targets", False):
        return model(images, masks, targets)
    return model(images, masks)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    clip_max_norm: float = 0.1,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start_step: int = 0,
    deadline: float | None = None,
    progress=None,
) -> dict[str, float]:
    """Train over ``loader`` (which already skips the first ``start_step`` batches when resuming).

    ``on_step(step, metrics)`` is called after every optimiser step with step = batches done this epoch.
    Stops early (returning what it has) when ``time.monotonic()`` passes ``deadline``.
    Returns the epoch's mean of the weighted total loss and the main loss terms.
    """
    model.train()
    criterion.train()
    sums: dict[str, float] = defaultdict(float)
    count = 0
    step = start_step
    for images, masks, targets in loader:
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast(device, amp):
            outputs = _forward_train(model, images, masks, targets)
        # Losses in fp32: the Hungarian matcher and focal loss are sensitive to half precision.
        outputs = to_float32(outputs)
        loss_dict = criterion(outputs, targets)
        loss = criterion.weighted_total(loss_dict)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(
                f"loss is {loss.item()} at step {step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items() if k in LOGGED_LOSSES)
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = None
        if clip_max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        count += 1
        metrics = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
        metrics.update({k: float(v.detach()) for k, v in loss_dict.items() if k in LOGGED_LOSSES})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for k, v in metrics.items():
            sums[k] += v
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, metrics)
        if deadline is not None and time.monotonic() > deadline:
            break
    return {k: v / max(count, 1) for k, v in sums.items()} | {"steps": float(count)}


def to_float32(obj: Any) -> Any:
    """The model's outputs (nested dicts, lists and tuples of tensors) with floating tensors in fp32: what
    the criterion and the post-processing get after an autocast forward."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_float32(v) for v in obj]
    if type(obj) is tuple:  # not a named tuple, whose constructor takes fields
        return tuple(to_float32(v) for v in obj)
    return obj


@torch.no_grad()
def predict(
    model: nn.Module,
    postprocess: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: str = "none",
    label_ids=None,
):
    """Run the model over ``loader``; returns COCO-format detections (a plain, picklable list), labels
    mapped to category ids through ``label_ids`` (a `CategoryMap`'s; None: label = category id)."""
    model.eval()
    detections: list[dict] = []
    for images, masks, targets in loader:
        images, masks, targets = to_device(images, masks, targets, device)
        with autocast(device, amp):
            outputs = model(images, masks)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocess(to_float32(outputs), orig_sizes)
        by_image = {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}
        detections.extend(results_to_detections(by_image, label_ids=label_ids))
    return detections


def evaluate(
    model: nn.Module,
    postprocess: nn.Module,
    loader: Iterable,
    coco_gt,
    device: torch.device,
    image_ids: list[int] | None = None,
    amp: str = "none",
    label_ids=None,
) -> dict[str, float] | None:
    """COCO AP over ``loader``. Under torch.distributed each rank predicts its share and rank 0
    evaluates the gathered detections (other ranks get None)."""
    detections = predict(model, postprocess, loader, device, amp, label_ids)
    if dist.is_available() and dist.is_initialized():
        gathered: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, detections)
        if dist.get_rank() != 0:
            return None
        detections = [d for part in gathered for d in (part or [])]
    return evaluate_detections(coco_gt, detections, image_ids=image_ids)
