"""Distributed training on Ray Train (Train V2): ``sdetr train --preset P --data PATH --workers N``.

``train_func`` runs in every worker (DDP over gloo on CPU, nccl on GPU); ``run`` is the thin driver
that checks everything a user can get wrong before any worker starts, creates the MLflow run once and
hands a plain config dict to a ``TorchTrainer``.

A run lives in ``<storage>/<name>``: Ray's checkpoint folders and run snapshot, ``config.yaml``,
``sdetr_run.json`` (the MLflow run to continue), ``events.jsonl`` (starts, checkpoints, resumes,
skipped checkpoints) and ``workers/rank<r>.pid|json`` (each worker's pid and position, for operators).
Running the same command again continues the run: Ray finds its snapshot, ``train_func`` restores the
latest readable checkpoint at its exact step, and the same MLflow run receives the new metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdetr.detector.checkpoint import read_checkpoint, save_atomic
from sdetr.detector.config import Config
from sdetr.detector.errors import CheckpointError, ConfigError, DataError, SdetrError
from sdetr.platform import tracking
from sdetr.platform.train import RESUMABLE_CHANGES, config_differences, seed_everything

STATE_FILE = "state.pth"
RUN_RECORD = "sdetr_run.json"
CONFIG_FILE = "config.yaml"
EVENTS_FILE = "events.jsonl"
HISTORY_FILE = "history.json"
WORKERS_DIR = "workers"
SHARDS_DIR = "shards"
DEFAULT_STORAGE = "runs"
# Changing these between attempts keeps it the same run (on top of the single-process trainer's list).
RESUMABLE_DISTRIBUTED = (
    *RESUMABLE_CHANGES,
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
)
DATA_CPU_RESERVE = 1.0  # CPUs never reserved by Train workers (see plan_cpus)
STEP_MARKER = "train/loss"  # the per-step series whose last logged step gates replays after a resume
EPOCH_MARKER = "epoch"  # logged once per epoch at step=epoch; gates duplicate epoch metrics


class TrainingFailed(SdetrError):
    """The worker group failed more often than --max-failures allows."""


# -- options -------------------------------------------------------------------------------------
@dataclass
class DistributedOptions:
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
    # CPUs kept free for Ray Data's reads (None: DATA_CPU_RESERVE); a sweep plans its own.
    data_reserve: float | None = None
    # Set by sweeps: Train callbacks (forwarding reports to Tune) and the trial's MLflow placement.
    callbacks: list | None = None
    mlflow_parent_run_id: str | None = None
    mlflow_tags: dict[str, str] | None = None
    mlflow_params: dict[str, Any] | None = None
    mlflow_metrics: dict[str, float] | None = None  # logged once at step 0 when the run is created


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The Ray options of ``sdetr train``; ``--workers`` switches to distributed training."""
    g = parser.add_argument_group("distributed training on Ray (used when --workers is given)")
    g.add_argument("--workers", type=int, help="number of Ray Train workers (DDP processes)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0: CPU)")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per worker (default: up to 1, always leaving some for Ray Data's reads)",
    )
    g.add_argument(
        "--storage",
        help=f"where runs live: a folder (default ./{DEFAULT_STORAGE}) or a URI such as s3://bucket/runs "
        "that every node can reach",
    )
    g.add_argument(
        "--name", help="run name (default: <preset>-ray); running the same command again resumes the run"
    )
    g.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else start one)")
    g.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else <storage>/mlflow.db); none disables",
    )
    g.add_argument(
        "--max-failures", type=int, default=3, help="worker-group restarts before giving up (default 3)"
    )
    g.add_argument(
        "--checkpoint-every-steps",
        type=int,
        help="also checkpoint every K optimiser steps (sets train.checkpoint_every_steps)",
    )
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep (sets train.keep_checkpoints)")


def options_from_args(args: argparse.Namespace) -> DistributedOptions:
    storage, name = getattr(args, "storage", None), getattr(args, "name", None)
    output = getattr(args, "output", None)
    if output is not None and storage is None and name is None:
        # --output runs/x reads as --storage runs --name x, so the single-process habit carries over.
        storage, name = str(Path(output).parent), Path(output).name
    return DistributedOptions(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        cpus_per_worker=args.cpus_per_worker,
        storage=storage,
        name=name,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        max_failures=args.max_failures,
        checkpoint_every_steps=args.checkpoint_every_steps,
        keep_checkpoints=args.keep_checkpoints,
    )


