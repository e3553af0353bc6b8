"""Dynamic ρ: one trained Sparse DETR checkpoint evaluated at several keeping ratios (``sdetr eval``).

Sparse DETR's scoring network ranks the encoder tokens, and ρ only decides how many of them are kept,
so a model trained at one ρ runs at any other (the paper's "dynamic sparsification"). For each ρ this
measures COCO AP (AP, AP50, AP75, APs/m/l) on the val images and GFLOPs in the papers' convention
(`sdetr.detector.cost`), the mean over the first K of the same images, one at a time as
``sdetr cost --val``: a whole accuracy / cost curve from one training. Sweeps measure a trial's cost
on one fixed-size image instead (``sdetr cost``'s default, `FIXED_INPUT_HW`), so each point also gets
``gflops_fixed`` on that input, to sit on the same axis as the trials.

The checkpoint is found as `checkpoints.load_checkpoint` says; the data is a COCO 2017 layout folder
or a shard folder (read with pyarrow alone, no Ray). The record goes to ``dynamic_rho.json`` in the
run folder (beside the checkpoint when it is in none); its schema, which sweeps read to place the
points on their Pareto plots::

    {"checkpoint", "preset", "backbone", "trained_rho", "trial_id", "run_id",
     "points": [{"rho", "AP", "AP50", "AP75", "APs", "APm", "APl", "gflops", "gflops_fixed"}, ...],
     plus the context: "run_dir", "tracking_uri", "data", "val_images", "flops_images", "fixed_input",
     "device"}

Points are in ascending ρ; ``gflops_fixed`` is there unless no fixed input was asked for
(``fixed_input`` ""). When the run folder's ``sdetr_run.json`` names an MLflow run, the points are
logged to that run (finished runs accept metrics too): ``dynamic_rho/<metric>`` at step
``round(ρ·1000)``, the JSON as an artifact under ``dynamic_rho/`` and the tag ``sdetr.dynamic_rho``
listing the ρ values.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdetr.detector.build import build_model
from sdetr.detector.checkpoint import load_model_weights
from sdetr.detector.cost import FIXED_INPUT_HW, FlopReport, count_flops
from sdetr.detector.data import build_dataset, collate_fn, make_transforms
from sdetr.detector.data.categories import CategoryMap
from sdetr.detector.errors import CheckpointError, ConfigError, DataError
from sdetr.detector.evaluation.coco_eval import METRIC_NAMES, evaluate_detections
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.precision import resolve_device
from sdetr.platform import tracking
from sdetr.platform.evaluation.checkpoints import load_checkpoint
from sdetr.platform.layout import (
    DYNAMIC_RHO_ARTIFACT_DIR,
    DYNAMIC_RHO_FILE,
    RUN_RECORD,
    TRIAL_RECORD,
    read_json,
    write_json,
)
from sdetr.platform.shards.dataset import ShardDataset
from sdetr.platform.shards.manifest import MANIFEST, load_manifest
from sdetr.platform.storage import Location, is_uri
from sdetr.platform.training import engine

METRIC_PREFIX = f"{DYNAMIC_RHO_ARTIFACT_DIR}/"
RHO_TAG = "sdetr.dynamic_rho"
TRIAL_TAG = "sdetr.trial_id"  # set on a sweep trial's MLflow run
POINT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "gflops", "gflops_fixed")


# -- ρ values --------------------------------------------------------------------------------------
def check_rhos(rhos, where: str = "rhos") -> list[float]:
    """Sorted ρ values, each in (0, 1] and distinct as MLflow steps (``round(ρ·1000)``)."""
    rhos = list(rhos)
    if not rhos:
        raise ConfigError(f"{where}: no ρ values given; expected e.g. 0.05,0.1,0.2,0.3,0.5")
    out: dict[int, float] = {}
    for rho in rhos:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)):
            raise ConfigError(f"{where}: ρ {rho!r} is not a number")
        rho = float(rho)
        if not 0.0 < rho <= 1.0:  # also refuses nan and inf
            raise ConfigError(f"{where}: ρ {rho:g} is outside (0, 1] (the fraction of encoder tokens kept)")
        step = rho_step(rho)
        if step in out and out[step] != rho:
            raise ConfigError(
                f"{where}: ρ {out[step]:g} and {rho:g} share the MLflow step {step} (round(ρ·1000)); "
                "use values that differ in the first three decimals"
            )
        out[step] = rho
    return [out[k] for k in sorted(out)]


def rho_step(rho: float) -> int:
    """The MLflow step of a ρ point (steps are integers)."""
    return int(round(rho * 1000))


# -- inputs ----------------------------------------------------------------------------------------
def val_dataset(data: str | Path, cfg, val_images: int = 0, category_map=None):
    """The val images of a COCO 2017 layout folder or a shard folder (also a URI: ``s3://.../shards``),
    after the val transform of ``cfg.data``; ``val_images`` > 0 keeps the first ones by id (the ground
    truth too). ``category_map``: the checkpoint's (a COCO folder's category it lacks is refused)."""
    if is_uri(data):
        data = Location(data)
        if not data.is_file(MANIFEST):
            raise DataError(
                f"{data}: no shard folder there (no {MANIFEST}; `sdetr data shard --out` makes one)"
            )
    else:
        data = Path(data)
    if isinstance(data, Path) and not data.is_dir():
        raise DataError(
            f"{data}: data folder not found (give --data: a COCO 2017 layout folder or a shard folder)"
        )
    if isinstance(data, Location) or (data / MANIFEST).is_file():
        # `sdetr data shard` names the splits train / val; a folder sharded with --splits val2017 works too.
        have = load_manifest(data)["splits"]
        split = next((s for s in ("val", cfg.data.val_split) if s in have), "val")
        dataset = ShardDataset(data, split, make_transforms("val", cfg.data), max_images=val_images)
    elif (data / "annotations").is_dir():
        data_cfg = copy.deepcopy(cfg.data)
        data_cfg.root = str(data)
        data_cfg.max_val_images = val_images
        dataset = build_dataset("val", data_cfg, category_map=category_map)
    else:
        raise DataError(
            f"{data}: neither a shard folder (no {MANIFEST}) nor a COCO 2017 layout (no annotations/)"
        )
    if val_images > 0 and len(dataset) < val_images:
        raise DataError(f"--val {val_images}: the val split of {data} has {len(dataset)} images")
    if len(dataset) == 0:
        raise DataError(f"{data}: the val split has no images")
    return dataset


def _data_path(data: str | None, cfg, run_record: dict[str, Any]) -> Path | str:
    """--data, else the config's data.root (either may be a URI of shards); for a Ray run whose root is
    gone, the shard folder its run record names (Ray runs may shard a COCO root into the run folder)."""
    if data is not None:
        return data if is_uri(data) else Path(data).expanduser()
    if is_uri(cfg.data.root):
        return cfg.data.root
    root = Path(cfg.data.root).expanduser()
    recorded = run_record.get("data")
    if not root.is_dir() and isinstance(recorded, str) and "://" not in recorded and Path(recorded).is_dir():
        return Path(recorded)
    if not root.is_dir():
        raise DataError(
            f"{root}: the checkpoint's data.root is not a folder here; give --data DIR "
            "(a COCO 2017 layout folder or a shard folder)"
        )
    return root


def _read_record(path: Path, log=print) -> dict[str, Any]:
    """A run folder's JSON record, {} when missing; an unreadable one is ignored with a warning."""
    record = read_json(path)
    if record is None and path.is_file():
        log(f"warning: {path}: unreadable; ignored")
    return record if isinstance(record, dict) else {}


