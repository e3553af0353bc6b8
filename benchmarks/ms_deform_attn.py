"""Benchmark torch.ops.sdetr.ms_deform_attn against the pure-PyTorch reference at Sparse DETR R50 shapes: on
CPU the compiled C++ kernels, on CUDA the op's CUDA kernels (Triton by default; SDETR_MSDA_CUDA_IMPL=cpp
selects the opt-in CUDA C++ ones when built with SDETR_MSDA_CUDA=1).

Shapes: 4 levels of an 850x1040 image (107x130, 54x65, 27x33, 14x17 = 18,549 tokens), 8 heads x 32 channels,
4 points, batch 1; queries = 10% of the tokens (Sparse DETR's encoder at rho=10%), 100% (Deformable DETR's
encoder) and 300 (decoder).

For each shape it times forward (under no_grad) and forward+backward (grads for value, sampling locations
and attention weights) of both implementations in one run, and prints the medians, the speed-ups and the
peak memory. On CPU, peak memory is the rise of the process's resident set above what it held before the
call (VmHWM after resetting it through /proc/self/clear_refs, glibc told to return freed blocks), measured
in a fresh subprocess per (implementation, shape, pass); on CUDA it is torch.cuda.max_memory_allocated
above the memory held before the call.

    python benchmarks/ms_deform_attn.py                        # CPU, fp32
    python benchmarks/ms_deform_attn.py --device cuda          # CUDA (Triton), fp32, fp16 and bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from sdetr.detector import ops
from sdetr.detector.layers.ms_deform_attn import ms_deform_attn_pytorch

LEVELS = ((107, 130), (54, 65), (27, 33), (14, 17))
HEADS, CHANNELS, POINTS = 8, 32, 4
TOKENS = sum(h * w for h, w in LEVELS)  # 18,549
QUERIES = {"10%": round(0.1 * TOKENS), "100%": TOKENS, "300": 300}
IMPLS = ("reference", "compiled")


def make_inputs(lq: int, dtype=torch.float32, device="cpu", batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(LEVELS, dtype=torch.long)
    lsi = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    value = torch.randn(batch, TOKENS, HEADS, CHANNELS, generator=g)
    # Reference points anywhere in the image, offsets of a few pixels: some points fall off the map.
    ref = torch.rand(batch, lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(batch, lq, HEADS, len(LEVELS), POINTS, 2, generator=g) * 2.0
    loc = ref + offsets / ss.flip(-1)[None, None, None, :, None, :]
    attn = torch.randn(batch, lq, HEADS, len(LEVELS) * POINTS, generator=g).softmax(-1)
    attn = attn.view(batch, lq, HEADS, len(LEVELS), POINTS)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), ss.to(device), lsi.to(device), loc.to(**to), attn.to(**to)


def impl_fn(name: str):
    return ms_deform_attn_pytorch if name == "reference" else torch.ops.sdetr.ms_deform_attn


def run_once(fn, inputs, backward: bool, grad_out=None):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    out.backward(grad_out)
    return out


def with_grad(inputs):
    return [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(inputs, backward: bool, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each implementation: one warm-up each, then `repeats` rounds in which both run
    back to back (alternating which goes first), so that both see the same load on a shared machine."""
    runs = {}
    for impl in IMPLS:
        fn = impl_fn(impl)
        ins = with_grad(inputs) if backward else inputs
        grad_out = None
        if backward:
            with torch.no_grad():
                grad_out = torch.randn_like(fn(*ins))
        runs[impl] = (fn, ins, grad_out)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(repeats + 1):
        order = IMPLS if i % 2 == 0 else IMPLS[::-1]
        for impl in order:
            fn, ins, grad_out = runs[impl]
            for t in ins:
                t.grad = None
            sync(device)
            t0 = time.perf_counter()
            run_once(fn, ins, backward, grad_out)
            sync(device)
            if i > 0:
                times[impl].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- CPU memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(impl: str, lq: int, backward: bool, threads: int) -> None:
    """Runs in a subprocess: prints the peak RSS rise (bytes) of one call as JSON."""
    torch.set_num_threads(threads)
    if impl == "compiled":
        ops.build()
    fn = impl_fn(impl)
    # Warm up code paths and thread pools on a small problem first.
    small = make_inputs(64)
    run_once(fn, with_grad(small) if backward else small, backward, torch.randn(1, 64, HEADS * CHANNELS))
    inputs = make_inputs(lq)
    inputs = with_grad(inputs) if backward else inputs
    grad_out = torch.randn(1, lq, HEADS * CHANNELS) if backward else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    run_once(fn, inputs, backward, grad_out)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": max(0, peak - before) * 1024}))