def run_from_args(args: argparse.Namespace, cfg: Config) -> int:
    """``sdetr train ... --workers N``: ``cfg`` already carries --preset/--config, --set, --data, --epochs."""
    opts = options_from_args(args)
    summary = run(cfg, opts)
    print(f"run folder: {summary['run_dir']}")
    if summary.get("mlflow"):
        print(f"MLflow: {summary['mlflow']['tracking_uri']} (run {summary['mlflow']['run_id']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sdetr.platform.ray_train train ...``: ``sdetr train`` with the Ray options, for
    when the CLI is not wired to `run_from_args` (the CLI's own ``--workers`` path is the same)."""
    import sys

    from sdetr.platform import cli

    parser = cli.build_parser()
    train_parser = next(
        a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]
    if not any("--workers" in a.option_strings for a in train_parser._actions):
        add_distributed_args(train_parser)
    args = parser.parse_args(argv)
    try:
        if args.command != "train" or not args.workers:
            return cli.main(argv)
        cfg = cli._load_config(args)
        if args.data is not None:
            cfg.data.root = str(args.data)
        if args.epochs is not None:
            cfg.optim.epochs = args.epochs
        return run_from_args(args, cfg)
    except SdetrError as exc:
        print(f"sdetr: error: {exc}", file=sys.stderr)
        return 2


# -- storage -------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class RunStorage:
    """``<storage>/<name>``: a local folder, or a URI that pyarrow's filesystems take (s3://, gs://...)."""

    def __init__(self, storage: str, name: str):
        self.name = name
        if is_uri(storage):
            import pyarrow.fs

            self.fs, base = pyarrow.fs.FileSystem.from_uri(storage)
            self.storage_path = storage.rstrip("/")
            self.fs_dir = f"{base.rstrip('/')}/{name}"
            self.local: Path | None = None
            self.run_dir = f"{self.storage_path}/{name}"
        else:
            root = Path(storage.removeprefix("file://")).expanduser().resolve()
            self.fs = None
            self.storage_path = str(root)
            self.local = root / name
            self.fs_dir = str(self.local)
            self.run_dir = str(self.local)

    @property
    def root_local(self) -> Path | None:
        return Path(self.storage_path) if self.local is not None else None

    def join(self, rel: str) -> str:
        return f"{self.run_dir}/{rel}"

    def read_text(self, rel: str) -> str | None:
        if self.local is not None:
            path = self.local / rel
            return path.read_text() if path.is_file() else None
        import pyarrow.fs

        path = f"{self.fs_dir}/{rel}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
            return
        self.fs.create_dir(self.fs_dir, recursive=True)
        with self.fs.open_output_stream(f"{self.fs_dir}/{rel}") as f:
            f.write(text.encode())

    def artifact_location(self) -> str:
        """MLflow artifacts next to the runs, on storage every node sees."""
        if self.local is not None:
            return (Path(self.storage_path) / "mlartifacts").as_uri()
        return f"{self.storage_path}/mlartifacts"


# -- checks before any worker starts ---------------------------------------------------------------
def plan_cpus(
    workers: int, cpus_per_worker: float | None, total_cpus: float, reserve: float | None = None
) -> float:
    """CPUs per worker, leaving Ray Data's read tasks their headroom: Train workers that reserve every
    CPU starve them and the run hangs ("Cluster resources are not enough to run any task")."""
    from sdetr.platform.ray_data import data_cpu_headroom

    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1 worker")
    # At least one whole CPU: Ray Data's ListFiles step asks for a full CPU whatever the read tasks
    # ask for (a 0.5-CPU headroom hung in ListFiles on Ray 2.60).
    if reserve is None:
        reserve = min(max(DATA_CPU_RESERVE, data_cpu_headroom()), total_cpus / 2)
    if cpus_per_worker is None and workers > total_cpus:
        raise ConfigError(
            f"--workers {workers}: the Ray cluster has {total_cpus:g} CPUs; use at most "
            f"{int(total_cpus)} workers (or pack more onto a CPU with an explicit --cpus-per-worker)"
        )
    budget = total_cpus - reserve
    if cpus_per_worker is None:
        return math.floor(min(1.0, budget / workers) * 100) / 100
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker:g}: must be positive")
    if workers * cpus_per_worker > budget + 1e-9:
        raise ConfigError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} = {workers * cpus_per_worker:g} "
            f"CPUs, but the cluster has {total_cpus:g} and {reserve:g} must stay free for Ray Data's read "
            f"tasks (or the run hangs); use --cpus-per-worker {budget / workers:.2f} or fewer workers"
        )
    return cpus_per_worker


