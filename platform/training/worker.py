"""One Ray Train worker (``train_func``): DDP training with exact, step-level resume.

The worker's state is explicit (worker_state.py): `WorkerSetup` (fixed for the attempt), `Modules`
(model, criterion, optimiser...) and `Progress` (position, running sums, history). The functions below
take them as arguments; nothing is shared through closures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode

from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.checkpoint import save_atomic
from sdetr.detector.config import Config
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.platform import tracking
from sdetr.platform.layout import METRICS_SPOOL, STATE_FILE, append_jsonl, worker_status_file, write_json
from sdetr.platform.metric_logger import MetricLogger
from sdetr.platform.ray_logging import quiet_report_log
from sdetr.platform.shards.dataset import coco_ground_truth
from sdetr.platform.shards.reader import iter_epoch
from sdetr.platform.storage import Location
from sdetr.platform.training.checkpointing import record_event, rng_state, seed_everything
from sdetr.platform.training.engine import evaluate, train_one_epoch
from sdetr.platform.training.local import init_from_checkpoint
from sdetr.platform.training.optim import build_optimizer
from sdetr.platform.training.pictures import PICTURES_DIR, epoch_dir_name, val_pictures
from sdetr.platform.training.report import (
    COCO_METRICS,
    TrainReport,
    epoch_record,
    format_record,
    mlflow_epoch_metrics,
    write_history,
)
from sdetr.platform.training.worker_state import (
    Modules,
    Progress,
    WorkerSetup,
    checkpoint_state,
    fresh_checkpoint_name,
    restore_progress,
)

STEP_MARKER = "train/loss"  # the per-step series whose last logged step gates replays after a resume
EPOCH_MARKER = "epoch"  # logged once per epoch at step=epoch; gates duplicate epoch metrics


def train_func(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker; ``config`` is the driver's plain ``train_loop_config``."""
    quiet_report_log()
    setup = make_setup(config)
    if setup.workers_dir is not None:
        setup.workers_dir.mkdir(parents=True, exist_ok=True)
        (setup.workers_dir / f"rank{setup.rank}.pid").write_text(f"{os.getpid()}\n")
    torch.set_num_threads(int(config.get("threads", 1)))
    if setup.device.type == "cpu":
        # Cheap on CPU; with gloo's fixed-order all-reduce, runs repeat bit for bit. Not its NaN fill of
        # every new tensor (a check for reads of uninitialised memory, not needed for determinism): 9 % of
        # a bf16 demo step's CPU time (docs/benchmarks.md, "Demo").
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    modules = build_modules(setup)
    progress = restore_progress(setup, modules)
    logger = None
    if setup.rank == 0 and config.get("mlflow"):
        # Metrics the tracking server cannot take (it went away) wait in the run folder's spool file.
        spool = f"{setup.run_folder}/{METRICS_SPOOL}"
        tracked = config["mlflow"]
        logger = MetricLogger(tracked["tracking_uri"], tracked["run_id"], spool=spool)
        # Steps and epochs replayed since the last checkpoint were logged before the failure.
        logger.restore_floor(STEP_MARKER)
        logger.restore_floor(EPOCH_MARKER)
    coco_gt = coco_ground_truth(setup.data, "val", setup.cfg.data.max_val_images) if setup.rank == 0 else None
    shards = {"train": ray.train.get_dataset_shard("train"), "val": ray.train.get_dataset_shard("val")}
    while progress.epoch < setup.cfg.optim.epochs:
        record = train_epoch(setup, modules, progress, logger, shards["train"])
        if is_eval_epoch(setup.cfg, progress.epoch):
            record.update(evaluate_epoch(setup, modules, shards["val"], coco_gt, progress.epoch))
            if setup.rank == 0:
                log_pictures(setup, modules, coco_gt, progress.epoch, logger)
        finish_epoch(setup, modules, progress, logger, record)


