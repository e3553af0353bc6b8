"""MOASHA against ASHA on AP and no early stopping: hypervolume of the AP-GFLOPs front per compute spent.

    python benchmarks/moasha.py [--seeds 10] [--trials 64] [--workers 8] [--max-t 24] [--grace 3] [--eta 2]

A simulated sweep, no training and no Ray cluster: the real schedulers' ``on_trial_result`` (sdetr's
``MOASHA`` and Ray Tune's ``AsyncHyperBandScheduler`` on AP) are driven by an asynchronous event loop
with ``--workers`` parallel trial slots. Each configuration is (backbone, rho, lr):

- GFLOPs: the official Sparse DETR README's table (fvcore, val mean; R50 rho 0.1..0.5: 105.4, 112.9,
  120.5, 128.0, 135.6; Swin-T: 113.4, 121.0, 128.5, 136.1, 143.7), a least-squares line per backbone
  for rho in 0.05..1.0 (the cost is linear in the kept tokens).
- Final AP: the same README's APs per rho (R50 45.3..46.3, Swin-T 48.2..49.3), interpolated, below
  rho 0.1 extrapolated with the 0.1-0.2 slope, above 0.5 held flat (an assumption: the table stops
  there); minus an lr penalty 3 * log10(lr / 2e-4)^2 (lr log-uniform in [2e-5, 2e-3]); plus N(0, 0.3).
- Learning curve: AP(e) = final * (1 - exp(-e / tau)) / (1 - exp(-max_t / tau)) + N(0, 0.15) per
  evaluation, tau = max_t / 4 * sqrt(2e-4 / lr) * U(0.8, 1.25): a larger lr learns faster early and may
  end lower, so curves cross and no scheduler can rank perfectly.

Every method sees the same configurations in the same order with the same curves per seed (the i-th
trial any method starts is the i-th configuration of the stream). One epoch of a trial takes its GFLOPs
in time, so compute = GFLOP-epochs = workers x wall time (also shown: trial-epochs).

Front and hypervolume: only trials trained to max_t are on the front (stopped ones stay off it, as in
sdetr's Pareto plot); hypervolume of (final AP up, GFLOPs down) against the reference point
(AP 42, 190 GFLOPs), fixed before running: about the worst final AP and above the most expensive model.
Full budget: the first --trials configurations all trained to max_t (no early stopping).

Table A: the same --trials configurations with each scheduler (a sweep with num_samples = trials).
Table B: equal compute budgets; configurations are drawn from the stream until the budget is spent.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from sdetr.platform.sweeps.moasha import MOASHA
from sdetr.platform.sweeps.nondominated import hypervolume_2d

RHOS = (0.1, 0.2, 0.3, 0.4, 0.5)
GFLOPS = {"R50": (105.4, 112.9, 120.5, 128.0, 135.6), "Swin-T": (113.4, 121.0, 128.5, 136.1, 143.7)}
AP = {"R50": (45.3, 45.6, 46.0, 46.2, 46.3), "Swin-T": (48.2, 48.8, 49.1, 49.2, 49.3)}
REFERENCE = (42.0, 190.0)
DIRECTIONS = ("max", "min")
BUDGETS = (0.125, 0.25, 0.5, 0.75, 1.0)


def gflops_of(backbone: str, rho: float) -> float:
    ys = GFLOPS[backbone]
    mx, my = statistics.fmean(RHOS), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(RHOS, ys)) / sum((x - mx) ** 2 for x in RHOS)
    return my + slope * (rho - mx)


def paper_ap(backbone: str, rho: float) -> float:
    ys = AP[backbone]
    if rho <= RHOS[0]:
        return ys[0] + (ys[1] - ys[0]) / (RHOS[1] - RHOS[0]) * (rho - RHOS[0])
    if rho >= RHOS[-1]:
        return ys[-1]
    k = max(i for i, r in enumerate(RHOS) if r <= rho)
    return ys[k] + (ys[k + 1] - ys[k]) * (rho - RHOS[k]) / (RHOS[k + 1] - RHOS[k])


@dataclass
class Config:
    gflops: float
    curve: list[float]  # curve[e - 1]: AP reported after epoch e


def config_stream(seed: int, n: int, max_t: int) -> list[Config]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        backbone = rng.choice(("R50", "Swin-T"))
        rho = rng.choice([round(0.05 * k, 2) for k in range(1, 21)])
        lr = 10 ** rng.uniform(math.log10(2e-5), math.log10(2e-3))
        final = paper_ap(backbone, rho) - 3.0 * math.log10(lr / 2e-4) ** 2 + rng.gauss(0, 0.3)
        tau = max_t / 4 * math.sqrt(2e-4 / lr) * rng.uniform(0.8, 1.25)
        g = [1 - math.exp(-e / tau) for e in range(1, max_t + 1)]
        out.append(Config(gflops_of(backbone, rho), [final * x / g[-1] + rng.gauss(0, 0.15) for x in g]))
    return out


def make_scheduler(method: str, args):
    if method == "none":
        return None
    if method == "asha":
        from ray.tune.schedulers import AsyncHyperBandScheduler

        return AsyncHyperBandScheduler(
            time_attr="epochs_done",
            metric="AP",
            mode="max",
            max_t=args.max_t,
            grace_period=args.grace,
            reduction_factor=args.eta,
        )
    diversity = method.split("-", 1)[1]
    return MOASHA(max_t=args.max_t, grace_period=args.grace, reduction_factor=args.eta, diversity=diversity)


def simulate(method: str, stream: list[Config], args, budget: float):
    """The asynchronous loop: ``--workers`` slots take configurations from ``stream`` in order and
    train them epoch by epoch (an epoch takes its GFLOPs in time) until ``budget`` compute is spent
    or the stream is exhausted and every trial ended.

    Returns [(time trained to max_t, index)] and {index: last epoch trained}.
    """
    scheduler = make_scheduler(method, args)
    events: list[tuple[float, int, int, int]] = []  # (time, worker, trial index, epoch)
    completed: list[tuple[float, int]] = []
    last: dict[int, int] = {}
    stop_time = budget / args.workers

    def start(worker: int, now: float) -> None:
        trial = len(last)
        if trial < len(stream):
            last[trial] = 0
            if scheduler is not None:
                scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(trial)))
            heapq.heappush(events, (now + stream[trial].gflops, worker, trial, 1))

    for w in range(args.workers):
        start(w, 0.0)
    while events:
        now, worker, trial, epoch = heapq.heappop(events)
        if now > stop_time:
            break
        last[trial] = epoch
        cfg = stream[trial]
        result = {"AP": cfg.curve[epoch - 1], "gflops": cfg.gflops, "epochs_done": epoch}
        if scheduler is None:
            decision = "STOP" if epoch >= args.max_t else "CONTINUE"
        else:
            decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(trial)), result)
        if epoch >= args.max_t:
            completed.append((now, trial))
        if decision == "STOP" or epoch >= args.max_t:
            start(worker, now)
        else:
            heapq.heappush(events, (now + cfg.gflops, worker, trial, epoch + 1))
    return completed, last


def hv(points: list[Config]) -> float:
    return hypervolume_2d([(c.curve[-1], c.gflops) for c in points], DIRECTIONS, REFERENCE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=64, help="configurations of the full-budget sweep")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--max-t", dest="max_t", type=int, default=24)
    parser.add_argument("--grace", type=int, default=3)
    parser.add_argument("--eta", type=int, default=2)
    args = parser.parse_args()
    methods = ("none", "asha", "moasha-crowding", "moasha-hypervolume")
    print(
        f"{args.seeds} seeds, {args.trials} configurations, {args.workers} workers, max_t {args.max_t}, "
        f"grace {args.grace}, eta {args.eta}; reference point AP {REFERENCE[0]}, {REFERENCE[1]} GFLOPs"
    )
    table_a = {m: [] for m in methods}
    table_b = {(m, b): [] for m in methods for b in BUDGETS}
    for seed in range(args.seeds):
        stream = config_stream(seed, 40 * args.trials, args.max_t)
        full = stream[: args.trials]
        full_compute = sum(c.gflops * args.max_t for c in full)
        full_hv = hv(full)
        for m in methods:
            done, spent, epochs = simulate_fixed(m, stream, args)
            table_a[m].append((spent / full_compute, epochs / (args.trials * args.max_t), hv(done) / full_hv))
            completed, _ = simulate(m, stream, args, budget=max(BUDGETS) * full_compute)
            for b in BUDGETS:
                t_b = b * full_compute / args.workers
                table_b[(m, b)].append(hv([stream[t] for when, t in completed if when <= t_b]) / full_hv)
    print_tables(methods, table_a, table_b, args)
    return 0


def simulate_fixed(method: str, stream: list[Config], args):
    """The first --trials configurations with ``method``: (trained-to-max_t configs, GFLOP-epochs,
    trial-epochs)."""
    subset = stream[: args.trials]
    completed, last = simulate(method, subset, args, budget=math.inf)
    spent = sum(subset[t].gflops * e for t, e in last.items())
    return [subset[t] for _, t in completed], spent, sum(last.values())


def print_tables(methods, table_a, table_b, args) -> None:
    def stats(xs):
        return f"{statistics.fmean(xs):.3f} (median {statistics.median(xs):.3f}, min {min(xs):.3f})"

    print("\nA. the same configurations, each trained to max_t or stopped by the scheduler")
    print(f"{'method':<20} {'GFLOP-epochs / full':>20} {'epochs / full':>14}   hypervolume / full")
    for m in methods:
        compute, epochs, ratio = zip(*table_a[m])
        print(
            f"{m:<20} {statistics.fmean(compute):>20.3f} {statistics.fmean(epochs):>14.3f}   {stats(ratio)}"
        )
    print("\nB. equal compute budgets (GFLOP-epochs / full budget): hypervolume / full, mean over seeds")
    print(f"{'budget':<8}" + "".join(f"{m:>20}" for m in methods) + "   MOASHA(crowding) > ASHA in seeds")
    for b in BUDGETS:
        wins = sum(x > y for x, y in zip(table_b[("moasha-crowding", b)], table_b[("asha", b)]))
        print(
            f"{b:<8.3f}"
            + "".join(f"{statistics.fmean(table_b[(m, b)]):>20.3f}" for m in methods)
            + f"   {wins}/{len(table_b[('asha', b)])}"
        )


if __name__ == "__main__":
    sys.exit(main())