def check_gpus(workers: int, gpus_per_worker: float, total_gpus: float) -> None:
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker:g}: must be >= 0")
    need = workers * gpus_per_worker
    if need > total_gpus + 1e-9:
        raise ConfigError(
            f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} needs {need:g} GPUs, "
            f"but the Ray cluster has {total_gpus:g}"
        )


def cluster_resources(address: str | None) -> dict[str, float]:
    """Total CPUs/GPUs of the cluster this run will use; a local one is not started just to ask."""
    import ray

    if ray.is_initialized() or address:
        if not ray.is_initialized():
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
        res = ray.cluster_resources()
        return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def prepare_data(data: str, storage: RunStorage, log=print) -> str:
    """The shard folder to read: ``data`` itself, or ``<run>/shards`` made once from a COCO root."""
    from sdetr.platform.shard import MANIFEST, shard_coco

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


def check_device(cfg: Config, gpus_per_worker: float) -> None:
    if gpus_per_worker > 0 and cfg.train.device == "cpu":
        raise ConfigError("train.device=cpu contradicts --gpus-per-worker; drop one of them")
    if gpus_per_worker == 0 and cfg.train.device.startswith("cuda"):
        raise ConfigError(f"train.device={cfg.train.device} needs --gpus-per-worker 1 (or more)")


def check_previous_run(storage: RunStorage, cfg: Config, opts: DistributedOptions) -> dict | None:
    """The run record of an earlier attempt; refuses a different config or worker count."""
    text = storage.read_text(RUN_RECORD)
    if text is None:
        if storage.local is not None and any((storage.local / "checkpoints").glob("checkpoint_epoch*.pth")):
            raise ConfigError(
                f"{storage.run_dir}: holds a single-process run; choose another --name for a Ray run"
            )
        return None
    record = json.loads(text)
    saved = storage.read_text(CONFIG_FILE)
    if saved is not None:
        import yaml

        changed = [
            k for k in config_differences(yaml.safe_load(saved), cfg) if k not in RESUMABLE_DISTRIBUTED
        ]
        if changed:
            raise ConfigError(
                f"{storage.run_dir}: holds a run with a different config ({', '.join(changed[:5])} differ); "
                "choose another --name to start a new run"
            )
    if record.get("workers") not in (None, opts.workers):
        raise ConfigError(
            f"{storage.run_dir}: was started with --workers {record['workers']}; resuming needs the same "
            "number (the data order and learning rate depend on it), or choose another --name"
        )
    return record