def _trial_id(run_dir: Path | None, run_record: dict[str, Any], log=print) -> str:
    """The sweep trial a run belongs to: its trial record, else a ``trial_id`` / tag in its run record
    (the MLflow run's ``sdetr.trial_id`` tag is read when the points are logged)."""
    trial = _read_record(run_dir / TRIAL_RECORD, log) if run_dir is not None else {}
    tags = run_record.get("tags") if isinstance(run_record.get("tags"), dict) else {}
    for value in (
        trial.get("trial_id"),
        run_record.get("trial_id"),
        run_record.get(TRIAL_TAG),
        tags.get(TRIAL_TAG),
    ):
        if value not in (None, ""):
            return str(value)
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- evaluation ------------------------------------------------------------------------------------
def evaluate_rhos(
    checkpoint: str | Path,
    rhos: list[float],
    data: str | None = None,
    val_images: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    flops_images: int = 10,
    *,
    fixed_input_hw: tuple[int, int] | None = FIXED_INPUT_HW,
    progress: bool = False,
    log=print,
) -> dict[str, Any]:
    """COCO AP and GFLOPs of one Sparse DETR checkpoint at each ρ of ``rhos``; returns the record
    (module docstring) without writing or logging it (`write_record`, `log_to_mlflow` do).

    One pass over the val images runs the model at every ρ on each batch, so each image is decoded
    once. GFLOPs: the mean over the first ``flops_images`` evaluated images (0 = all), one at a time;
    ``gflops_fixed`` on one random 3 x H x W image of ``fixed_input_hw`` (None: left out), the same
    image `cost_of_preset` counts.
    """
    # Everything a user can get wrong is checked before the model is built.
    rhos = check_rhos(rhos)
    for flag, value in (("--val", val_images), ("--flops-images", flops_images)):
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{flag} {value!r}: expected a whole number >= 0 (0 = all)")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ConfigError(f"--batch-size {batch_size!r}: expected a positive whole number")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    dev = resolve_device(device)

    ckpt = load_checkpoint(checkpoint, log=log)
    file, run_dir, cfg = ckpt.file, ckpt.run_dir, ckpt.config
    if ckpt.official and data is None:
        raise ConfigError(
            f"{file}: an official checkpoint (it stores 'args', not an sdetr config) names no data "
            "set sdetr can read; give --data DIR (COCO 2017 layout)"
        )
    categories = ckpt.state.get("categories")
    cmap = CategoryMap.from_dict(categories, str(file)) if isinstance(categories, dict) else None
    # Raw maps are label = id already; a contiguous one (ids 7, 12, 40 -> labels 0, 1, 2) maps back.
    mapped = {} if cmap is None or cmap.mode == "raw" else {"label_ids": cmap.label_ids}
    del ckpt  # the weights are loaded below; a full R50 checkpoint holds optimizer state too
    if cfg.model.rho <= 0:
        raise CheckpointError(
            f"{file}: a dense model (preset {cfg.preset}, model.rho={cfg.model.rho:g}); ρ applies to Sparse "
            "DETR only (a model trained with rho > 0, which has the scoring network)"
        )
    run_record = _read_record(run_dir / RUN_RECORD, log) if run_dir is not None else {}
    mlflow_entry = run_record.get("mlflow") if isinstance(run_record.get("mlflow"), dict) else {}
    data_path = _data_path(data, cfg, run_record)
    dataset = val_dataset(data_path, cfg, val_images, cmap)

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone_weights = "none"  # the checkpoint holds the backbone: no download, no stale path
    model = build_model(model_cfg)
    load_model_weights(model, file)
    model.to(dev).eval()
    postprocess = PostProcess()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size or cfg.optim.batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=cfg.data.num_workers,
    )
    detections: dict[float, list[dict]] = {rho: [] for rho in rhos}
    bar = _progress_bar(len(loader), f"eval at {len(rhos)} ρ", progress)
    start = time.perf_counter()
    for batch in loader:
        batch = engine.to_device(*batch, dev)  # once for all ρ
        for rho in rhos:
            model.set_rho(rho)
            detections[rho] += engine.predict(model, postprocess, [batch], dev, amp=cfg.train.amp, **mapped)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    log(f"predicted {len(dataset)} images at {len(rhos)} ρ in {time.perf_counter() - start:.0f} s")

    k = len(dataset) if flops_images == 0 else min(flops_images, len(dataset))
    flop_inputs = [dataset[i][0] for i in range(k)]
    fixed = None
    if fixed_input_hw is not None:
        fixed = torch.randn(3, *fixed_input_hw, generator=torch.Generator().manual_seed(0))
    points = []
    for rho in rhos:
        model.set_rho(rho)
        reports = [count_flops(model, *_single(img, dev)) for img in flop_inputs]
        metrics = evaluate_detections(dataset.coco, detections.pop(rho))
        point = {"rho": rho, **{m: float(metrics[m]) for m in METRIC_NAMES}}
        point["gflops"] = FlopReport.mean(reports).gflops
        if fixed is not None:
            point["gflops_fixed"] = count_flops(model, *_single(fixed, dev)).gflops
        points.append(point)
        log(
            f"ρ {rho:g}: AP {100 * point['AP']:.1f} %, AP50 {100 * point['AP50']:.1f} %, "
            f"{point['gflops']:.2f} GFLOPs"
        )

    return {
        "checkpoint": str(file),
        "preset": cfg.preset,
        "backbone": cfg.model.backbone,
        "trained_rho": float(cfg.model.rho),
        "trial_id": _trial_id(run_dir, run_record, log),
        "run_id": str(mlflow_entry.get("run_id") or ""),
        "points": points,
        "run_dir": str(run_dir) if run_dir is not None else "",
        "tracking_uri": str(mlflow_entry.get("tracking_uri") or ""),
        "data": str(data_path),
        "val_images": len(dataset),
        "flops_images": k,
        "fixed_input": "3x{}x{}".format(*fixed_input_hw) if fixed_input_hw is not None else "",
        "device": str(dev),
    }


