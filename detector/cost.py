"""Cost model: parameters, GFLOPs in the papers' convention, and speed (FPS / latency).

GFLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` and reported in the convention of the
Deformable / Sparse DETR papers, i.e. fvcore's ``FlopCountAnalysis`` as the official ``util/benchmark.py``
ran it (model in eval mode, deformable attention on its ``grid_sample`` path):

* convolutions, linear layers and matrix products (``mm``, ``addmm``, ``bmm``, attention): one
  multiply-add = one FLOP. FlopCounterMode counts two, so these are halved;
* bilinear sampling (``grid_sample``, or the compiled deformable-attention op, whose FLOP formula is
  registered in `sdetr.detector.ops`): 4 per sampled value (registered at 2x, halved like a matmul);
* fvcore's default handles for LayerNorm / GroupNorm (5 per element with affine, 4 without), BatchNorm
  (eval: 2 or 1 per element), nearest / bilinear upsampling (1 / 4 per output element) and adaptive
  average pooling (1 per input element): counted as fvcore does. FlopCounterMode has no formula for
  them, so they are registered here;
* every other element-wise op (add, mul, softmax, sigmoid, ReLU, top-k, gather, scatter...) is 0.

``gflops_all`` is the plain total: multiply and add counted separately (FlopCounterMode's convention,
2 per multiply-add, 8 per bilinear sample) plus the same per-element estimates for the norm and
resampling ops.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections import Counter

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

FIXED_INPUT_HW = (850, 1040)  # the official "approximated" mode: one random 3 x 850 x 1040 image


# --------------------------------------------------------------------------------------------------
# FLOP formulas FlopCounterMode lacks. Arguments arrive as shapes (tensors) or values (the rest).
# --------------------------------------------------------------------------------------------------
def _grid_sampler_flop(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    # fvcore: 4 per output value ("assume bilinear"); x2 so that it halves like the compiled op's formula.
    return 2 * 4 * math.prod(out_shape)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # The CPU flash kernel is missing from torch's registry; same count as the CUDA kernels (two bmm's).
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _norm_flop(affine_index: int):
    def flop(*args, out_shape=None, **kwargs) -> int:
        return math.prod(args[0]) * (5 if args[affine_index] is not None else 4)

    return flop


def _batch_norm_flop(training_index: int | None):
    def flop(*args, out_shape=None, **kwargs) -> int:
        if training_index is not None and args[training_index]:
            return _norm_flop(1)(*args)
        return math.prod(args[0]) * (2 if args[1] is not None else 1)

    return flop


def _per_output(scale: int):
    return lambda *args, out_shape=None, **kwargs: scale * math.prod(out_shape)


def _per_input(scale: int):
    return lambda *args, out_shape=None, **kwargs: scale * math.prod(args[0])


# Ops already counted per element in fvcore's units: not halved in the papers' convention.
_PER_ELEMENT = {
    aten.native_layer_norm: _norm_flop(2),
    aten.native_group_norm: _norm_flop(1),
    aten.native_batch_norm: _batch_norm_flop(5),
    aten._native_batch_norm_legit: _batch_norm_flop(5),
    aten._native_batch_norm_legit_no_training: _batch_norm_flop(None),
    aten.cudnn_batch_norm: _batch_norm_flop(5),
    aten.upsample_nearest2d: _per_output(1),
    aten.upsample_bilinear2d: _per_output(4),
    aten._adaptive_avg_pool2d: _per_input(1),
}
_FORMULAS = {
    aten.grid_sampler_2d: _grid_sampler_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    **_PER_ELEMENT,
}
# FlopCounterMode decomposes any op *overload* missing from its registry before counting (and so would
# lose upsample_nearest2d to index ops): list the overloads too. Counts are booked per packet.
_CUSTOM_MAPPING = {
    **_FORMULAS,
    **{getattr(p, o): f for p, f in _FORMULAS.items() for o in p.overloads()},
}


@dataclasses.dataclass
class FlopReport:
    """FLOPs of one forward pass (or the mean of several).

    total: papers' convention (fvcore's); total_all: plain total (see the module docstring).
    by_op: papers' convention per op (``addmm``, ``convolution``, ``ms_deform_attn``, ...).
    by_part: papers' convention per disjoint part of the detector, summing to ``total``: backbone,
    input_proj, encoder (its layers), enc_aux_heads (Sparse DETR's encoder auxiliary heads, which the
    model also runs in eval mode), decoder (with its box-refinement heads), transformer_other (two-stage
    proposals, scoring network, query init) and heads (everything else: the detection heads). Faster
    R-CNN: backbone (with the FPN), rpn, roi_heads, heads (the rest, ~0).
    """

    total: float
    total_all: float
    by_op: dict[str, float]
    by_part: dict[str, float]

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def gflops_all(self) -> float:
        return self.total_all / 1e9

    @property
    def gflops_without_enc_aux_heads(self) -> float:
        return (self.total - self.by_part.get("enc_aux_heads", 0.0)) / 1e9

    @staticmethod
    def mean(reports: list[FlopReport]) -> FlopReport:
        def avg(dicts):
            keys = dict.fromkeys(k for d in dicts for k in d)
            return {k: sum(d.get(k, 0) for d in dicts) / len(dicts) for k in keys}

        return FlopReport(
            total=sum(r.total for r in reports) / len(reports),
            total_all=sum(r.total_all for r in reports) / len(reports),
            by_op=avg([r.by_op for r in reports]),
            by_part=avg([r.by_part for r in reports]),
        )


def _papers(op, count: int) -> int:
    return count if op in _PER_ELEMENT else count // 2


def _op_name(op) -> str:
    return str(op).split(".", 1)[-1]  # "aten.addmm" -> "addmm", "sdetr.ms_deform_attn" -> "ms_deform_attn"


def _hooked_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Modules whose forward calls are metered for the breakdown (nested: encoder holds enc_aux_heads,
    transformer holds encoder and decoder). Parts the model lacks are left out."""
    t = getattr(model, "transformer", None)
    enc = getattr(t, "encoder", None)
    aux = [*enc.class_embed, *enc.bbox_embed] if getattr(enc, "aux_heads", False) else []
    proj = getattr(model, "input_proj", None)  # one conv per level, or DETR's single conv
    found = {
        "backbone": [getattr(model, "backbone", None)],
        "input_proj": list(proj) if isinstance(proj, nn.ModuleList) else [proj],
        "encoder": [enc],
        "enc_aux_heads": aux,
        "decoder": [getattr(t, "decoder", None)],
        "transformer": [t],
        "rpn": [getattr(model, "rpn", None)],
        "roi_heads": [getattr(model, "roi_heads", None)],
    }
    return {k: [m for m in v if m is not None] for k, v in found.items() if any(m is not None for m in v)}


