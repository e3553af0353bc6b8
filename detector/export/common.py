"""What both export formats share: the inference wrapper, ρ fixed at export, input checks, atomic writes.

The exported graph is ``images [N, 3, H, W] (normalised) -> (pred_logits [N, Q, K], pred_boxes [N, Q, 4])``:
every image of a batch has the same size, so there is no padding and no mask input. Sparse DETR's ρ is
fixed at export (``rho``, default: the trained one): it sets how many encoder tokens are kept, i.e. the
shapes inside the graph, and a graph with a ρ input would need data-dependent shapes that ONNX
consumers such as TensorRT handle poorly. Export one file per ρ instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from sdetr.detector.errors import CheckpointError, ConfigError

EXPORTABLE_ARCHS = ("deformable_detr", "detr")
# Each side a multiple of this: the backbone's coarsest level (C5, stride 32) and the extra stride-2 level.
SIZE_MULTIPLE = 64


class InferenceModel(nn.Module):
    """``images [N, 3, H, W] -> (pred_logits [N, Q, K], pred_boxes [N, Q, 4])``: the detector on an unpadded
    batch (the mask it expects is all False)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        mask = torch.zeros((n, h, w), dtype=torch.bool, device=images.device)
        out = self.detector(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def check_rho(rho: float | None, model: nn.Module) -> None:
    if rho is None:
        return
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0.0 < float(rho) <= 1.0:
        raise ConfigError(f"--rho {rho!r}: expected a number in (0, 1] (the fraction of encoder tokens kept)")
    if not hasattr(model, "set_rho") or getattr(model.transformer, "enc_mask_predictor", None) is None:
        raise ConfigError(
            f"--rho {rho}: this model has no scoring network (not a Sparse DETR, trained rho=0)"
        )


def check_input_hw(input_hw: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_hw)
    except (TypeError, ValueError):
        raise ConfigError(f"--input {input_hw!r}: expected HxW, e.g. 832x1344") from None
    if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ConfigError(
            f"--input {h}x{w}: each side must be a multiple of {SIZE_MULTIPLE}, at least {SIZE_MULTIPLE}"
        )
    return h, w


def prepare(model: nn.Module, rho: float | None, arch: str) -> InferenceModel:
    """The eval-mode wrapper of ``model`` at ``rho`` (the model's own ρ when None)."""
    if arch not in EXPORTABLE_ARCHS:
        raise ConfigError(
            f"export: arch {arch!r} is not exportable (supported: {', '.join(EXPORTABLE_ARCHS)})"
        )
    check_rho(rho, model)
    if rho is not None:
        model.set_rho(float(rho))
    return InferenceModel(model).eval()


@contextlib.contextmanager
def msda_backend(mode: str) -> Iterator[None]:
    """Force `sdetr.detector.ops`' choice of the deformable-attention backend for the duration."""
    from sdetr.detector.ops import BACKEND_ENV

    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite (--force) to replace it")


def write_atomic(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """``write(tmp)``, then rename to ``path``: a failed export leaves no torn file and replaces nothing."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def dynamic_hw() -> dict[int, object]:
    """Dynamic height and width (multiples of `SIZE_MULTIPLE`) for torch.export."""
    dim = torch.export.Dim
    return {
        2: SIZE_MULTIPLE * dim("h_blocks", min=1, max=64),
        3: SIZE_MULTIPLE * dim("w_blocks", min=1, max=64),
    }
