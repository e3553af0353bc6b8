"""Everything a Ray Train run needs decided before a worker starts, and the checks that decide it.

`plan_run` is what ``sdetr train --workers N`` calls: it checks everything a user can get wrong (data,
devices, the cluster's CPUs and GPUs, an earlier run under the same name) and returns a `RunPlan`. A
sweep's trial driver builds its `RunPlan` with `trial_plan` instead, from what the sweep driver already
checked once for all trials. `driver.launch` runs a plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdetr.detector.config import Config
from sdetr.detector.errors import ConfigError, DataError
from sdetr.detector.precision import amp_dtype, slow_bf16_note
from sdetr.platform import tracking
from sdetr.platform.layout import (
    CHECKPOINT_GLOB,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DEFAULT_STORAGE,
    RUN_RECORD,
    SHARDS_DIR,
)
from sdetr.platform.resources import ResourceError, check_fits, cluster_resources, cpus_per_worker
from sdetr.platform.shards.dataset import check_shards
from sdetr.platform.shards.manifest import MANIFEST
from sdetr.platform.shards.reader import num_categories_max_id, steps_per_epoch
from sdetr.platform.shards.writer import shard_coco
from sdetr.platform.storage import RunStorage, is_uri
from sdetr.platform.training.checkpointing import RESUMABLE_DISTRIBUTED, check_schedule, config_differences
from sdetr.platform.uris import check_tracking_uri


@dataclass
class DistributedOptions:
    """The Ray options of ``sdetr train`` (see the CLI's help)."""

    workers: int
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: up to 1 each, leaving Ray Data its headroom
    storage: str | None = None
    name: str | None = None
    address: str | None = None
    mlflow_uri: str | None = None
    max_failures: int = 3
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    # Workers append the image ids of every batch to workers/rank<r>.data.jsonl (tests, debugging).
    trace_data: bool = False


@dataclass
class MlflowPlacement:
    """Where a run's MLflow run goes and what it is given once, when it is created (sweeps set these)."""

    tracking_uri: str | None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # logged at step 0 of a new run


@dataclass
class RunPlan:
    cfg: Config  # resolved: device, absolute data root, output folder
    storage: RunStorage
    data_path: str  # the shard folder
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    steps_per_epoch: int
    mlflow: MlflowPlacement
    address: str | None = None
    max_failures: int = 3
    trace_data: bool = False
    callbacks: list = field(default_factory=list)  # Ray Train callbacks (a sweep forwards reports to Tune)
    print_epochs: bool = True  # rank 0 prints each epoch's line (a sweep prints its own line per epoch)


def plan_run(cfg: Config, opts: DistributedOptions, log=print) -> RunPlan:
    """Check ``cfg`` and ``opts`` against the data and the cluster; refuse with a message naming the
    problem before Ray starts a single worker."""
    cfg = Config.from_dict(cfg.to_dict())  # ours to adjust
    # Never unnamed: Ray's default name (a timestamp) cannot be resumed. The suffix keeps the default
    # apart from the single-process trainer's runs/<preset>.
    name = opts.name or f"{cfg.preset}-ray"
    if not name or "/" in name:
        raise ConfigError(f"--name {name!r}: a run name is one non-empty path component")
    if opts.checkpoint_every_steps is not None:
        cfg.train.checkpoint_every_steps = opts.checkpoint_every_steps
    if opts.keep_checkpoints is not None:
        cfg.train.keep_checkpoints = opts.keep_checkpoints
    if opts.max_failures < -1:
        raise ConfigError(f"--max-failures {opts.max_failures}: use -1 (no limit) or >= 0")
    if isinstance(opts.workers, bool) or not isinstance(opts.workers, int) or opts.workers < 1:
        raise ConfigError(f"--workers {opts.workers}: a run needs at least 1 worker")
    check_schedule(cfg)
    check_device(cfg, opts.gpus_per_worker, log)
    if cfg.train.time_limit_s > 0:
        # Ranks reading the clock would stop at different steps and hang DDP's collectives.
        log("note: train.time_limit_s applies to single-process training only; ignored with --workers")
    storage = RunStorage(opts.storage or DEFAULT_STORAGE, name)
    storage.root.check()  # an unknown scheme or unreachable store fails here, before Ray starts
    # So does an unreachable or misspelt tracking URI (within seconds, naming it).
    uri = tracking.resolve_tracking_uri(opts.mlflow_uri, storage.root_local)
    if uri is not None:
        check_tracking_uri(uri)
    if not is_uri(cfg.data.root) and not Path(cfg.data.root).expanduser().exists():
        prepare_data(cfg.data.root, storage, log)  # raises the "data not found" error before Ray starts
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    cluster = cluster_resources(address)
    try:
        cpus = cpus_per_worker(opts.workers, opts.cpus_per_worker, cluster["CPU"])
        check_fits(opts.workers, cpus, opts.gpus_per_worker, cluster)
    except ResourceError as exc:
        asked = f"--workers {opts.workers}"
        if opts.cpus_per_worker is not None:
            asked += f" --cpus-per-worker {opts.cpus_per_worker:g}"
        if opts.gpus_per_worker:
            asked += f" --gpus-per-worker {opts.gpus_per_worker:g}"
        raise ConfigError(f"{asked}: {exc}") from None
    data_path = prepare_data(cfg.data.root, storage, log)
    check_categories(data_path, cfg.model.num_classes)
    return resolve_plan(
        cfg,
        storage,
        data_path,
        opts.workers,
        cpus,
        opts.gpus_per_worker,
        MlflowPlacement(uri, experiment=opts.experiment),
        address=address,
        max_failures=opts.max_failures,
        trace_data=opts.trace_data,
    )


def resolve_plan(
    cfg: Config,
    storage: RunStorage,
    data_path: str,
    workers: int,
    cpus: float,
    gpus: float,
    mlflow: MlflowPlacement,
    **kwargs,
) -> RunPlan:
    """The plan of a run whose data and resources were checked: steps per epoch and the resolved config."""
    manifest = check_shards(data_path, ["train", "val"])
    steps = steps_per_epoch(
        manifest, "train", workers, cfg.optim.batch_size, max_images=cfg.data.max_train_images
    )
    if steps < 1:
        raise DataError(
            f"{data_path}: too few training images for one batch of {cfg.optim.batch_size} "
            f"on each of {workers} workers"
        )
    cfg.train.device = "cuda" if gpus > 0 else "cpu"
    if not is_uri(cfg.data.root):
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.train.output_dir = storage.run_dir
    return RunPlan(cfg, storage, data_path, workers, cpus, gpus, steps, mlflow, **kwargs)


def check_device(cfg: Config, gpus_per_worker: float, log=print) -> None:
    if gpus_per_worker > 0 and cfg.train.device == "cpu":
        raise ConfigError("train.device=cpu contradicts --gpus-per-worker; drop one of them")
    if gpus_per_worker == 0 and cfg.train.device.startswith("cuda"):
        raise ConfigError(f"train.device={cfg.train.device} needs --gpus-per-worker 1 (or more)")
    # fp16 on CPU (or an unknown mode) is refused before Ray starts; emulated bf16 gets a note.
    device_type = "cuda" if gpus_per_worker > 0 else "cpu"
    amp_dtype(cfg.train.amp, device_type)
    note = slow_bf16_note(cfg.train.amp, device_type)
    if note:
        log(note)


def check_categories(data_path: str, num_classes: int, where: str | None = None) -> None:
    max_id = num_categories_max_id(data_path)
    if max_id >= num_classes:
        raise ConfigError(
            f"{where or data_path}: category ids go up to {max_id} but model.num_classes is "
            f"{num_classes}; set model.num_classes={max_id + 1}"
        )


def prepare_data(data: str, storage: RunStorage, log=print) -> str:
    """The shard folder to read: ``data`` itself, or ``<run>/shards`` made once from a COCO root."""
    if is_uri(data):
        return data  # check_shards reads the manifest through pyarrow
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"{path}: data not found (expected a shard folder with {MANIFEST}, made by "
            "`sdetr data shard`, or a data set in the COCO 2017 layout)"
        )
    if (path / MANIFEST).is_file():
        return str(path)
    if not (path / "annotations").is_dir():
        raise DataError(
            f"{path}: neither a shard folder (no {MANIFEST}) nor a COCO 2017 layout (no annotations/)"
        )
    if storage.local is None:
        raise ConfigError(
            f"--data {path} is a COCO folder and --storage is not local: shard it first with "
            "`sdetr data shard --coco ROOT --out DIR` into a place every node reads, and pass DIR"
        )
    out = storage.local / SHARDS_DIR
    log(f"sharding {path} into {out} (once; later runs reuse it)")
    shard_coco(path, out, progress=False)
    return str(out)


def check_previous_run(storage: RunStorage, cfg: Config, workers: int) -> dict | None:
    """The run record of an earlier attempt; refuses a different config or worker count."""
    text = storage.read_text(RUN_RECORD)
    if text is None:
        if storage.local is not None and any((storage.local / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB)):
            raise ConfigError(
                f"{storage.run_dir}: holds a single-process run; choose another --name for a Ray run"
            )
        return None
    record = json.loads(text)
    saved = storage.read_text(CONFIG_FILE)
    if saved is not None:
        changed = config_differences(yaml.safe_load(saved), cfg, RESUMABLE_DISTRIBUTED)
        if changed:
            raise ConfigError(
                f"{storage.run_dir}: holds a run with a different config ({', '.join(changed[:5])} differ); "
                "choose another --name to start a new run"
            )
    if record.get("workers") not in (None, workers):
        raise ConfigError(
            f"{storage.run_dir}: was started with --workers {record['workers']}; resuming needs the same "
            "number (the data order and learning rate depend on it), or choose another --name"
        )
    return record
