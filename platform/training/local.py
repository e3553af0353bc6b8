"""Single-process training: ``sdetr train --preset P --data DIR`` without ``--workers``.

The epoch and evaluation functions live in engine.py and are shared with the Ray workers.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdetr.detector.build import build_criterion, build_model, count_parameters
from sdetr.detector.checkpoint import save_atomic
from sdetr.detector.config import Config
from sdetr.detector.data import build_dataset, collate_fn
from sdetr.detector.errors import ConfigError, DataError
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.precision import resolve_device, slow_bf16_note
from sdetr.platform.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    append_jsonl,
    single_process_checkpoint_name,
    write_text_atomic,
)
from sdetr.platform.shards.source import read_image_file
from sdetr.platform.training.checkpointing import (
    check_schedule,
    config_differences,
    prune_checkpoints,
    remove_interrupted_writes,
    resume_checkpoint,
    seed_everything,
)
from sdetr.platform.training.engine import evaluate, train_one_epoch
from sdetr.platform.training.optim import build_optimizer
from sdetr.platform.training.report import epoch_record, format_record

_LISTED = 5  # unreadable images named in the message


def check_categories(dataset, num_classes: int, source: str) -> None:
    max_id = int(getattr(dataset, "num_categories_max_id", 0))
    if max_id >= num_classes:
        raise ConfigError(
            f"{source}: category ids go up to {max_id} but model.num_classes is {num_classes}; "
            f"set model.num_classes={max_id + 1}"
        )


def classes_of_data(cfg: Config) -> int:
    """The class-head width the training split's category map needs (data/categories.py)."""
    from sdetr.detector.data.categories import build_category_map

    ann = Path(cfg.data.root) / "annotations" / f"instances_{cfg.data.train_split}.json"
    try:
        categories = json.loads(ann.read_text())["categories"]
        return build_category_map(categories, source=str(ann)).num_classes
    except (OSError, ValueError, KeyError, TypeError):
        return cfg.model.num_classes  # build_loaders names what is wrong with the data


def build_loaders(cfg: Config, seed: int) -> tuple[Any, Any, DataLoader, DataLoader]:
    data_root = Path(cfg.data.root)
    if not data_root.is_dir():
        raise DataError(
            f"{data_root}: data folder not found "
            "(expected the COCO 2017 layout; `sdetr data synth` makes one)"
        )
    train_set = build_dataset("train", cfg.data)
    # The val split is labelled with the training set's map (a category it lacks is refused).
    val_set = build_dataset("val", cfg.data, category_map=train_set.category_map)
    for split, dataset in (("train", train_set), ("val", val_set)):
        if len(dataset) == 0:
            raise DataError(f"{dataset.ann_file}: the {split} split has no images")
        check_images(dataset, split)
    check_categories(train_set, cfg.model.num_classes, str(data_root))
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=cfg.data.num_workers,
        generator=generator,
        # Fresh workers each epoch are seeded from the generator, which is re-seeded per epoch: the
        # shuffling and augmentation of epoch e are the same whether or not the run was resumed.
        persistent_workers=False,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.optim.batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=cfg.data.num_workers,
    )
    if len(train_loader) == 0:
        raise DataError(
            f"{data_root}: {len(train_set)} training images is fewer than one batch of {cfg.optim.batch_size}"
        )
    return train_set, val_set, train_loader, val_loader


def check_images(dataset, split: str, threads: int = 4) -> None:
    """Read every image the run will use, up front (as `sdetr data shard` does), so a missing or corrupt
    file is one message listing them instead of a crash hours into an epoch."""
    paths = [dataset.img_folder / dataset.coco.imgs[i]["file_name"] for i in dataset.ids]
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(lambda p: read_image_file(p)[2], paths))
    bad = [f"{p} ({reason})" for p, reason in zip(paths, reasons) if reason is not None]
    if bad:
        listed = "; ".join(bad[:_LISTED]) + (f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else "")
        raise DataError(
            f"{len(bad)} of the {len(paths)} {split} images of {dataset.ann_file} cannot be read: {listed}. "
            "Fix or remove them, or train on shards (`sdetr data shard` skips them, `--workers 1`)"
        )