def _disjoint_parts(nested: dict[str, float], total: float) -> dict[str, float]:
    parts = dict(nested)
    if "enc_aux_heads" in parts:
        parts["encoder"] -= parts["enc_aux_heads"]
    if "transformer" in parts:
        inner = sum(parts.get(k, 0.0) for k in ("encoder", "enc_aux_heads", "decoder"))
        parts["transformer_other"] = parts.pop("transformer") - inner
    parts["heads"] = total - sum(parts.values())
    order = (
        "backbone",
        "input_proj",
        "encoder",
        "enc_aux_heads",
        "decoder",
        "transformer_other",
        "rpn",
        "roi_heads",
        "heads",
    )
    return {k: parts[k] for k in order if k in parts}


@torch.no_grad()
def count_flops(model: nn.Module, images: Tensor, masks: Tensor) -> FlopReport:
    """FLOPs of ``model(images, masks)`` in eval mode.

    Args:
        images: [N, 3, H, W]; masks: bool [N, H, W], True at padding.
    """
    from sdetr.detector import ops

    # Loading the compiled op registers its FLOP formula, and FlopCounterMode copies the registry when
    # it is created: load first. (With the op unavailable, the grid_sample path is counted instead.)
    ops.use_compiled(images)
    was_training = model.training
    # torch's ModuleTracker (used by FlopCounterMode) fails on parameters passed as forward arguments
    # under no_grad; gradients are not needed here, so switch them off for the count.
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_MAPPING)
    nested: dict[str, float] = {}
    stack: list[Counter] = []
    handles = []

    def papers(counts) -> float:
        return float(sum(_papers(op, n) for op, n in counts.items()))

    def pre_hook(*_):
        stack.append(Counter(counter.flop_counts["Global"]))

    def make_post_hook(part: str):
        def post_hook(*_):
            delta = Counter(counter.flop_counts["Global"])
            delta.subtract(stack.pop())
            nested[part] = nested.get(part, 0.0) + papers(delta)

        return post_hook

    try:
        model.eval()
        for p, _ in requires_grad:
            p.requires_grad_(False)
        for part, modules in _hooked_parts(model).items():
            for m in modules:
                handles.append(m.register_forward_pre_hook(pre_hook))
                handles.append(m.register_forward_hook(make_post_hook(part)))
        with counter:
            model(images, masks)
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(was_training)

    raw = counter.flop_counts["Global"]
    total = papers(raw)
    return FlopReport(
        total=total,
        total_all=float(sum(raw.values())),
        by_op={_op_name(op): float(_papers(op, n)) for op, n in raw.items()},
        by_part=_disjoint_parts(nested, total),
    )


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_fps(
    model: nn.Module,
    batch_size: int,
    image: Tensor,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    iters: int = 50,
) -> dict:
    """Frames per second of the eval-mode model on one image repeated to ``batch_size``.

    As the official benchmark: warm-up iterations excluded, the device synchronised around each timed
    forward; the median (rather than the mean) of ``iters`` timings resists one-off stalls.

    Args:
        image: [3, H, W] (no padding: the batch is the same image repeated).
    Returns:
        {"batch_size", "fps", "latency_ms" (median seconds per batch, in ms), "iters", "warmup"}
    """
    device = torch.device(device)
    images = image.to(device)[None].expand(batch_size, -1, -1, -1).contiguous()
    masks = torch.zeros((batch_size, *image.shape[-2:]), dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(images, masks)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "fps": batch_size / median,
        "latency_ms": 1e3 * median,
        "iters": iters,
        "warmup": warmup,
    }


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def cost_of_preset(
    preset,
    overrides: list[str] | None = None,
    input_hw: tuple[int, int] = FIXED_INPUT_HW,
    val_images: int = 0,
    device: str = "auto",
    fps: bool = True,
) -> dict:
    """Parameters, GFLOPs and speed of a preset name (or a `Config`; ``overrides`` apply to a copy), as one
    JSON-ready dict.

    GFLOPs: with ``val_images == 0`` on one random 3 x H x W image (``input_hw``); otherwise the mean
    over the first ``val_images`` images of ``cfg.data``'s val split after the val transform, one image
    at a time (padding-free). Speed (``fps=True``) uses the same first image: batch 1 and 4 on a GPU;
    on CPU only batch 1 with a few iterations (its latency is what matters there).
    """
    from sdetr.detector import ops
    from sdetr.detector.build import build_model, count_parameters
    from sdetr.detector.errors import DataError
    from sdetr.detector.precision import resolve_device
    from sdetr.detector.presets import get_preset

    cfg = (
        get_preset(preset, overrides)
        if isinstance(preset, str)
        else copy.deepcopy(preset).override(overrides)
    )
    dev = resolve_device(device)
    model = build_model(cfg.model).to(dev).eval()
    result = {
        "preset": cfg.preset,
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder if cfg.model.arch == "deformable_detr" else None,
        "backbone": cfg.model.backbone,
        "rho": cfg.model.rho,
        "params_trainable": count_parameters(model, trainable_only=True),
        "params_total": count_parameters(model, trainable_only=False),
        # The papers count Sparse DETR without the encoder aux heads (training-only).
        "params_paper": count_parameters(model, trainable_only=True, include_enc_aux_heads=False),
    }

    if val_images > 0:
        from sdetr.detector.data import build_dataset

        dataset = build_dataset("val", cfg.data)
        if len(dataset) < val_images:
            raise DataError(f"--val {val_images}: the val split of {cfg.data.root} has {len(dataset)} images")
        images = (dataset[i][0] for i in range(val_images))
    else:
        images = iter([torch.randn(3, *input_hw, generator=torch.Generator().manual_seed(0))])

    reports, sizes, first = [], [], None
    for img in images:
        first = img if first is None else first
        sizes.append(img.shape[-2:])
        mask = torch.zeros((1, *img.shape[-2:]), dtype=torch.bool, device=dev)
        reports.append(count_flops(model, img[None].to(dev), mask))
    flops = FlopReport.mean(reports)
    mean_h = sum(s[0] for s in sizes) / len(sizes)
    mean_w = sum(s[1] for s in sizes) / len(sizes)
    result.update(
        gflops=flops.gflops,
        gflops_all=flops.gflops_all,
        gflops_without_enc_aux_heads=flops.gflops_without_enc_aux_heads,
        # The transformer encoder alone (None for Faster R-CNN): Lite DETR's claim is about this.
        gflops_encoder=flops.by_part["encoder"] / 1e9 if "encoder" in flops.by_part else None,
        gflops_by_part={k: v / 1e9 for k, v in flops.by_part.items()},
        gflops_by_op={k: v / 1e9 for k, v in flops.by_op.items()},
        input=f"3x{input_hw[0]}x{input_hw[1]}" if val_images == 0 else f"val[:{val_images}]",
        input_mode="fixed" if val_images == 0 else "val",
        val_images=val_images,
        mean_input_hw=[mean_h, mean_w],
        device=str(dev),
        msda_backend="compiled" if ops.use_compiled(torch.empty(0, device=dev)) else "pytorch",
        fps_b1=None,
        fps_b4=None,
        latency_ms=None,
    )
    if fps:
        if dev.type == "cuda":
            b1 = measure_fps(model, 1, first, dev, warmup=5, iters=50)
            b4 = measure_fps(model, 4, first, dev, warmup=5, iters=50)
            result.update(fps_b1=b1["fps"], fps_b4=b4["fps"], latency_ms=b1["latency_ms"])
        else:
            # A CPU forward of an R50 model at 850 x 1040 takes seconds: keep the run short.
            b1 = measure_fps(model, 1, first, dev, warmup=1, iters=3)
            result.update(fps_b1=b1["fps"], latency_ms=b1["latency_ms"])
    return result
