"""The state of one Ray Train worker, made explicit: `WorkerSetup` (fixed for the attempt), `Modules`
(what is trained) and `Progress` (what a checkpoint saves besides the modules), with the functions that
save it to and restore it from a checkpoint (``state.pth``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdetr.detector.config import Config
from sdetr.platform.layout import WORKERS_DIR, ray_checkpoint_name
from sdetr.platform.training.checkpointing import record_event, restore_state, set_rng_state


@dataclass
class WorkerSetup:
    """What stays fixed during one attempt of a worker."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    steps_per_epoch: int
    data: str  # the shard folder
    run_dir: Path | None  # local run folder (None on object storage)
    checkpoint_root: str  # where checkpoints are registered (a folder or URI)
    node_id: str = ""
    trace_data: bool = False
    print_epochs: bool = True

    @property
    def workers_dir(self) -> Path | None:
        return self.run_dir / WORKERS_DIR if self.run_dir is not None else None

    @property
    def run_folder(self) -> Path | str:
        """The run folder: the local one, else its URI on object storage."""
        return self.run_dir if self.run_dir is not None else self.checkpoint_root


@dataclass
class Modules:
    model: torch.nn.Module  # as trained (DDP-wrapped when world > 1)
    core: torch.nn.Module  # the unwrapped model: what checkpoints hold and evaluation runs
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # per-step metric sums (+ "_count")
    window_sums: dict[str, float] = field(default_factory=dict)  # since the last MLflow log point
    window_count: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    taken_names: set[str] = field(default_factory=set)  # registered checkpoint folders (not saved)


def restore_progress(setup: WorkerSetup, modules: Modules) -> Progress:
    """Load the newest readable registered checkpoint into ``modules``; its position, or a fresh start."""
    state, restored_from, taken = restore_state(setup.rank, setup.world, setup.run_folder)
    if state is None:
        if setup.rank == 0:
            record_event(setup.run_folder, event="start", epoch=0)
        return Progress(taken_names=taken)
    modules.core.load_state_dict(state["model"])
    modules.optimizer.load_state_dict(state["optimizer"])
    modules.scheduler.load_state_dict(state["lr_scheduler"])
    if modules.scaler is not None and state.get("scaler"):
        modules.scaler.load_state_dict(state["scaler"])
    pos, window = state["position"], state.get("log_window", {})
    progress = Progress(
        epoch=int(pos["epoch"]),
        batches_done=int(pos["batches_done"]),
        global_step=int(pos["global_step"]),
        epoch_sums=dict(state.get("epoch_sums", {})),
        window_sums=dict(window.get("sums", {})),
        window_count=int(window.get("count", 0)),
        history=list(state.get("history", [])),
        taken_names=taken,
    )
    if progress.batches_done >= setup.steps_per_epoch:  # an end-of-epoch checkpoint: the next starts fresh
        progress.epoch, progress.batches_done, progress.epoch_sums = progress.epoch + 1, 0, {}
    elif len(state["rng"]) == setup.world:
        set_rng_state(state["rng"][setup.rank])  # mid-epoch: continue the exact random stream
    if setup.rank == 0:
        print(
            f"resuming from {restored_from}: epoch {progress.epoch + 1}, "
            f"batch {progress.batches_done} of {setup.steps_per_epoch}"
        )
        record_event(
            setup.run_folder,
            event="resume",
            checkpoint=restored_from,
            epoch=progress.epoch,
            batches_done=progress.batches_done,
        )
    return progress


def fresh_checkpoint_name(progress: Progress) -> str:
    """The folder name of a new checkpoint. After falling back past a torn checkpoint the same position
    comes round again; a registered folder must not be reused (Ray would later delete it as the older
    of two entries)."""
    base = name = ray_checkpoint_name(progress.epoch, progress.batches_done)
    n = 0
    while name in progress.taken_names:
        n += 1
        name = f"{base}-{n}"
    progress.taken_names.add(name)
    return name


def checkpoint_state(setup: WorkerSetup, modules: Modules, progress: Progress, rng_all: list) -> dict:
    """What ``state.pth`` holds (its keys are read by resume, ``sdetr eval`` and fine-tuning)."""
    return {
        "model": modules.core.state_dict(),
        "optimizer": modules.optimizer.state_dict(),
        "lr_scheduler": modules.scheduler.state_dict(),
        "scaler": modules.scaler.state_dict() if modules.scaler is not None else None,
        "epoch": progress.epoch,  # as the single-process trainer's checkpoints
        "position": {
            "epoch": progress.epoch,
            "batches_done": progress.batches_done,
            "steps_per_epoch": setup.steps_per_epoch,
            "global_step": progress.global_step,
        },
        "epoch_sums": progress.epoch_sums,
        "log_window": {"sums": progress.window_sums, "count": progress.window_count},
        "history": progress.history,
        "rng": rng_all,
        "world_size": setup.world,
        "config": setup.cfg.to_dict(),
        # Shards are labelled with the raw category ids (label = id); the map says so, with the names.
        "categories": shard_categories(setup.data),
    }


def shard_categories(data: str) -> dict[str, Any] | None:
    """The (raw) category map of a shard folder, as checkpoints store it (``CategoryMap.to_dict()``)."""
    from sdetr.detector.data.categories import build_category_map
    from sdetr.platform.shards.manifest import load_manifest

    try:
        categories = load_manifest(data).get("categories", [])
    except Exception:  # noqa: BLE001 - the map is informative; training must not stop for it
        return None
    return build_category_map(categories, "raw", source=str(data)).to_dict() if categories else None
