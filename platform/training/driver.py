"""The Ray Train driver: ``sdetr train --preset P --data PATH --workers N`` and each sweep trial.

`run` checks everything (`run_plan.plan_run`) and launches; a sweep's trial driver launches its own
checked plan. `launch` continues an earlier attempt of the same run (refusing a different config),
creates or continues the run's MLflow run once, writes the run folder's config and record, and hands
a plain config dict to a ``TorchTrainer`` whose workers run `worker.train_func`.

A run lives in ``<storage>/<name>`` (file names in platform/layout.py). Running the same command again
continues the run: Ray finds its snapshot, the workers restore the latest readable checkpoint at its
exact step, and the same MLflow run receives the new metrics.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray
import ray.train
from ray.data import DataContext
from ray.train.torch import TorchConfig, TorchTrainer

from sdetr.detector.config import Config
from sdetr.detector.errors import SdetrError
from sdetr.platform import tracking
from sdetr.platform.layout import CONFIG_FILE, RUN_RECORD, STATE_FILE
from sdetr.platform.metric_logger import MetricLogger
from sdetr.platform.ray_logging import init_ray, train_logging_config
from sdetr.platform.shards.reader import dataset_config, read_split
from sdetr.platform.training.checkpointing import remove_interrupted_writes
from sdetr.platform.training.run_plan import DistributedOptions, RunPlan, check_previous_run, plan_run
from sdetr.platform.training.worker import train_func
from sdetr.platform.uris import redact

try:  # Ray 2.60's layout; without it the trainer keeps its default callbacks
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # pragma: no cover - another Ray version
    PlacementGroupCleanerCallback = None


class Trainer(TorchTrainer):
    """``TorchTrainer`` without Ray Train's placement-group cleaner.

    The cleaner (a detached actor per run) asks the state API every second whether the run's controller
    is alive and removes the run's placement group when the answer is "not found". On a loaded machine
    the state API answers "not found" for a live controller: the cleaner then removes the placement
    group of a running run and every worker dies with "Destroying worker since its placement group was
    removed" (seen in CI and reproduced here at load ~13). A run's placement group belongs to its
    job and goes with it; without the cleaner, only a controller that dies while its driver lives on
    (a sweep whose trial controller was killed) leaves one behind until the sweep ends.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if PlacementGroupCleanerCallback is None:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]


# Ray Train 2.60 replaces ``print`` in its workers with one that logs each line to the root logger and,
# where ``sys.stdout`` is not the process's own (Ray's workers wrap it), prints it as well: every line
# of a worker reached the terminal twice, and ``contextlib.redirect_stdout`` no longer silenced
# pycocotools' progress prints (the logger copy bypasses it). The workers keep Python's own ``print``.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


class TrainingFailed(SdetrError):
    """The worker group failed more often than --max-failures allows."""


def run(cfg: Config, opts: DistributedOptions, log=print) -> dict[str, Any]:
    """Train ``cfg`` on a Ray cluster; returns a summary (run folder, checkpoint, metrics, MLflow run)."""
    return launch(plan_run(cfg, opts, log), log)