def make_setup(config: dict[str, Any]) -> WorkerSetup:
    ctx = ray.train.get_context()
    return WorkerSetup(
        cfg=Config.from_dict(config["config"], source="train_loop_config"),
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        steps_per_epoch=int(config["steps_per_epoch"]),
        data=config["data"],
        run_dir=Path(config["run_dir"]) if config.get("run_dir") else None,
        checkpoint_root=config["checkpoint_root"],
        node_id=ray.get_runtime_context().get_node_id(),
        trace_data=bool(config.get("trace_data")),
        print_epochs=bool(config.get("print_epochs", True)),
    )


def build_modules(setup: WorkerSetup) -> Modules:
    cfg = setup.cfg
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    if cfg.train.init_from:
        # Fine-tuning: every rank loads the same checkpoint before DDP wraps the model (a resumed run
        # then restores its own checkpoint over it); the report is printed once, by rank 0.
        init_from_checkpoint(model, cfg, log=print if setup.rank == 0 else None)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # conv weights NHWC; their outputs follow
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    core = model.module if hasattr(model, "module") else model
    optimizer, scheduler = build_optimizer(core, cfg.optim, global_batch=cfg.optim.batch_size * setup.world)
    fp16 = cfg.train.amp == "fp16" and setup.device.type == "cuda"
    return Modules(
        model=model,
        core=core,
        criterion=build_criterion(cfg.model, cfg.loss).to(setup.device),
        postprocess=PostProcess(),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if fp16 else None,
    )


def train_epoch(setup: WorkerSetup, modules: Modules, progress: Progress, logger, shard) -> dict[str, float]:
    """Train the rest of ``progress.epoch``; returns the epoch's record (means over all ranks)."""
    cfg, epoch = setup.cfg, progress.epoch
    if progress.batches_done == 0:
        # Per-(seed, epoch, rank) streams: a resumed run draws exactly what an uninterrupted one does.
        seed_everything(cfg.train.seed + 1000 * epoch + setup.rank)
    t0 = time.monotonic()
    batches = iter_epoch(shard, cfg, "train", epoch, cfg.optim.batch_size, skip_batches=progress.batches_done)
    train_one_epoch(
        modules.model,
        modules.criterion,
        traced(batches, setup, epoch),
        modules.optimizer,
        setup.device,
        clip_max_norm=cfg.optim.clip_max_norm,
        amp=cfg.train.amp,
        scaler=modules.scaler,
        on_step=partial(after_step, setup, modules, progress, logger),
        start_step=progress.batches_done,
    )
    modules.scheduler.step()
    count = int(progress.epoch_sums.pop("_count", 0))
    means = all_reduce_means(progress.epoch_sums, count, setup.device)
    return epoch_record(epoch, time.monotonic() - t0, means)


def after_step(
    setup: WorkerSetup, modules: Modules, progress: Progress, logger, step: int, metrics: dict[str, float]
) -> None:
    """Bookkeeping after optimiser step ``step`` (batches done this epoch): sums, MLflow, checkpoints."""
    cfg = setup.cfg
    progress.batches_done = step
    progress.global_step += 1
    for k, v in metrics.items():
        progress.epoch_sums[k] = progress.epoch_sums.get(k, 0.0) + v
        progress.window_sums[k] = progress.window_sums.get(k, 0.0) + v
    progress.epoch_sums["_count"] = progress.epoch_sums.get("_count", 0.0) + 1
    progress.window_count += 1
    log_every = max(1, cfg.train.log_every_steps)
    if progress.global_step % log_every == 0:
        if logger is not None:
            means = {f"train/{k}": v / progress.window_count for k, v in progress.window_sums.items()}
            if logger.log(means, progress.global_step, marker=STEP_MARKER):
                logger.flush()
        progress.window_sums.clear()
        progress.window_count = 0
    every = cfg.train.checkpoint_every_steps
    if every > 0 and progress.global_step % every == 0 and step < setup.steps_per_epoch:
        save_and_report(setup, modules, progress, logger, {"loss": metrics["loss"]})
    if setup.workers_dir is not None:
        status = {"pid": os.getpid(), "node_id": setup.node_id, "epoch": progress.epoch, "step": step}
        status.update(global_step=progress.global_step, steps_per_epoch=setup.steps_per_epoch)
        write_json(setup.workers_dir / worker_status_file(setup.rank), status)


