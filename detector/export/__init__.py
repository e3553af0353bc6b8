"""Export a trained detector for inference: ONNX with standard operators (`export_onnx`) or a torch.export
program keeping the compiled deformable-attention op (`export_torch`); see each module."""

from sdetr.detector.export.common import InferenceModel, check_input_hw, check_rho
from sdetr.detector.export.onnx import export_onnx, onnxruntime_session
from sdetr.detector.export.torch_export import export_torch, load_program

FORMATS = ("onnx", "torch")

__all__ = [
    "FORMATS",
    "InferenceModel",
    "check_input_hw",
    "check_rho",
    "export_onnx",
    "export_torch",
    "load_program",
    "onnxruntime_session",
]