def train(
    cfg: Config, log=print, restart: bool = False, classes_from_data: bool = False
) -> list[dict[str, float]]:
    """Train ``cfg`` on one device; returns the per-epoch metrics (also written to metrics.jsonl).

    Running it again on the same run folder with the same config continues from the latest valid
    checkpoint (or does nothing when the run is finished); a different config is refused, and so is a
    run folder whose checkpoints are all unreadable, unless ``restart``. ``classes_from_data``: set
    ``model.num_classes`` to what the training set's category map needs (``sdetr train`` does, unless
    the value was given). ``train.init_from`` initialises a fresh run (not a resumed one) for fine-tuning.
    """
    check_schedule(cfg)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / CHECKPOINTS_DIR
    remove_interrupted_writes(out_dir, log)
    existing = resume_checkpoint(ckpt_dir, restart=restart, log=log)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    note = slow_bf16_note(cfg.train.amp, device.type)
    if note:
        log(note)
    if classes_from_data:
        cfg.model.num_classes = max(classes_of_data(cfg), 1)
    if existing:
        changed = config_differences(existing[1].get("config", {}), cfg)
        if changed:
            raise ConfigError(
                f"{out_dir}: holds a run with a different config ({', '.join(changed[:5])} differ); "
                "choose another --output to start a new run"
            )
    train_set, val_set, train_loader, val_loader = build_loaders(cfg, cfg.train.seed)
    model = build_model(cfg.model)
    if not existing and cfg.train.init_from:
        init_from_checkpoint(model, cfg, log)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # conv weights NHWC; their outputs follow
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    postprocess = PostProcess()
    optimizer, scheduler = build_optimizer(model, cfg.optim, global_batch=cfg.optim.batch_size)
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and device.type == "cuda" else None

    start_epoch = 0
    history: list[dict[str, float]] = []
    if existing:
        path, state = existing
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
        # metrics.jsonl says what the checkpoint's history says: epochs after it (logged before a
        # crash, or by a checkpoint found corrupt) are trained again and must not appear twice.
        write_text_atomic(out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        if start_epoch >= cfg.optim.epochs:
            log(f"{out_dir}: already finished ({cfg.optim.epochs} epochs); nothing to do")
            return history
        log(f"resuming from {path.name}: epoch {start_epoch + 1} of {cfg.optim.epochs}")

    elif (out_dir / METRICS_FILE).exists():
        (out_dir / METRICS_FILE).unlink()  # lines of epochs no checkpoint kept: they are trained again
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / CONFIG_FILE, cfg.to_yaml())
    log(
        f"{cfg.preset}: {count_parameters(model) / 1e6:.2f}M trainable parameters, "
        f"{len(train_set)} train / {len(val_set)} val images, device {device}"
    )
    deadline = time.monotonic() + cfg.train.time_limit_s if cfg.train.time_limit_s > 0 else None
    for epoch in range(start_epoch, cfg.optim.epochs):
        # A per-epoch seed keeps shuffling and augmentation reproducible across resumes.
        seed_everything(cfg.train.seed + epoch)
        train_loader.generator.manual_seed(cfg.train.seed + epoch)
        progress = _progress(len(train_loader), f"epoch {epoch + 1}/{cfg.optim.epochs}", cfg.train.progress)
        t0 = time.monotonic()
        stats = train_one_epoch(
            model,
            criterion,
            train_loader,
            optimizer,
            device,
            clip_max_norm=cfg.optim.clip_max_norm,
            amp=cfg.train.amp,
            scaler=scaler,
            deadline=deadline,
            progress=progress,
        )
        if progress is not None:
            progress.close()
        scheduler.step()
        record = epoch_record(epoch, time.monotonic() - t0, stats)
        out_of_time = deadline is not None and time.monotonic() > deadline
        last = epoch + 1 == cfg.optim.epochs or out_of_time
        if (epoch + 1) % max(cfg.train.eval_every_epochs, 1) == 0 or last:
            metrics = evaluate(
                model,
                postprocess,
                val_loader,
                val_set.coco,
                device,
                amp=cfg.train.amp,
                label_ids=train_set.category_map.label_ids,
            )
            record.update(metrics or {})
        history.append(record)
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "config": cfg.to_dict(),
                "history": history,
                "rng": {"torch": torch.get_rng_state()},
                # How the labels map back to the data set's category ids (eval, predict, fine-tuning).
                "categories": train_set.category_map.to_dict(),
            },
            ckpt_dir / single_process_checkpoint_name(epoch),
        )
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        append_jsonl(out_dir / METRICS_FILE, record)
        log(format_record(record))
        if out_of_time:
            log(f"time limit of {cfg.train.time_limit_s:.0f}s reached after epoch {epoch + 1}")
            break
    return history


def init_from_checkpoint(model: torch.nn.Module, cfg: Config, log=print):
    """Load ``cfg.train.init_from`` (an official ``.pth``, an sdetr checkpoint, a Ray checkpoint or a run
    folder: its newest readable checkpoint) into the fresh ``model`` for fine-tuning; logs the report."""
    from sdetr.detector.finetune import load_for_finetuning
    from sdetr.platform.evaluation.checkpoints import load_checkpoint

    ckpt = load_checkpoint(cfg.train.init_from, log=log or (lambda _msg: None))
    report = load_for_finetuning(
        model, ckpt.state, reset_class_heads=cfg.train.reset_class_heads or None, source=str(ckpt.file)
    )
    if log is not None:
        log(str(report))
    return report


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