def cpu_peak_memory(impl: str, lq: int, backward: bool, threads: int) -> float | None:
    """Peak bytes above the inputs for one call, in a fresh process; None where this cannot be measured."""
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_probe", f"{impl},{lq},{int(backward)},{threads}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"  (memory probe failed: {proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak_memory(fn, inputs, backward: bool) -> float:
    inputs = with_grad(inputs) if backward else inputs
    grad_out = None
    if backward:
        with torch.no_grad():
            grad_out = torch.randn_like(fn(*inputs))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once(fn, inputs, backward, grad_out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------------------------------------- report
def fmt_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:9.1f}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def mib(b: float | None) -> str:
    return "      n/a" if b is None else f"{b / 2**20:9.1f}"


def header(args, dtypes) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    st = ops.backend_status(load=False)
    dev = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    )
    return "\n".join(
        [
            f"ms_deform_attn benchmark ({time.strftime('%Y-%m-%d %H:%M')}), torch {torch.__version__}",
            f"device: {args.device} ({dev}); dtypes: {', '.join(dtype_name(d) for d in dtypes)}",
            f"compiled op: {st.get('library') or '?'} (CPU kernels: {st.get('cpu_kernels_isa')})",
            f"value [1, {TOKENS}, {HEADS}, {CHANNELS}], levels "
            + ", ".join(f"{h}x{w}" for h, w in LEVELS)
            + f", {POINTS} points; median of {args.repeats} interleaved runs after one warm-up",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--queries", default=",".join(QUERIES), help="subset of " + ",".join(QUERIES).replace("%", "%%")
    )
    p.add_argument("--dtypes", default=None, help="cpu: float32 (default); cuda: float32,float16,bfloat16")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._probe:
        impl, lq, backward, threads = args._probe.split(",")
        _memory_probe(impl, int(lq), bool(int(backward)), int(threads))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    ops.build()
    status = ops.backend_status(load=False)
    if args.device == "cuda" and not (status["triton"] or status["cuda_kernels"]):
        print("the op has no CUDA kernels: Triton is not installed (see `sdetr doctor`)", file=sys.stderr)
        return 2
    if args.device == "cuda":
        print(f"CUDA kernels: {status['devices']['cuda']}")
    default_dtypes = "float32" if args.device == "cpu" else "float32,float16,bfloat16"
    dtypes = [getattr(torch, d) for d in (args.dtypes or default_dtypes).split(",")]
    print(header(args, dtypes), flush=True)
    print()
    cols = (
        f"{'queries':>12} {'dtype':>8} {'pass':>8} | {'reference ms':>12} {'compiled ms':>12} "
        f"{'speed-up':>8} | "
        f"{'ref peak MiB':>12} {'op peak MiB':>12} {'op/ref mem':>10}"
    )
    print(cols)
    print("-" * len(cols))
    worst = float("inf")
    for qname in args.queries.split(","):
        lq = QUERIES[qname]
        for dtype in dtypes:
            inputs = make_inputs(lq, dtype=dtype, device=args.device)
            for backward in (False, True):
                times, mem = time_pair(inputs, backward, args.repeats, args.device), {}
                for impl in IMPLS:
                    if args.no_memory:
                        mem[impl] = None
                    elif args.device == "cuda":
                        mem[impl] = cuda_peak_memory(impl_fn(impl), inputs, backward)
                    elif dtype == torch.float32:
                        mem[impl] = cpu_peak_memory(impl, lq, backward, threads)
                    else:
                        mem[impl] = None
                speedup = statistics.median(times["reference"]) / statistics.median(times["compiled"])
                if backward:
                    worst = min(worst, speedup)
                ratio = (
                    f"{mem['compiled'] / mem['reference']:10.2f}"
                    if mem["reference"] and mem["compiled"] is not None
                    else f"{'n/a':>10}"
                )
                label = f"{lq} ({qname})" if qname != "300" else "300"
                print(
                    f"{label:>12} {dtype_name(dtype):>8} {'fwd+bwd' if backward else 'forward':>8} | "
                    f"{fmt_ms(times['reference']):>12} {fmt_ms(times['compiled']):>12} {speedup:7.1f}x | "
                    f"{mib(mem['reference']):>12} {mib(mem['compiled']):>12} {ratio}",
                    flush=True,
                )
    print()
    print(f"smallest forward+backward speed-up: {worst:.1f}x (CPU target, issue 12: >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