# -- driver --------------------------------------------------------------------------------------
def run(cfg: Config, opts: DistributedOptions, log=print) -> dict[str, Any]:
    """Train ``cfg`` on a Ray cluster; returns a summary (run folder, checkpoint, metrics, MLflow run)."""
    from sdetr.platform.ray_data import check_shards, num_categories_max_id, steps_per_epoch

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
    check_device(cfg, opts.gpus_per_worker)
    if cfg.train.time_limit_s > 0:
        # Ranks reading the clock would stop at different steps and hang DDP's collectives.
        log("note: train.time_limit_s applies to single-process training only; ignored with --workers")
    storage = RunStorage(opts.storage or DEFAULT_STORAGE, name)

    # Everything a user can get wrong is checked here, before Ray starts a single worker.
    if not is_uri(cfg.data.root) and not Path(cfg.data.root).expanduser().exists():
        prepare_data(cfg.data.root, storage, log)  # raises the "data not found" error
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    resources = cluster_resources(address)
    check_gpus(opts.workers, opts.gpus_per_worker, resources["GPU"])
    cpus = plan_cpus(opts.workers, opts.cpus_per_worker, resources["CPU"], opts.data_reserve)
    data_path = prepare_data(cfg.data.root, storage, log)
    manifest = check_shards(data_path, ["train", "val"])
    max_id = num_categories_max_id(data_path)
    if max_id >= cfg.model.num_classes:
        raise ConfigError(
            f"{data_path}: category ids go up to {max_id} but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={max_id + 1}"
        )
    steps = steps_per_epoch(
        manifest, "train", opts.workers, cfg.optim.batch_size, max_images=cfg.data.max_train_images
    )
    if steps < 1:
        raise DataError(
            f"{data_path}: too few training images for one batch of {cfg.optim.batch_size} "
            f"on each of {opts.workers} workers"
        )
    cfg.train.device = "cuda" if opts.gpus_per_worker > 0 else "cpu"
    if not is_uri(cfg.data.root):
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.train.output_dir = storage.run_dir
    record = check_previous_run(storage, cfg, opts)
    resuming = record is not None
    uri = tracking.resolve_tracking_uri(opts.mlflow_uri, storage.root_local)

    # The MLflow store, experiment and run are created here, once: concurrent creation races.
    tracked = None
    if uri is not None:
        if storage.root_local is not None:
            storage.root_local.mkdir(parents=True, exist_ok=True)
        global_batch = cfg.optim.batch_size * opts.workers
        params = dict(cfg.flat())
        params.update(
            {"ray.workers": opts.workers, "ray.global_batch": global_batch, "ray.run_dir": storage.run_dir}
        )
        params.update(opts.mlflow_params or {})
        previous = (record or {}).get("mlflow") or {}
        tracked = tracking.start_run(
            uri,
            name,
            experiment=opts.experiment,
            artifact_location=storage.artifact_location(),
            previous_run_id=previous.get("run_id") if previous.get("tracking_uri") == uri else None,
            params=params,
            tags={"sdetr.run_dir": storage.run_dir, "sdetr.preset": cfg.preset, **(opts.mlflow_tags or {})},
            parent_run_id=opts.mlflow_parent_run_id,
            # A run created just before the driver died, before its id reached the run record.
            match_tags={"sdetr.run_dir": storage.run_dir},
            log=log,
        )
        if opts.mlflow_metrics and not tracked.resumed:
            logger = tracking.MetricLogger(uri, tracked.run_id)
            logger.log(opts.mlflow_metrics, 0)
            logger.flush()
    storage.write_text(CONFIG_FILE, cfg.to_yaml())
    storage.write_text(
        RUN_RECORD,
        json.dumps(
            {
                "name": name,
                "workers": opts.workers,
                "data": data_path,
                "mlflow": tracked.to_dict() if tracked else None,
                "created": (record or {}).get("created", time.time()),
            },
            indent=1,
        ),
    )
    log(
        f"{'resuming' if resuming else 'starting'} run {storage.run_dir}: {opts.workers} workers x "
        f"{cpus:g} CPU{f' + {opts.gpus_per_worker:g} GPU' if opts.gpus_per_worker else ''}, "
        f"{steps} steps/epoch, {cfg.optim.epochs} epochs"
    )
    try:
        result = _fit(cfg, opts, storage, data_path, cpus, steps, tracked, address)
    except BaseException as exc:
        if tracked is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.finish_run(tracked.tracking_uri, tracked.run_id, status)
        raise
    if tracked is not None:
        tracking.finish_run(tracked.tracking_uri, tracked.run_id, "FINISHED")
    checkpoint = result.checkpoint
    return {
        "run_dir": storage.run_dir,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "state_file": f"{checkpoint.path}/{STATE_FILE}" if checkpoint is not None else None,
        "metrics": dict(result.metrics or {}),
        "mlflow": tracked.to_dict() if tracked else None,
        "data": data_path,
    }


def _fit(cfg, opts, storage, data_path, cpus, steps, tracked, address):
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchConfig, TorchTrainer

    from sdetr.platform.ray_data import dataset_config, read_split

    if not ray.is_initialized():
        ray.init(address=address)
    ctx = DataContext.get_current()
    # Exact resume needs every worker to get the same rows in the same order each epoch.
    ctx.execution_options.preserve_order = True
    # Per-worker, per-dataset progress bars drown the per-epoch lines; the datasets copy this context.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    use_gpu = opts.gpus_per_worker > 0
    resources = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = opts.gpus_per_worker
    keep = cfg.train.keep_checkpoints
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": cfg.to_dict(),
            "data": data_path,
            "run_dir": str(storage.local) if storage.local is not None else None,
            "checkpoint_root": storage.run_dir,
            "steps_per_epoch": steps,
            "threads": max(1, int(cpus)),
            "mlflow": tracked.to_dict() if tracked else None,
            "trace_data": opts.trace_data,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=opts.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=storage.name,
            storage_path=storage.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            # The newest checkpoint is always kept; keeping at least two lets a torn newest one fall
            # back to the one before.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep if keep > 0 else None),
            callbacks=list(opts.callbacks or []),
        ),
        datasets={
            "train": read_split(data_path, "train", max_images=cfg.data.max_train_images),
            "val": read_split(data_path, "val", max_images=cfg.data.max_val_images),
        },
        dataset_config=dataset_config(),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingFailed(f"training failed after {opts.max_failures} restart(s): {exc}") from exc


