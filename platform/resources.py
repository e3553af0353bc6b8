"""The one CPU/GPU budget of the platform: how many CPUs each Ray Train worker reserves, how many sweep
trials run at once, and how much is left for Ray Data's reads.

Train workers that reserve every CPU starve Ray Data's read tasks and the run hangs ("Cluster
resources are not enough to run any task"), so every plan keeps `data_cpu_headroom()` CPUs free.
Tune does not see the Train workers' placement groups either, so sweeps cap their concurrent trials
here rather than let Tune start trials that would wait on each other.
"""

from __future__ import annotations

import math
import os

from sdetr.detector.errors import ConfigError

READ_TASK_CPUS = 0.25  # a read task only moves bytes from Parquet into the object store
MAX_CONCURRENT_READS = 2  # read tasks the headroom leaves room for (more run when more CPUs are free)
TRIAL_DRIVER_CPUS = 0.01  # a Tune trial's actor only waits on its TorchTrainer


class ResourceError(ConfigError):
    """What a run or sweep asks for does not fit the Ray cluster."""


def data_cpu_headroom() -> float:
    """CPUs that Train workers never reserve, so Ray Data's read tasks can run."""
    return READ_TASK_CPUS * MAX_CONCURRENT_READS


def cpus_per_worker(workers: int, requested: float | None, total_cpus: float) -> float:
    """CPUs each of ``workers`` Train workers reserves: ``requested``, or up to 1 each within the budget.

    ``requested=None`` may not put more workers than CPUs on the cluster (say so rather than pack
    them silently); an explicit value may pack several onto one CPU.
    """
    if workers < 1:
        raise ResourceError(f"workers {workers}: need at least 1 worker")
    budget = total_cpus - data_cpu_headroom()
    if requested is None:
        if workers > total_cpus:
            raise ResourceError(
                f"{workers} workers, but the Ray cluster has {total_cpus:g} CPUs; use at most "
                f"{int(total_cpus)} workers (or pack several onto a CPU with an explicit CPUs per worker)"
            )
        return math.floor(min(1.0, budget / workers) * 100) / 100
    if requested <= 0:
        raise ResourceError(f"CPUs per worker {requested:g}: must be positive")
    return requested


def check_fits(workers: int, cpus: float, gpus_per_worker: float, cluster: dict[str, float], extra_cpus=0.0):
    """Refuse a worker group (plus ``extra_cpus`` for its driver) that the cluster cannot hold."""
    total_cpus, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if gpus_per_worker < 0:
        raise ResourceError(f"GPUs per worker {gpus_per_worker:g}: must be >= 0")
    if workers * gpus_per_worker > total_gpus + 1e-9:
        raise ResourceError(
            f"{workers} workers x {gpus_per_worker:g} GPUs = {workers * gpus_per_worker:g} GPUs, "
            f"but the Ray cluster has {total_gpus:g}"
        )
    usable = total_cpus - data_cpu_headroom()
    if cpus <= 0 or workers * cpus + extra_cpus > usable + 1e-9:
        most = max(usable - extra_cpus, 0) / workers
        raise ResourceError(
            f"{workers} workers x {cpus:g} CPUs = {workers * cpus:g} CPUs, but the Ray cluster has "
            f"{total_cpus:g} and {data_cpu_headroom():g} must stay free for Ray Data's reads (or the run "
            f"hangs); use fewer workers or at most {most:.2f} CPUs per worker"
        )


def plan_run(workers: int, requested_cpus: float | None, gpus_per_worker: float, cluster: dict[str, float]):
    """CPUs per worker of one Ray Train run on ``cluster``."""
    cpus = cpus_per_worker(workers, requested_cpus, cluster.get("CPU", 0.0))
    check_fits(workers, cpus, gpus_per_worker, cluster)
    return cpus


def plan_trials(
    workers: int,
    requested_cpus: float | None,
    gpus_per_worker: float,
    cluster: dict[str, float],
    max_concurrent: int = 0,
    max_trials: int = 0,
) -> tuple[float, int]:
    """CPUs per worker and how many trials (each ``workers`` Train workers + a trial driver) run at once.

    ``max_concurrent`` and ``max_trials`` (0: no limit) cap the number further.
    """
    cpus = cpus_per_worker(workers, requested_cpus, cluster.get("CPU", 0.0))
    check_fits(workers, cpus, gpus_per_worker, cluster, extra_cpus=TRIAL_DRIVER_CPUS)
    per_trial = workers * cpus + TRIAL_DRIVER_CPUS
    fit = int((cluster.get("CPU", 0.0) - data_cpu_headroom() + 1e-9) // per_trial)
    if gpus_per_worker > 0:
        fit = min(fit, int((cluster.get("GPU", 0.0) + 1e-9) // (workers * gpus_per_worker)))
    return cpus, max(1, min(fit, max_concurrent or fit, max_trials or fit))


def cluster_resources(address: str | None) -> dict[str, float]:
    """Total CPUs/GPUs of the cluster a run will use; a local one is not started just to ask."""
    import ray  # slow to import: only when a command needs the cluster

    if ray.is_initialized() or address:
        if not ray.is_initialized():
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
        res = ray.cluster_resources()
        return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
    import torch  # slow to import: only to count local GPUs

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
