"""Export: bad input is refused before anything is written; ONNX Runtime and the torch.export program
match the PyTorch model at three image sizes (pending the model change below)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sdetr.detector.build import build_model
from sdetr.detector.errors import CheckpointError, ConfigError
from sdetr.detector.export import InferenceModel, export_onnx, export_torch
from sdetr.detector.presets import get_preset

SIZES = [(256, 320), (192, 448), (384, 256)]
SMALL = ["model.num_queries=20"]


def tiny(preset: str):
    torch.manual_seed(0)
    return build_model(get_preset(preset, SMALL).model).eval()


@pytest.fixture(scope="module")
def sparse():
    return tiny("tiny_sparse_detr_rho_0.1")


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, "half", True])
def test_rho_outside_0_1_is_refused(sparse, tmp_path, rho):
    with pytest.raises(ConfigError, match=r"expected a number in \(0, 1\]"):
        export_onnx(sparse, tmp_path / "m.onnx", rho=rho)
    assert not list(tmp_path.iterdir())


def test_bad_requests_are_refused_and_nothing_is_overwritten(sparse, tmp_path):
    dense = tiny("tiny_deformable_detr")
    with pytest.raises(ConfigError, match="no scoring network"):
        export_torch(dense, tmp_path / "m.pt2", rho=0.3)
    with pytest.raises(ConfigError, match="multiple of 64"):
        export_onnx(sparse, tmp_path / "m.onnx", input_hw=(250, 320))
    with pytest.raises(ConfigError, match="not exportable"):
        export_onnx(sparse, tmp_path / "m.onnx", arch="faster_rcnn")
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="exists"):
        export_onnx(sparse, existing)
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# The transformer reads the level sizes back with spatial_shapes.tolist() (transformer/encoder.py,
# transformer/deformable_transformer.py, layers/ms_deform_attn.py, layers/kda.py, lite_encoder.py), which
# torch.export cannot trace; strict: this starts failing (XPASS) once the model carries them as Python ints.
@pytest.mark.xfail(raises=RuntimeError, strict=True, reason="model reads level sizes with Tensor.tolist()")
@pytest.mark.parametrize(
    "preset", ["tiny_sparse_detr_rho_0.1", "tiny_deformable_detr", "tiny_lite_detr_h3l1_3p1x2"]
)
def test_onnx_and_torch_export_match_pytorch(preset, tmp_path):
    pytest.importorskip("onnxruntime")
    from sdetr.detector.export import onnxruntime_session

    model = tiny(preset)
    wrapper = InferenceModel(model).eval()
    export_torch(model, tmp_path / "m.pt2", input_hw=SIZES[0])
    export_onnx(model, tmp_path / "m.onnx", input_hw=SIZES[0])
    session = onnxruntime_session(tmp_path / "m.onnx", threads=2)
    for i, hw in enumerate(SIZES):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ref = wrapper(x)
        torch.save({"x": x, "ref": ref}, tmp_path / f"case{i}.pt")
        for got, want in zip(session.run(None, {"images": x.numpy()}), ref):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)
    # The program runs in a process that loads only torch and the op library, not sdetr's model code.
    code = (
        "import sys, torch\nimport sdetr.detector.ops as ops\nops.load()\n"
        f"program = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()\n"
        f"for i in range({len(SIZES)}):\n"
        f"    case = torch.load({str(tmp_path)!r} + f'/case{{i}}.pt')\n"
        "    for got, want in zip(program(case['x']), case['ref']):\n"
        "        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)\n"
        "model_code = ('sdetr.detector.models', 'sdetr.detector.transformer', 'sdetr.detector.layers')\n"
        "assert not [m for m in sys.modules if m.startswith(model_code)]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
