"""Benchmark the compiled key-aware deformable attention op (``torch.ops.sdetr.kda``) against the pure-PyTorch
KDA (`key_aware_deform_attn`, grid_sample + einsum) at R50 Lite DETR shapes.

Shapes: 4 levels of an 850x1040 image (107x130, 54x65, 27x33, 14x17 = 18,549 tokens), 8 heads x 32
channels, 4 points, batch 1. Queries: the high-level tokens of H3L1 (the 3 coarsest levels, 4,639: the
high-level update) and all 18,549 tokens (the all-token layer); keys = values (the released configuration)
and, for comparison, separate keys (proj_key).

For each shape it times forward (under no_grad) and forward+backward (gradients for query, value, key and
sampling locations) of both implementations in one run, interleaved, and prints the medians, the speed-ups
and the peak memory: the rise of the process's resident set above what it held before the call (VmHWM after
resetting it through /proc/self/clear_refs, glibc told to return freed blocks), each in a fresh subprocess.

    python benchmarks/kda.py                 # CPU, fp32, torch's thread count
    python benchmarks/kda.py --threads 1
    python benchmarks/kda.py --device cuda   # the Triton kernels, fp32 and bf16; peak memory from torch.cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from sdetr.detector import ops
from sdetr.detector.layers.kda import key_aware_deform_attn

LEVELS = ((107, 130), (54, 65), (27, 33), (14, 17))
HEADS, CHANNELS, POINTS = 8, 32, 4
TOKENS = sum(h * w for h, w in LEVELS)  # 18,549
HIGH = TOKENS - LEVELS[0][0] * LEVELS[0][1]  # 4,639: H3L1's high-level tokens
QUERIES = {"high": HIGH, "all": TOKENS}
IMPLS = ("pytorch", "compiled")
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "float32,bfloat16"}


def make_inputs(lq: int, separate_key: bool, seed: int = 0, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(LEVELS, dtype=torch.long)
    lsi = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    query = torch.randn(1, lq, HEADS, CHANNELS, generator=g)
    value = torch.randn(1, TOKENS, HEADS, CHANNELS, generator=g)
    key = torch.randn(1, TOKENS, HEADS, CHANNELS, generator=g) if separate_key else None
    # Reference points anywhere in the image, offsets of a few pixels: some points fall off the maps.
    ref = torch.rand(1, lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(1, lq, HEADS, len(LEVELS), POINTS, 2, generator=g) * 2.0
    loc = ref + offsets / ss.flip(-1)[None, None, None, :, None, :]

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return to(query), to(value), to(key), ss.to(device), lsi.to(device), to(loc)


def impl_fn(name: str):
    if name == "compiled":
        return torch.ops.sdetr.kda
    return lambda q, v, k, ss, lsi, loc: key_aware_deform_attn(q, k, v, ss, loc)


def with_grad(inputs):
    return [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]


def run_once(fn, inputs, backward: bool, grad_out=None):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)[0]
    out.backward(grad_out)
    return out


def sync(inputs) -> None:
    if inputs[1].is_cuda:
        torch.cuda.synchronize()


def time_pair(inputs, backward: bool, repeats: int) -> dict[str, list[float]]:
    """Seconds per call: one warm-up each, then `repeats` rounds running both back to back (alternating which
    goes first) so that both see the same load on a shared machine. On CUDA the device is synchronised
    before and after each call."""
    runs = {}
    for impl in IMPLS:
        ins = with_grad(inputs) if backward else inputs
        grad_out = None
        if backward:
            grad_out = torch.randn(1, ins[0].shape[1], HEADS * CHANNELS).to(ins[1])
        runs[impl] = (impl_fn(impl), ins, grad_out)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(repeats + 1):
        for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
            fn, ins, grad_out = runs[impl]
            for t in ins:
                if t is not None:
                    t.grad = None
            sync(ins)
            t0 = time.perf_counter()
            run_once(fn, ins, backward, grad_out)
            sync(ins)
            if i > 0:
                times[impl].append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(impl: str, lq: int, separate_key: bool, backward: bool, threads: int) -> None:
    """Runs in a subprocess: prints the peak RSS rise (bytes) of one call as JSON."""
    torch.set_num_threads(threads)
    ops.build()
    fn = impl_fn(impl)
    small = make_inputs(64, separate_key)
    run_once(fn, with_grad(small) if backward else small, backward, torch.randn(1, 64, HEADS * CHANNELS))
    inputs = make_inputs(lq, separate_key)
    inputs = with_grad(inputs) if backward else inputs
    grad_out = torch.randn(1, lq, HEADS * CHANNELS) if backward else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    run_once(fn, inputs, backward, grad_out)
    print(json.dumps({"peak_bytes": max(0, _status_kib("VmHWM") - before) * 1024}))


def peak_memory(impl: str, lq: int, separate_key: bool, backward: bool, threads: int) -> float | None:
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    probe = f"{impl},{lq},{int(separate_key)},{int(backward)},{threads}"
    proc = subprocess.run(
        [sys.executable, __file__, "--_probe", probe], env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        print(f"  (memory probe failed: {proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak_memory(impl: str, inputs, backward: bool) -> float:
    """torch.cuda.max_memory_allocated above the memory held before one call."""
    ins = with_grad(inputs) if backward else inputs
    grad_out = torch.randn(1, ins[0].shape[1], HEADS * CHANNELS).to(ins[1]) if backward else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once(impl_fn(impl), ins, backward, grad_out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtypes", default=None, help="cpu: float32 (default); cuda: float32,bfloat16")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._probe:
        impl, lq, separate_key, backward, threads = args._probe.split(",")
        _memory_probe(impl, int(lq), bool(int(separate_key)), bool(int(backward)), int(threads))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    ops.build()
    dtypes = [getattr(torch, d) for d in (args.dtypes or DEFAULT_DTYPES[args.device]).split(",")]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{threads} threads"
    print(f"kda benchmark ({stamp}), torch {torch.__version__}, {where}")
    shape = f"value [1, {TOKENS}, {HEADS}, {CHANNELS}], {POINTS} points"
    print(f"{shape}; median of {args.repeats} interleaved runs")
    print()
    print(
        "| queries | keys | dtype | pass | pytorch ms | compiled ms | speed-up | pytorch MiB | compiled MiB |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    worst = float("inf")
    cases = [(q, lq, sk, dt) for q, lq in QUERIES.items() for sk in (False, True) for dt in dtypes]
    for qname, lq, separate_key, dtype in cases:
        inputs = make_inputs(lq, separate_key, device=args.device, dtype=dtype)
        for backward in (False, True):
            times = time_pair(inputs, backward, args.repeats)
            if args.no_memory or (args.device == "cpu" and dtype != torch.float32):
                mem = dict.fromkeys(IMPLS)
            elif args.device == "cuda":
                mem = {impl: cuda_peak_memory(impl, inputs, backward) for impl in IMPLS}
            else:
                mem = {impl: peak_memory(impl, lq, separate_key, backward, threads) for impl in IMPLS}
            med = {impl: statistics.median(times[impl]) * 1e3 for impl in IMPLS}
            speedup = med["pytorch"] / med["compiled"]
            if backward:
                worst = min(worst, speedup)
            keys = "own" if separate_key else "values"
            pass_ = "fwd+bwd" if backward else "forward"
            dname = str(dtype).removeprefix("torch.")
            print(
                f"| {lq:,} ({qname}) | {keys} | {dname} | {pass_} | {med['pytorch']:.2f} | "
                f"{med['compiled']:.2f} | {speedup:.1f}x | {mib(mem['pytorch'])} | {mib(mem['compiled'])} |",
                flush=True,
            )
    print()
    print(f"smallest forward+backward speed-up: {worst:.1f}x (target: >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
