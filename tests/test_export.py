"""Export: bad input is refused before anything is written; ONNX Runtime and the torch.export program
match the PyTorch model at three image sizes."""

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


# One export per preset at the first size; the image size is dynamic, so the same files serve all three.
# An ONNX export is most of these tests' time (~40 s on an idle 2-core machine), so ONNX Runtime checks
# the two encoders that differ: Sparse DETR's file is the one `sdetr export` writes
# (test_cli_exports_onnx_that_onnxruntime_runs, at the same three sizes) and Lite DETR's is written here.
# Deformable DETR's graph is Sparse DETR's without the scoring network and top-k: torch.export only.
@pytest.mark.parametrize(
    "preset, onnx",
    [
        ("tiny_sparse_detr_rho_0.1", False),
        ("tiny_deformable_detr", False),
        ("tiny_lite_detr_h3l1_3p1x2", True),
    ],
)
def test_onnx_and_torch_export_match_pytorch(preset, onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    from sdetr.detector.export import onnxruntime_session

    model = tiny(preset)
    wrapper = InferenceModel(model).eval()
    export_torch(model, tmp_path / "m.pt2", input_hw=SIZES[0])
    if onnx:
        export_onnx(model, tmp_path / "m.onnx", input_hw=SIZES[0])
        session = onnxruntime_session(tmp_path / "m.onnx", threads=2)
    for i, hw in enumerate(SIZES):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ref = wrapper(x)
        torch.save({"x": x, "ref": ref}, tmp_path / f"case{i}.pt")
        if onnx:
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


# -- sdetr export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Sparse DETR saved as the trainers save it (weights + config)."""
    from sdetr.detector.checkpoint import save_atomic

    cfg = get_preset("tiny_sparse_detr_rho_0.1", SMALL)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_atomic({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from sdetr.platform.cli.main import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "tflite"], "--format 'tflite': unknown format; expected one of onnx, torch"),
        (["--format", "onnx", "--rho", "1.5"], "--rho 1.5: outside (0, 1]"),
        (["--format", "onnx", "--rho", "0"], "--rho 0: outside (0, 1]"),
        (["--format", "torch", "--input", "100x128"], "--input 100x128: each side must be a multiple of 64"),
    ],
)
def test_cli_refuses_bad_requests_with_one_line(checkpoint, tmp_path, capsys, extra, message):
    code, _, err = run_cli(capsys, "export", "--checkpoint", checkpoint, *extra, "--output", tmp_path / "m")
    assert code == 2 and err.startswith(f"sdetr: error: {message}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_cli_refuses_other_architecture_and_keeps_existing_output(checkpoint, tmp_path, capsys):
    from sdetr.detector.checkpoint import read_checkpoint, save_atomic

    # Weights of a Sparse DETR under a Deformable DETR config: another architecture, named in one line.
    state = read_checkpoint(checkpoint)
    state["config"] = get_preset("tiny_deformable_detr", SMALL).to_dict()
    other = tmp_path / "other.pth"
    save_atomic(state, other)
    code, _, err = run_cli(
        capsys, "export", "--checkpoint", other, "--format", "onnx", "--output", tmp_path / "x"
    )
    assert code == 2 and "does not fit this model" in err and "enc_mask_predictor" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()

    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli(
        capsys, "export", "--checkpoint", checkpoint, "--format", "onnx", "--output", existing
    )
    assert code == 2 and "exists; pass overwrite (--force)" in err
    assert existing.read_bytes() == b"keep me"


def test_cli_exports_onnx_that_onnxruntime_runs(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from sdetr.detector.checkpoint import load_model_weights
    from sdetr.detector.export import onnxruntime_session

    out = tmp_path / "m.onnx"
    args = ["--format", "onnx", "--rho", "0.3", "--input", "128x192", "--output", out]
    code, stdout, _ = run_cli(capsys, "export", "--checkpoint", checkpoint, *args)
    assert code == 0 and str(out) in stdout and "rho 0.3" in stdout
    model = build_model(get_preset("tiny_sparse_detr_rho_0.1", SMALL).model)
    load_model_weights(model, checkpoint)
    model.set_rho(0.3)
    session = onnxruntime_session(out, threads=2)
    for hw in [(192, 256), *SIZES]:  # the image size is dynamic: none of these is the export's 128x192
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            want = InferenceModel(model).eval()(x)
        for a, b in zip(session.run(None, {"images": x.numpy()}), want):
            torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=0)