def is_eval_epoch(cfg: Config, epoch: int) -> bool:
    return (epoch + 1) % max(cfg.train.eval_every_epochs, 1) == 0 or epoch + 1 == cfg.optim.epochs


def evaluate_epoch(setup: WorkerSetup, modules: Modules, shard, coco_gt, epoch: int) -> dict[str, float]:
    """COCO metrics of the model after ``epoch`` (the same dict on every rank)."""
    cfg = setup.cfg
    if setup.world > 1:
        # BatchNorm statistics drift apart between DDP's per-forward broadcasts: evaluate the
        # checkpointed model (rank 0's) everywhere.
        for buf in modules.core.buffers():
            dist.broadcast(buf, src=0)
    # Every worker reads the whole val set and decodes its own slice of each batch.
    batches = iter_epoch(
        shard, cfg, "val", epoch, cfg.optim.batch_size, rank=setup.rank, world_size=setup.world
    )
    metrics = evaluate(modules.core, modules.postprocess, batches, coco_gt, setup.device, amp=cfg.train.amp)
    if setup.world > 1:  # rank 0 alone has the COCO metrics; report the same on every rank
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics or {}


def finish_epoch(
    setup: WorkerSetup, modules: Modules, progress: Progress, logger, record: dict[str, float]
) -> None:
    """Log, checkpoint and report the finished epoch, then move to the next."""
    progress.history.append(record)
    progress.epoch_sums = {}
    progress.batches_done = setup.steps_per_epoch
    if logger is not None:
        # The step stays the 0-based epoch (resume floors and older runs count that way); the `epoch`
        # value is the epochs done, counted from 1, as a person reads it.
        metrics = {EPOCH_MARKER: progress.epoch + 1, **mlflow_epoch_metrics(record), **percent_twins(record)}
        if logger.log(metrics, progress.epoch, marker=EPOCH_MARKER):
            logger.flush()
    if setup.rank == 0 and setup.print_epochs:
        print(format_record(record))
    save_and_report(setup, modules, progress, logger, {k: v for k, v in record.items() if k != "epoch"})
    progress.epoch, progress.batches_done = progress.epoch + 1, 0


def percent_twins(record: dict[str, float]) -> dict[str, float]:
    """COCO AP in percent under top-level names (``AP_percent``, ``AP50_percent``, ...): what a person reads
    in the MLflow UI and charts, next to the fractions in ``val/AP*`` that COCOeval reports."""
    return {f"{k}_percent": 100.0 * record[k] for k in COCO_METRICS if record.get(k) is not None}


