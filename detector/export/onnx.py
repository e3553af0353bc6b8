"""ONNX export of a trained detector with standard operators only.

Multi-scale deformable attention is written with ONNX's ``GridSample`` (opset >= 16): the pure-PyTorch path
of layers/ms_deform_attn.py (bilinear, zero padding, ``align_corners=False``, exactly the CUDA/C++
kernels' sampling) is traced instead of the compiled op, so any ONNX runtime runs the graph without a
custom-operator library. The image size is dynamic (multiples of 64); Sparse DETR's ρ is fixed.

onnx, onnxscript and onnxruntime are the optional ``export`` extra (``pip install 'sdetr[export]'``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sdetr.detector.errors import ConfigError
from sdetr.detector.export.common import refuse_existing, write_atomic
from sdetr.detector.export.torch_export import trace

OPSET = 18
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}, not installed: pip install 'sdetr[export]' "
            "(onnx, onnxscript, onnxruntime)"
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    arch: str = "deformable_detr",
    rho: float | None = None,
    input_hw: tuple[int, int] = (832, 1344),
    dynamic: bool = True,
    opset: int = OPSET,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (eval mode, ρ fixed) as ONNX: input ``images`` [N, 3, H, W] (normalised), outputs
    ``pred_logits`` [N, Q, K], ``pred_boxes`` [N, Q, 4]. The graph passes ``onnx.checker`` before it is
    written; nothing is written on failure."""
    _require("onnx", "onnxscript")
    # Optional dependencies (the `export` extra): imported here so the core install does not need them.
    import onnx
    import torch

    refuse_existing(path, overwrite)
    if opset < 16:
        raise ConfigError(f"opset {opset}: GridSample needs opset >= 16")
    program = trace(model, arch, rho, input_hw, dynamic, backend="pytorch")
    onnx_program = torch.onnx.export(
        program, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, opset_version=opset, dynamo=True
    )
    onnx.checker.check_model(onnx_program.model_proto, full_check=True)
    return write_atomic(path, lambda tmp: onnx_program.save(str(tmp)), overwrite)


def onnxruntime_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session of an exported file (``threads`` 0 = ONNX Runtime's default)."""
    _require("onnxruntime")
    import onnxruntime as ort  # optional dependency (the `export` extra)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