# -- worker --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records rank 0 wrote to ``<run_dir>/history.json`` (empty before the first epoch)."""
    try:
        return list(json.loads((run_dir / HISTORY_FILE).read_text()).get("history", []))
    except (OSError, json.JSONDecodeError):
        return []


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _event(run_dir: Path | None, **fields) -> None:
    if run_dir is None:
        return
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def _reported_checkpoints() -> list:
    """Registered checkpoints, newest first. Only these: a report made just before a crash may be on
    disk without ever having been registered, so the newest folder on disk is not trusted."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    latest = ray.train.get_checkpoint()
    try:
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED
        )
        older = [r.checkpoint for r in reversed(reported)]
    except Exception:  # an older Ray without the API: the latest alone
        older = []
    ordered = [latest] if latest is not None else []
    ordered += [c for c in older if latest is None or c.path != latest.path]
    return ordered


def restore_state(rank: int, world: int, run_dir: Path | None) -> tuple[dict | None, str | None, set[str]]:
    """The newest readable checkpoint's state (rank 0 picks it, every rank loads it), its path, and
    the folder names of all registered checkpoints (new checkpoints must not reuse them)."""
    import torch.distributed as dist

    chosen = None
    state = None
    taken: set[str] = set()
    if rank == 0:
        candidates = _reported_checkpoints()
        taken = {Path(c.path).name for c in candidates}
        for ckpt in candidates:
            try:
                with ckpt.as_directory() as folder:
                    state = read_checkpoint(Path(folder) / STATE_FILE)
                chosen = ckpt
                break
            except CheckpointError as exc:
                print(f"warning: skipping unreadable checkpoint {ckpt.path}: {exc}")
                _event(run_dir, event="skipped_checkpoint", checkpoint=ckpt.path, reason=str(exc))
        if candidates and chosen is None:
            raise CheckpointError(
                f"none of the {len(candidates)} registered checkpoints can be read "
                f"(newest: {candidates[0].path}); start a new run with another --name"
            )
    if world > 1:
        box = [chosen, taken]
        dist.broadcast_object_list(box, src=0)
        chosen, taken = box
    if chosen is None:
        return None, None, taken
    if state is None:
        with chosen.as_directory() as folder:
            state = read_checkpoint(Path(folder) / STATE_FILE)
    return state, chosen.path, taken


def _all_reduce_means(sums: dict[str, float], count: int, device) -> dict[str, float]:
    """Means over all ranks of per-step sums (the same keys on every rank)."""
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    total = max(values[-1].item(), 1.0)
    return {k: values[i].item() / total for i, k in enumerate(keys)}


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP training with exact, step-level resume."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    from sdetr.detector.build import build_criterion, build_model
    from sdetr.detector.evaluation.postprocess import PostProcess
    from sdetr.platform.engine import evaluate, train_one_epoch
    from sdetr.platform.optim import build_optimizer
    from sdetr.platform.ray_data import coco_ground_truth, iter_epoch

    cfg = Config.from_dict(config["config"], source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    workers_dir = None
    if run_dir is not None:
        workers_dir = run_dir / WORKERS_DIR
        workers_dir.mkdir(parents=True, exist_ok=True)
        (workers_dir / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    node_id = ray.get_runtime_context().get_node_id()
    torch.set_num_threads(int(config.get("threads", 1)))
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Cheap on CPU; with gloo's fixed-order all-reduce, runs repeat bit for bit.
        torch.use_deterministic_algorithms(True, warn_only=True)

    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1
    core = model.module if hasattr(model, "module") else model
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    postprocess = PostProcess()
    optimizer, scheduler = build_optimizer(core, cfg.optim, global_batch=cfg.optim.batch_size * world)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and device.type == "cuda" else None
    steps_per_epoch = int(config["steps_per_epoch"])

    state, restored_from, taken_names = restore_state(rank, world, run_dir)
    epoch, done, global_step = 0, 0, 0
    sums: dict[str, float] = {}
    window: dict[str, float] = {}  # per-step metrics since the last MLflow log point
    window_count = 0
    history: list[dict[str, float]] = []
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        pos = state["position"]
        epoch, done, global_step = int(pos["epoch"]), int(pos["batches_done"]), int(pos["global_step"])
        history = list(state.get("history", []))
        sums = dict(state.get("epoch_sums", {}))
        window = dict(state.get("log_window", {}).get("sums", {}))
        window_count = int(state.get("log_window", {}).get("count", 0))
        if done >= steps_per_epoch:  # an end-of-epoch checkpoint: the next epoch starts fresh
            epoch, done, sums = epoch + 1, 0, {}
        elif len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])  # mid-epoch: continue the exact random stream
        if rank == 0:
            print(f"resuming from {restored_from}: epoch {epoch + 1}, batch {done} of {steps_per_epoch}")
            _event(run_dir, event="resume", checkpoint=restored_from, epoch=epoch, batches_done=done)
    elif rank == 0:
        _event(run_dir, event="start", epoch=0)

    logger = None
    if rank == 0 and config.get("mlflow"):
        logger = tracking.MetricLogger(config["mlflow"]["tracking_uri"], config["mlflow"]["run_id"])
        # Steps and epochs replayed since the last checkpoint were logged before the failure.
        logger.restore_floor(STEP_MARKER)
        logger.restore_floor(EPOCH_MARKER)
    coco_gt = coco_ground_truth(config["data"], "val", cfg.data.max_val_images) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    log_every = max(1, cfg.train.log_every_steps)
    ckpt_every = cfg.train.checkpoint_every_steps

    def save_and_report(epoch: int, batches_done: int, metrics: dict[str, float]) -> None:
        rng_all = [rng_state()]
        if world > 1:
            rng_all = [None] * world
            dist.all_gather_object(rng_all, rng_state())
        dir_name = f"checkpoint_epoch{epoch:04d}_step{batches_done:06d}"
        # After falling back past a torn checkpoint the same position comes round again; a registered
        # folder must not be reused (Ray would later delete it as the older of two entries).
        base, n = dir_name, 0
        while dir_name in taken_names:
            n += 1
            dir_name = f"{base}-{n}"
        taken_names.add(dir_name)
        # Local (or shared-mount) storage: rank 0 writes the checkpoint in place and Ray only
        # registers it, instead of writing a temporary copy that Ray then copies again.
        in_place = run_dir is not None
        mode = CheckpointUploadMode.NO_UPLOAD if in_place else CheckpointUploadMode.SYNC
        checkpoint = tmp = None
        if rank == 0:
            folder = run_dir / dir_name if in_place else Path(tempfile.mkdtemp(prefix="sdetr-ckpt-"))
            tmp = None if in_place else folder
            save_atomic(
                {
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch,  # as the single-process trainer's checkpoints
                    "position": {
                        "epoch": epoch,
                        "batches_done": batches_done,
                        "steps_per_epoch": steps_per_epoch,
                        "global_step": global_step,
                    },
                    "epoch_sums": sums,
                    "log_window": {"sums": window, "count": window_count},
                    "history": history,
                    "rng": rng_all,
                    "world_size": world,
                    "config": cfg.to_dict(),
                },
                folder / STATE_FILE,
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        report = {
            "epoch": epoch,
            "batches_done": batches_done,
            "epoch_end": batches_done >= steps_per_epoch,
            "global_step": global_step,
            **metrics,
        }
        ray.train.report(
            report, checkpoint=checkpoint, checkpoint_dir_name=dir_name, checkpoint_upload_mode=mode
        )
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if rank == 0:
            _event(run_dir, event="checkpoint", name=dir_name, epoch=epoch, batches_done=batches_done)
        if logger is not None:
            logger.set_tags({"sdetr.checkpoint": f"{config['checkpoint_root']}/{dir_name}"})

    trace = workers_dir / f"rank{rank}.data.jsonl" if workers_dir and config.get("trace_data") else None

    def traced(batches, epoch: int):
        for images, masks, targets in batches:
            if trace is not None:
                with open(trace, "a") as f:
                    ids = [int(t["image_id"]) for t in targets]
                    f.write(json.dumps({"epoch": epoch, "image_ids": ids}) + "\n")
            yield images, masks, targets

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal global_step, window_count
        global_step += 1
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
            window[k] = window.get(k, 0.0) + v
        sums["_count"] = sums.get("_count", 0.0) + 1
        window_count += 1
        if logger is not None and global_step % log_every == 0:
            means = {f"train/{k}": v / window_count for k, v in window.items()}
            if logger.log(means, global_step, marker=STEP_MARKER):
                logger.flush()
        if global_step % log_every == 0:
            window.clear()
            window_count = 0
        if ckpt_every > 0 and global_step % ckpt_every == 0 and step < steps_per_epoch:
            save_and_report(current_epoch, step, {"loss": metrics["loss"]})
        if workers_dir is not None:
            write_json(
                workers_dir / f"rank{rank}.json",
                {
                    "pid": os.getpid(),
                    "node_id": node_id,
                    "epoch": current_epoch,
                    "step": step,
                    "global_step": global_step,
                },
            )

    while epoch < cfg.optim.epochs:
        current_epoch = epoch
        if done == 0:
            # Per-(seed, epoch, rank) streams: a resumed run draws exactly what an uninterrupted one does.
            seed_everything(cfg.train.seed + 1000 * epoch + rank)
        t0 = time.monotonic()
        batches = traced(
            iter_epoch(train_shard, cfg, "train", epoch, cfg.optim.batch_size, skip_batches=done), epoch
        )
        train_one_epoch(
            model,
            criterion,
            batches,
            optimizer,
            device,
            clip_max_norm=cfg.optim.clip_max_norm,
            amp=cfg.train.amp,
            scaler=scaler,
            on_step=on_step,
            start_step=done,
        )
        scheduler.step()
        count = int(sums.pop("_count", 0))
        means = _all_reduce_means(sums, count, device)
        record: dict[str, float] = {"epoch": epoch, "train_time_s": time.monotonic() - t0}
        record.update({f"train_{k}": v for k, v in means.items()})
        if (epoch + 1) % max(cfg.train.eval_every_epochs, 1) == 0 or epoch + 1 == cfg.optim.epochs:
            if world > 1:
                # BatchNorm statistics drift apart between DDP's per-forward broadcasts: evaluate the
                # checkpointed model (rank 0's) everywhere.
                for buf in core.buffers():
                    dist.broadcast(buf, src=0)
            # Every worker reads the whole val set and decodes its own slice of each batch.
            val_batches = iter_epoch(
                val_shard, cfg, "val", epoch, cfg.optim.batch_size, rank=rank, world_size=world
            )
            metrics = evaluate(core, postprocess, val_batches, coco_gt, device, amp=cfg.train.amp)
            if world > 1:  # rank 0 alone has the COCO metrics; report the same on every rank
                box = [metrics]
                dist.broadcast_object_list(box, src=0)
                metrics = box[0]
            record.update(metrics or {})
        history.append(record)
        sums = {}
        if logger is not None:
            epoch_metrics = {EPOCH_MARKER: epoch}
            for k, v in record.items():
                if k.startswith("train_"):
                    epoch_metrics[f"epoch/{k}"] = v
                elif k != "epoch":
                    epoch_metrics[f"val/{k}" if k.startswith("AP") or k.startswith("AR") else k] = v
            if logger.log(epoch_metrics, epoch, marker=EPOCH_MARKER):
                logger.flush()
        if rank == 0:
            print(_format_record(record))
        save_and_report(epoch, steps_per_epoch, {k: v for k, v in record.items() if k != "epoch"})
        if rank == 0 and run_dir is not None:
            # Per-epoch results readable without Ray or torch (sweep status, a finished trial's rerun).
            write_json(run_dir / HISTORY_FILE, {"epochs": cfg.optim.epochs, "history": history})
        epoch, done = epoch + 1, 0


def _format_record(record: dict[str, float]) -> str:
    parts = [f"epoch {int(record['epoch']) + 1}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    for key in ("AP", "AP50", "AP75"):
        if key in record:
            parts.append(f"{key} {record[key]:.3f}")
    parts.append(f"{record['train_time_s']:.0f}s")
    return " | ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