def log_pictures(setup: WorkerSetup, modules: Modules, coco_gt, epoch: int, logger) -> None:
    """After evaluating ``epoch``: pictures of a few fixed val images (boxes; for Sparse DETR the scoring
    network's scores, the kept tokens and the DAM target) into ``<run>/pictures/epoch_NNN/`` and the
    MLflow run. A picture that fails is a warning: it must never stop training. A run folder on object
    storage gets them through a local temporary folder."""
    relative = f"{PICTURES_DIR}/{epoch_dir_name(epoch)}"
    scratch = None if setup.run_dir is not None else Path(tempfile.mkdtemp(prefix="sdetr-pictures-"))
    folder = (setup.run_dir or scratch) / relative
    names = {int(c["id"]): str(c["name"]) for c in coco_gt.cats.values()} if coco_gt is not None else None
    try:
        val_pictures(modules.core, setup.data, setup.cfg, folder, setup.device, names)
        if scratch is not None:
            Location(setup.checkpoint_root).upload_tree(folder, relative)
        if logger is not None:
            client = tracking.client(logger.tracking_uri)
            client.log_artifacts(logger.run_id, str(folder), artifact_path=relative)
    except Exception as exc:  # noqa: BLE001 - pictures are for people; the run goes on without them
        print(f"warning: pictures of epoch {epoch + 1} not written: {type(exc).__name__}: {exc}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def save_and_report(
    setup: WorkerSetup, modules: Modules, progress: Progress, logger, metrics: dict[str, float]
) -> None:
    """Checkpoint the current position (rank 0 writes it) and report it to Ray Train (every rank)."""
    rng_all = [rng_state()]
    if setup.world > 1:
        rng_all = [None] * setup.world
        dist.all_gather_object(rng_all, rng_state())
    dir_name = fresh_checkpoint_name(progress)
    # Local (or shared-mount) storage: rank 0 writes the checkpoint in place and Ray only registers it,
    # instead of writing a temporary copy that Ray then copies again.
    in_place = setup.run_dir is not None
    checkpoint = tmp = None
    if setup.rank == 0:
        folder = setup.run_dir / dir_name if in_place else Path(tempfile.mkdtemp(prefix="sdetr-ckpt-"))
        tmp = None if in_place else folder
        save_atomic(checkpoint_state(setup, modules, progress, rng_all), folder / STATE_FILE)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    # history.json, the per-epoch results readable without Ray or torch (sweep status, a finished trial's
    # rerun), lists an epoch once its checkpoint is stored and before Ray hears of it: a scheduler that
    # stops the trial on this report (ASHA at a rung or at max_t) ends the workers while report()
    # returns. Locally the checkpoint is in place by now; on object storage Ray uploads it inside report(),
    # and the file is written right after that upload, before the report is queued for the controller.
    epoch_end = progress.batches_done >= setup.steps_per_epoch
    upload = None
    if setup.rank == 0 and epoch_end:
        history = (setup.run_folder, setup.cfg.optim.epochs, list(progress.history))
        if in_place:
            write_history(*history)
        else:
            upload = partial(upload_then_write_history, history)
    report = TrainReport(
        epoch=progress.epoch,
        batches_done=progress.batches_done,
        global_step=progress.global_step,
        epoch_end=epoch_end,
        metrics=metrics,
    )
    mode = CheckpointUploadMode.NO_UPLOAD if in_place else CheckpointUploadMode.SYNC
    ray.train.report(
        report.to_ray(),
        checkpoint=checkpoint,
        checkpoint_dir_name=dir_name,
        checkpoint_upload_mode=mode,
        checkpoint_upload_fn=upload,
    )
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if setup.rank == 0:
        record_event(
            setup.run_folder,
            event="checkpoint",
            name=dir_name,
            epoch=progress.epoch,
            batches_done=progress.batches_done,
        )
    if logger is not None:
        logger.set_tags({"sdetr.checkpoint": f"{setup.checkpoint_root}/{dir_name}"})


def upload_then_write_history(
    history: tuple[Path | str, int, list[dict[str, Any]]], checkpoint: ray.train.Checkpoint, dir_name: str
) -> ray.train.Checkpoint:
    """A ``checkpoint_upload_fn`` for object storage: Ray's own upload of the checkpoint, then
    ``write_history(*history)``; both before ``ray.train.report`` queues the report."""
    stored = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    write_history(*history)
    return stored


def traced(batches, setup: WorkerSetup, epoch: int):
    """The batches, with their image ids appended to ``workers/rank<r>.data.jsonl`` when tracing."""
    trace = None
    if setup.trace_data and setup.workers_dir is not None:
        trace = setup.workers_dir / f"rank{setup.rank}.data.jsonl"
    for images, masks, targets in batches:
        if trace is not None:
            append_jsonl(trace, {"epoch": epoch, "image_ids": [int(t["image_id"]) for t in targets]})
        yield images, masks, targets


def all_reduce_means(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Means over all ranks of per-step sums (the same keys on every rank)."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    total = max(values[-1].item(), 1.0)
    return {k: values[i].item() / total for i, k in enumerate(keys)}
