"""``sdetr train``: one detector, in this process or on Ray Train (``--workers N``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdetr.platform.cli.common import add_set_argument, load_config
from sdetr.platform.layout import DEFAULT_STORAGE
from sdetr.platform.uris import redact


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a detector")
    train.add_argument("--preset", help="preset name (see `sdetr model list`)")
    train.add_argument(
        "--config", type=Path, help="a YAML config (e.g. a run's config.yaml) instead of a preset"
    )
    train.add_argument("--data", type=Path, help="data root in the COCO 2017 layout (sets data.root)")
    train.add_argument("--epochs", type=int, help="sets optim.epochs")
    train.add_argument(
        "--output", type=Path, help="run folder (sets train.output_dir); re-running on it resumes the run"
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="train from scratch when the run folder's checkpoints are all unreadable (overwrites the run)",
    )
    train.add_argument(
        "--init-from",
        help="fine-tune: start from this checkpoint (an official .pth, an sdetr checkpoint or run folder); "
        "class-dependent layers are re-initialised when the class count differs (sets train.init_from)",
    )
    train.add_argument(
        "--reset-class-heads",
        action="store_true",
        help="with --init-from: re-initialise the class-dependent layers even when the class count is the "
        "same (other categories); sets train.reset_class_heads",
    )
    add_set_argument(train)
    add_distributed_args(train)
    train.set_defaults(func=cmd_train)


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


def options_from_args(args: argparse.Namespace):
    from sdetr.platform.training.run_plan import DistributedOptions

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


def num_classes_given(args) -> bool:
    """Whether the user set model.num_classes (``--set``, or a ``--config`` file, which states it)."""
    keys = [str(o).split("=", 1)[0].strip() for o in args.overrides]
    explicit = any(k in ("num_classes", "model.num_classes") for k in keys)
    return explicit or getattr(args, "config", None) is not None


def check_init_from(cfg) -> None:
    """Load ``train.init_from`` into a CPU copy of the model once, before Ray starts: a checkpoint of
    another architecture is this process's one-line error, not a worker's failure. The workers load it
    again (each rank the same) and rank 0 prints the report."""
    import copy

    from sdetr.detector.build import build_model
    from sdetr.platform.training.local import init_from_checkpoint

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone_weights = "none"
    init_from_checkpoint(build_model(model_cfg), cfg, log=None)


def cmd_train(args) -> int:
    from sdetr.detector.errors import ConfigError

    cfg = load_config(args)
    if args.data is not None:
        cfg.data.root = str(args.data)
    if args.epochs is not None:
        cfg.optim.epochs = args.epochs
    if args.init_from is not None:
        if not str(args.init_from).strip():
            raise ConfigError("--init-from: empty path")
        if "://" not in str(args.init_from) and not Path(args.init_from).expanduser().exists():
            raise ConfigError(
                f"--init-from {args.init_from}: not found (expected an official .pth, an sdetr checkpoint "
                "or a run folder)"
            )
        cfg.train.init_from = str(Path(args.init_from).expanduser().resolve())
    if args.reset_class_heads:
        if not cfg.train.init_from:
            raise ConfigError("--reset-class-heads needs --init-from (the checkpoint to fine-tune)")
        cfg.train.reset_class_heads = True
    if args.workers is not None:
        from sdetr.platform.training.driver import run

        if cfg.train.init_from:
            check_init_from(cfg)

        summary = run(cfg, options_from_args(args))
        print(f"run folder: {summary['run_dir']}")
        if summary.get("mlflow"):
            print(f"MLflow: {redact(summary['mlflow']['tracking_uri'])} (run {summary['mlflow']['run_id']})")
        return 0
    from sdetr.platform.training.local import train

    if args.output is not None:
        cfg.train.output_dir = str(args.output)
    elif cfg.train.output_dir == "runs/train":
        cfg.train.output_dir = f"runs/{cfg.preset}"
    train(cfg, restart=args.restart, classes_from_data=not num_classes_given(args))
    print(f"run folder: {cfg.train.output_dir}")
    return 0
