"""ONNX Runtime CPU latency against PyTorch eager, same model, same inputs, interleaved; medians and ratio.

    .venv/bin/python benchmarks/onnx_latency.py [--preset tiny_sparse_detr_rho_0.1] [--sizes 256x320,384x512]
        [--repeats 20] [--threads 2]

Each round runs PyTorch eager (the op backend sdetr picks, compiled when it loads) and the ONNX Runtime
session once per size, alternating which goes first, so drift in machine load hits both. Prints the
median of each and the ratio eager / ONNX Runtime (> 1: ONNX Runtime is faster), plus the largest
output difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdetr.detector.build import build_model
from sdetr.detector.export import InferenceModel, export_onnx, onnxruntime_session
from sdetr.detector.presets import get_preset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="tiny_sparse_detr_rho_0.1")
parser.add_argument("--sizes", default="256x320,384x512")
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
torch.manual_seed(0)
model = build_model(get_preset(args.preset).model).eval()
wrapper = InferenceModel(model).eval()
with tempfile.TemporaryDirectory() as tmp:
    path = export_onnx(model, Path(tmp) / "model.onnx", input_hw=sizes[0])
    session = onnxruntime_session(path, threads=args.threads)
    print(f"{args.preset}, {args.threads} threads, {args.repeats} interleaved rounds per size")
    print(f"load average at start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for hw in sizes:
        x = torch.randn(1, 3, *hw)
        feed = {"images": x.numpy()}
        with torch.no_grad():
            ref = wrapper(x)
        diff = max(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(session.run(None, feed), ref))
        session.run(None, feed)  # warm-up: first-call allocations and kernel selection are not timed
        with torch.no_grad():
            wrapper(x)
        times: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
        for r in range(args.repeats):
            order = ("eager", "onnxruntime") if r % 2 == 0 else ("onnxruntime", "eager")
            for name in order:
                t0 = time.perf_counter()
                if name == "eager":
                    with torch.no_grad():
                        wrapper(x)
                else:
                    session.run(None, feed)
                times[name].append(time.perf_counter() - t0)
        eager, ort = (statistics.median(times[k]) * 1e3 for k in ("eager", "onnxruntime"))
        print(
            f"{hw[0]}x{hw[1]}: eager {eager:.1f} ms, onnxruntime {ort:.1f} ms (medians), "
            f"eager/onnxruntime {eager / ort:.2f}x, max |diff| {diff:.2e}"
        )