def launch(plan: RunPlan, log=print) -> dict[str, Any]:
    """Run a checked plan to its last epoch (or continue it); see the module docstring."""
    cfg, storage = plan.cfg, plan.storage
    record = check_previous_run(storage, cfg, plan.workers)
    if storage.local is not None:
        remove_interrupted_writes(storage.local, log)  # of a driver or worker killed mid-write
    tracked = start_tracking(plan, record, log)
    storage.write_text(CONFIG_FILE, cfg.to_yaml())
    run_record = {
        "name": storage.name,
        "workers": plan.workers,
        "data": plan.data_path,
        # Never a password: the record is a file on shared storage.
        "mlflow": {**tracked.to_dict(), "tracking_uri": redact(tracked.tracking_uri)} if tracked else None,
        "created": (record or {}).get("created", time.time()),
    }
    storage.write_text(RUN_RECORD, json.dumps(run_record, indent=1))
    gpus = f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else ""
    log(
        f"{'resuming' if record is not None else 'starting'} run {storage.run_dir}: {plan.workers} workers x "
        f"{plan.cpus_per_worker:g} CPU{gpus}, {plan.steps_per_epoch} steps/epoch, {cfg.optim.epochs} epochs"
    )
    try:
        result = fit(plan, tracked, log)
    except BaseException as exc:
        mark_run(tracked, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", log)
        raise
    mark_run(tracked, "FINISHED", log)
    checkpoint = result.checkpoint
    return {
        "run_dir": storage.run_dir,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "state_file": f"{checkpoint.path}/{STATE_FILE}" if checkpoint is not None else None,
        "metrics": dict(result.metrics or {}),
        "mlflow": tracked.to_dict() if tracked else None,
        "data": plan.data_path,
    }


def mark_run(tracked, status: str, log=print) -> None:
    """Set the MLflow run's end status; a tracking server that is away does not fail a finished run."""
    if tracked is None:
        return
    try:
        tracking.finish_run(tracked.tracking_uri, tracked.run_id, status)
    except Exception as exc:  # the server's client raises several kinds; the training result stands
        shown = redact(tracked.tracking_uri)
        reason = short_reason(exc).replace(tracked.tracking_uri, shown)
        log(
            f"warning: could not mark MLflow run {tracked.run_id} {status} at {shown} ({reason}); "
            "it shows RUNNING until the run is started again"
        )


def start_tracking(plan: RunPlan, record: dict | None, log=print):
    """Create the run's MLflow run, or continue the one of an earlier attempt. Created here, once, by the
    driver: concurrent creation by the workers would race."""
    placement, storage, cfg = plan.mlflow, plan.storage, plan.cfg
    if placement.tracking_uri is None:
        return None
    if storage.root_local is not None:
        storage.root_local.mkdir(parents=True, exist_ok=True)
    params = dict(cfg.flat())
    params.update(
        {
            "ray.workers": plan.workers,
            "ray.global_batch": cfg.optim.batch_size * plan.workers,
            "ray.run_dir": storage.run_dir,
        }
    )
    params.update(placement.params)
    previous = (record or {}).get("mlflow") or {}
    same_store = previous.get("tracking_uri") == redact(placement.tracking_uri)
    tracked = tracking.start_run(
        placement.tracking_uri,
        storage.name,
        experiment=placement.experiment,
        artifact_location=storage.artifact_location(),
        previous_run_id=previous.get("run_id") if same_store else None,
        params=params,
        tags={"sdetr.run_dir": storage.run_dir, "sdetr.preset": cfg.preset, **placement.tags},
        parent_run_id=placement.parent_run_id,
        # A run created just before the driver died, before its id reached the run record.
        match_tags={"sdetr.run_dir": storage.run_dir},
        log=log,
    )
    if placement.metrics and not tracked.resumed:
        logger = MetricLogger(placement.tracking_uri, tracked.run_id)
        logger.log(placement.metrics, 0)
        logger.flush()
    return tracked


def fit(plan: RunPlan, tracked, log=print):
    """The ``TorchTrainer`` of the plan, fitted (Ray resumes a named run from its snapshot).

    Ray Train retries a worker that dies while training (``max_failures``), but not one that dies while
    its worker group starts or restarts (Ray 2.60 calls the new workers' ``init_train_context`` outside
    its retry path): that surfaces as a ``ControllerError`` around a ``RayActorError`` and ends the fit.
    It is the same lost process, so it is retried here from the run's snapshot, within the same
    ``max_failures`` budget.
    """
    init_ray(plan.address)
    lost = 0
    while True:
        try:
            return build_trainer(plan, tracked).fit()
        except ray.train.TrainingFailedError as exc:
            if lost_worker_at_start(exc) and lost < plan.max_failures:
                lost += 1
                log(
                    f"warning: Ray Train lost a worker while (re)starting its group ({short_reason(exc)}); "
                    f"continuing the run from its last checkpoint (retry {lost} of {plan.max_failures})"
                )
                continue
            raise TrainingFailed(f"training failed after {plan.max_failures} restart(s): {exc}") from exc


def lost_worker_at_start(exc: BaseException) -> bool:
    """Whether a failed fit is Ray Train's controller giving up on a dead worker actor."""
    failure = getattr(exc, "controller_failure", None)
    return isinstance(exc, ray.train.ControllerError) and isinstance(failure, ray.exceptions.RayActorError)


def short_reason(exc: BaseException) -> str:
    """The first line of an error (of a Ray Train controller error, the failure it wraps)."""
    text = str(getattr(exc, "controller_failure", exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_trainer(plan: RunPlan, tracked) -> Trainer:
    """The plan's ``TorchTrainer``; named after the run, so a second one continues the first."""
    cfg, storage = plan.cfg, plan.storage
    ctx = DataContext.get_current()
    # Exact resume needs every worker to get the same rows in the same order each epoch.
    ctx.execution_options.preserve_order = True
    # Per-worker, per-dataset progress bars drown the per-epoch lines; the datasets copy this context.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    use_gpu = plan.gpus_per_worker > 0
    resources = {"CPU": plan.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    keep = cfg.train.keep_checkpoints
    return Trainer(
        train_func,
        train_loop_config={
            "config": cfg.to_dict(),
            "data": plan.data_path,
            "run_dir": str(storage.local) if storage.local is not None else None,
            "checkpoint_root": storage.run_dir,
            "steps_per_epoch": plan.steps_per_epoch,
            "threads": max(1, int(plan.cpus_per_worker)),
            "mlflow": tracked.to_dict() if tracked else None,
            "trace_data": plan.trace_data,
            "print_epochs": plan.print_epochs,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=storage.name,
            storage_path=storage.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
            # The newest checkpoint is always kept; keeping at least two lets a torn newest one fall
            # back to the one before.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep if keep > 0 else None),
            callbacks=list(plan.callbacks),
            worker_runtime_env=WORKER_RUNTIME_ENV,
            logging_config=train_logging_config(),
        ),
        datasets={
            "train": read_split(plan.data_path, "train", max_images=cfg.data.max_train_images),
            "val": read_split(plan.data_path, "val", max_images=cfg.data.max_val_images),
        },
        dataset_config=dataset_config(),
    )