def _single(image: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of one unpadded image [3, H, W] -> ([1, 3, H, W], its all-False mask [1, H, W]) for
    `count_flops`."""
    mask = torch.zeros((1, *image.shape[-2:]), dtype=torch.bool, device=device)
    return image[None].to(device), mask


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # optional: only for an interactive terminal

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# -- the record and MLflow -------------------------------------------------------------------------
def record_path(record: dict[str, Any], out: str | Path | None = None) -> Path:
    """``out``, else ``dynamic_rho.json`` in the record's run folder, else beside its checkpoint."""
    if out is not None:
        return Path(out).expanduser()
    folder = Path(record["run_dir"]) if record.get("run_dir") else Path(record["checkpoint"]).parent
    return folder / DYNAMIC_RHO_FILE


def write_record(record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write the record atomically to ``out`` or its default place (`record_path`); returns the path."""
    path = record_path(record, out)
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name, e.g. {path / DYNAMIC_RHO_FILE}")
    try:
        write_json(path, record)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the record ({exc.strerror or exc})") from None
    return path


def tracking_uri_of(record: dict[str, Any], explicit: str | None) -> str | None:
    """The store holding the record's run: ``explicit`` (--mlflow-uri; ``none`` disables), else the
    one its run record names; None for no logging."""
    if explicit is not None:
        text = explicit.strip()
        return None if text.lower() in tracking.DISABLED else tracking.normalize_uri(text)
    return record.get("tracking_uri") or None


def mlflow_run_of(record: dict[str, Any], uri: str, log=print):
    """``(client, run)`` of the record's MLflow run, or None (with a warning) when it cannot be reached.

    A missing SQLite file is not opened: MLflow would create an empty store in its place.
    """
    if not record.get("run_id"):
        if record.get("run_dir"):
            log(
                f"note: {record['run_dir']} names no MLflow run (no 'mlflow' in its {RUN_RECORD}); not logged"
            )
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        log(f"warning: MLflow store {uri} does not exist; the points are not logged (--mlflow-uri URI?)")
        return None
    try:
        c = tracking.client(uri)
        run = c.get_run(record["run_id"])
    except Exception as exc:  # MlflowException, connection errors: the record file is still written
        log(f"warning: MLflow run {record['run_id']} not reachable in {uri} ({type(exc).__name__}: {exc})")
        return None
    if run.info.lifecycle_stage == "deleted":
        log(f"warning: MLflow run {record['run_id']} is deleted; the points are not logged")
        return None
    return c, run


def log_to_mlflow(record: dict[str, Any], path: Path, mlflow_client) -> None:
    """Metrics ``dynamic_rho/<name>`` at step round(ρ·1000) in one batch, the tag, and the JSON file as
    an artifact under ``dynamic_rho/`` of the record's run. Re-running appends the same steps again
    (MLflow keeps a history; charts show the latest)."""
    from mlflow.entities import Metric, RunTag  # slow to import; only when logging (as tracking.py)

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{METRIC_PREFIX}{name}", float(point[name]), now, rho_step(point["rho"]))
        for point in record["points"]
        for name in POINT_METRICS
        if name in point and math.isfinite(float(point[name]))
    ]
    rhos = ",".join(f"{p['rho']:g}" for p in record["points"])
    mlflow_client.log_batch(record["run_id"], metrics=metrics, tags=[RunTag(RHO_TAG, rhos)])
    mlflow_client.log_artifact(record["run_id"], str(path), artifact_path=DYNAMIC_RHO_ARTIFACT_DIR)
