"""Training-step time of the detectors under the precision and memory-layout options: fp32 or bf16 autocast,
contiguous or channels-last convolution weights (`train.amp`, `train.channels_last`).

For each preset it builds one model per option (the same initial weights), then times them in interleaved
rounds (each round runs every option for a few steps, in a rotating order, so that all see the same machine
state) and prints the median step time, its ratio to fp32 + contiguous measured in the same run, the
dispatched aten ops per step (about the kernel launches on a GPU: a step with many small ops is bound by the
host, not the device) and, on CUDA, the peak memory. A step is the trainer's own
(`engine.train_one_epoch`: forward, fp32 losses, backward, gradient clipping, AdamW) on a padded batch of
random images with random boxes, synchronised on CUDA.

    python benchmarks/train_step.py                                  # CUDA: R50 Sparse DETR vs Efficient DETR
    python benchmarks/train_step.py --device cpu --threads 2         # CPU: the demo's mini presets
    python benchmarks/train_step.py --presets tiny_sparse_detr_rho_0.1 --sizes 320x416,352x384
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import product

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.presets import get_preset
from sdetr.platform.training.engine import train_one_epoch

DEFAULTS = {
    "cuda": ("r50_sparse_detr_rho_0.1,r50_efficient_detr", "800x1066,800x1199"),
    "cpu": (
        "mini_sparse_detr_rho_0.1,mini_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage",
        "192x256,224x240",
    ),
}
# (train.amp, channels_last); the first is the baseline.
OPTIONS = list(product(("none", "bf16"), (False, True)))


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it (autograd's backward included)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def make_batch(sizes, num_classes: int, device: str, seed: int = 0):
    """Random images zero-padded into one batch (with the padding mask) and 2-4 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    masks = torch.ones(len(sizes), h, w, dtype=torch.bool)
    targets = []
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g)
        masks[i, :hi, :wi] = False
        k = 2 + i % 3
        centre = 0.25 + 0.5 * torch.rand(k, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(k, 2, generator=g)
        labels = torch.randint(1, num_classes, (k,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], -1).to(device)})
    return images.to(device), masks.to(device), targets


class Runner:
    """One model, criterion and optimiser under one (amp, channels_last) option."""

    def __init__(self, preset: str, amp: str, channels_last: bool, device: str, batch):
        cfg = get_preset(preset)
        torch.manual_seed(0)
        self.model = build_model(cfg.model).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.criterion = build_criterion(cfg.model, cfg.loss).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.device, self.amp, self.batch = torch.device(device), amp, batch
        self.times: list[float] = []
        self.losses: list[float] = []

    def run(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` trainer steps on the batch; their losses go to ``losses``."""
        marks = []

        def on_step(step: int, metrics: dict) -> None:
            sync(self.device.type)
            marks.append(time.perf_counter())
            self.losses.append(metrics["loss"])

        sync(self.device.type)
        marks.append(time.perf_counter())
        train_one_epoch(
            self.model, self.criterion, [self.batch] * steps, self.optimizer, self.device,
            amp=self.amp, on_step=on_step,
        )  # fmt: skip
        return [end - start for start, end in zip(marks, marks[1:])]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    p.add_argument("--presets", default=None, help="comma-separated (default: per device, see above)")
    p.add_argument("--sizes", default=None, help="image sizes HxW of the batch, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per option and round (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step: no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    presets, sizes = DEFAULTS[args.device]
    presets = (args.presets or presets).split(",")
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes or sizes).split(",")]
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    print(f"train_step benchmark ({time.strftime('%Y-%m-%d %H:%M')}), torch {torch.__version__}, {where}")
    shapes = ", ".join(f"{h}x{w}" for h, w in sizes)
    print(f"batch {len(sizes)}: {shapes}; median of {args.rounds} interleaved rounds x {args.steps} steps")
    print("after one warm-up step; speed-up = fp32 contiguous / this option, measured in the same run")
    print()
    print("| preset | amp | channels-last | ms/step | speed-up | aten ops/step | peak GiB | loss |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for preset in presets:
        batch = make_batch(sizes, get_preset(preset).model.num_classes, args.device)
        runners = {opt: Runner(preset, *opt, args.device, batch) for opt in OPTIONS}
        peaks, ops = {}, {}
        for opt, runner in runners.items():  # warm-up step: peak memory and the op count
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            counter = _OpCounter()
            with counter:
                runner.run(1)
            ops[opt] = counter.ops
            peaks[opt] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        for r in range(args.rounds):
            order = OPTIONS[r % len(OPTIONS) :] + OPTIONS[: r % len(OPTIONS)]
            for opt in order:
                runners[opt].times.extend(runners[opt].run(args.steps))
        base = statistics.median(runners[OPTIONS[0]].times)
        for (amp, channels_last), runner in runners.items():
            med = statistics.median(runner.times)
            peak = "n/a" if peaks[(amp, channels_last)] is None else f"{peaks[(amp, channels_last)]:.2f}"
            losses = f"{runner.losses[0]:.2f} → {runner.losses[-1]:.2f}"  # first → last
            print(
                f"| {preset} | {'fp32' if amp == 'none' else amp} | {'on' if channels_last else 'off'} | "
                f"{1e3 * med:.1f} | "
                f"{base / med:.2f}x | {ops[(amp, channels_last)]:,} | {peak} | {losses} |",
                flush=True,
            )
        del runners
    return 0


if __name__ == "__main__":
    sys.exit(main())
