"""A torch.export program (``.pt2``) of a trained detector that keeps ``torch.ops.sdetr.ms_deform_attn``.

The program runs without sdetr's Python model code: a consumer imports torch and ``sdetr.detector.ops`` (to
load the op library) and calls `load_program`. The op's fake registration (ops/registrations.py) lets
torch.export trace it with symbolic shapes, so the image size is dynamic (multiples of 64).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdetr.detector.export.common import (
    check_input_hw,
    dynamic_hw,
    msda_backend,
    prepare,
    refuse_existing,
    write_atomic,
)

DATA_DEPENDENT_HINT = (
    "torch.export cannot trace this model: a value it needs as a size is read back from a tensor "
    "(data-dependent); the detector carries the level sizes as Python ints, so this is a bug"
)


def trace(
    model: nn.Module, arch: str, rho: float | None, input_hw: tuple[int, int], dynamic: bool, backend: str
) -> torch.export.ExportedProgram:
    """torch.export of the inference wrapper with deformable attention on ``backend``
    (``compiled``: the op stays one node; ``pytorch``: grid_sample, for ONNX)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    wrapper = prepare(model, rho, arch)
    example = torch.randn(1, 3, *check_input_hw(input_hw), generator=torch.Generator().manual_seed(0))
    shapes = {"images": dynamic_hw()} if dynamic else None
    try:
        with msda_backend(backend), torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes=shapes, strict=False)
    except GuardOnDataDependentSymNode as exc:
        raise RuntimeError(f"{DATA_DEPENDENT_HINT}: {str(exc).splitlines()[0]}") from exc


def export_torch(
    model: nn.Module,
    path: str | Path,
    arch: str = "deformable_detr",
    rho: float | None = None,
    input_hw: tuple[int, int] = (832, 1344),
    dynamic: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (eval mode, ρ fixed) as a ``.pt2`` program: ``images [N, 3, H, W]`` normalised ->
    ``(pred_logits, pred_boxes)``; H and W dynamic multiples of 64 unless ``dynamic`` is False, the
    example size ``input_hw``. Nothing is written when tracing fails."""
    refuse_existing(path, overwrite)
    if arch == "deformable_detr":
        from sdetr.detector import ops

        ops.build()  # the program must reference the compiled op; raises with the fix when it cannot load
    program = trace(model, arch, rho, input_hw, dynamic, backend="compiled")
    return write_atomic(path, lambda tmp: torch.export.save(program, tmp), overwrite)


def load_program(path: str | Path):
    """The callable of a ``.pt2`` written by `export_torch`; loads the op library first (no model code)."""
    from sdetr.detector import ops

    ops.load()
    return torch.export.load(str(path)).module()
