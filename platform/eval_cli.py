"""``sdetr eval``: dynamic ρ, one trained Sparse DETR checkpoint evaluated at several keeping ratios.

    sdetr eval --checkpoint C [--data DIR] [--rho 0.05,0.1,0.2,0.3,0.5] [--val N] [--flops-images K]
               [--flops-input HxW|none] [--device auto|cpu|cuda] [--batch-size B]
               [--mlflow-uri URI | --no-mlflow] [--out FILE] [--json]

Sparse DETR's scoring network ranks the encoder tokens, and ρ only decides how many of them are kept,
so a model trained at one ρ runs at any other (the paper's "dynamic sparsification"). For each ρ this
reports COCO AP (AP, AP50, AP75, APs/m/l) on the val images and GFLOPs in the papers' convention
(`sdetr.detector.cost`), the mean over the first K of the same images, one at a time as
``sdetr cost --val``: a whole accuracy / cost curve from one training. Sweeps measure a trial's cost
on one fixed-size image instead (``sdetr cost``'s default, 3 x 850 x 1040), so each point also gets
``gflops_fixed`` on that input (``--flops-input``), to sit on the same axis as the trials.

``--checkpoint`` takes a ``.pth`` file (sdetr, or an official Sparse DETR checkpoint, which stores
``args``), a Ray checkpoint folder (holding ``state.pth``) or a run folder (its newest readable
checkpoint). ``--data`` is a COCO 2017 layout folder or a shard folder (``sdetr data shard``), read
here with pyarrow alone (no Ray).

The record goes to ``dynamic_rho.json`` in the run folder (beside the checkpoint when it is in none,
or ``--out``); its schema, which sweeps read to place the points on their Pareto plots::

    {"checkpoint", "preset", "backbone", "trained_rho", "trial_id", "run_id",
     "points": [{"rho", "AP", "AP50", "AP75", "APs", "APm", "APl", "gflops", "gflops_fixed"}, ...],
     plus the context: "run_dir", "tracking_uri", "data", "val_images", "flops_images", "fixed_input",
     "device"}

Points are in ascending ρ; ``gflops_fixed`` is there unless ``--flops-input none`` (``fixed_input`` "").

When the run folder's ``sdetr_run.json`` names an MLflow run, the points are logged to that run
(finished runs accept metrics too): ``dynamic_rho/<metric>`` at step ``round(ρ·1000)``, the JSON as an
artifact under ``dynamic_rho/`` and the tag ``sdetr.dynamic_rho`` listing the ρ values.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from sdetr.detector.errors import CheckpointError, ConfigError, DataError

DEFAULT_RHOS = (0.05, 0.1, 0.2, 0.3, 0.5)
RECORD_FILE = "dynamic_rho.json"
ARTIFACT_DIR = "dynamic_rho"
METRIC_PREFIX = "dynamic_rho/"
RHO_TAG = "sdetr.dynamic_rho"
TRIAL_TAG = "sdetr.trial_id"
POINT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "gflops", "gflops_fixed")
# Same names as platform/ray_train.py (STATE_FILE, RUN_RECORD, CONFIG_FILE) and train.py's checkpoint
# folder; spelled out so this module does not import the trainers.
STATE_FILE = "state.pth"
RUN_RECORD = "sdetr_run.json"
TRIAL_RECORD = "sdetr_trial.json"  # platform/sweep.py: a sweep trial's run folder holds its record
CONFIG_FILE = "config.yaml"
SINGLE_PROCESS_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^checkpoint_epoch(\d+)(?:_step(\d+))?(?:-(\d+))?(?:\.pth)?$")
_OFFICIAL_PREFIX = {"resnet50": "r50", "swin_t": "swint"}
# sdetr.detector.cost.FIXED_INPUT_HW, the official "approximated" input (not imported: it pulls in torch,
# and the parser is built for every `sdetr` command).
FIXED_INPUT_HW = (850, 1040)


# -- command line --------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` under the ``sdetr`` sub-parsers (sets ``func``)."""
    p = subparsers.add_parser(
        "eval",
        help="dynamic ρ: AP and GFLOPs of one Sparse DETR checkpoint at several keeping ratios",
        description=(
            "Evaluate one trained Sparse DETR checkpoint at several encoder token keeping ratios ρ: COCO "
            "AP on the val images and GFLOPs (papers' convention, mean over the first --flops-images of "
            "them) per ρ. Writes dynamic_rho.json into the run folder and logs the points to the run's "
            "MLflow run."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a .pth file, a Ray checkpoint folder (state.pth) or a run folder (its newest checkpoint)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="COCO 2017 layout folder or shard folder (default: the checkpoint config's data.root)",
    )
    p.add_argument(
        "--rho",
        default=",".join(f"{r:g}" for r in DEFAULT_RHOS),
        help="comma-separated keeping ratios in (0, 1] (default %(default)s)",
    )
    p.add_argument("--val", type=int, default=0, metavar="N", help="only the first N val images (0 = all)")
    p.add_argument(
        "--flops-images",
        type=int,
        default=10,
        metavar="K",
        help="GFLOPs averaged over the first K of the evaluated images (default 10; 0 = all of them)",
    )
    p.add_argument(
        "--flops-input",
        default="{}x{}".format(*FIXED_INPUT_HW),
        metavar="HxW",
        help="also GFLOPs on one random image of this size, as sweeps measure trials "
        "(default %(default)s; none to skip)",
    )
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    p.add_argument(
        "--batch-size", type=int, metavar="B", help="images per forward (default: the run's optim.batch_size)"
    )
    mlflow = p.add_mutually_exclusive_group()
    mlflow.add_argument(
        "--mlflow-uri",
        help="tracking URI of the run's MLflow store (default: the one in the run's sdetr_run.json)",
    )
    mlflow.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--out", type=Path, help=f"where to write the record (default: <run folder>/{RECORD_FILE})"
    )
    p.add_argument(
        "--json", action="store_true", help="print the record as one JSON object instead of a table"
    )
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    rhos = parse_rhos(args.rho)
    record = evaluate_rhos(
        args.checkpoint,
        rhos,
        data=str(args.data) if args.data is not None else None,
        val_images=args.val,
        device=args.device,
        batch_size=args.batch_size,
        flops_images=args.flops_images,
        fixed_input_hw=parse_flops_input(args.flops_input),
        progress=not args.json and sys.stderr.isatty(),
        log=_stderr,
    )
    uri = None if args.no_mlflow else _tracking_uri(record, args.mlflow_uri)
    target = _mlflow_run(record, uri, log=_stderr) if uri else None
    if target is not None and not record["trial_id"]:
        record["trial_id"] = target[1].data.tags.get(TRIAL_TAG, "")
    path = write_record(record, args.out)
    if target is not None:
        log_to_mlflow(record, path, target[0])
    if args.json:
        print(json.dumps(record))
    else:
        print(format_table(record))
        print(f"record: {path}")
        if target is not None:
            print(f"MLflow: {record['run_id']} ({uri}), metrics {METRIC_PREFIX}* at step round(ρ·1000)")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_rhos(text: str) -> list[float]:
    """``"0.05, 0.1,0.2"`` -> [0.05, 0.1, 0.2] (sorted), or a ConfigError saying what is wrong."""
    values = []
    for item in str(text).split(","):
        if not item.strip():
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ConfigError(
                f"--rho {text!r}: {item.strip()!r} is not a number; expected e.g. 0.05,0.1,0.2,0.3,0.5"
            ) from None
    return check_rhos(values, where=f"--rho {text!r}")


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


def parse_flops_input(text: str | None) -> tuple[int, int] | None:
    """``"850x1040"`` -> (850, 1040); ``none`` -> None (no fixed-input GFLOPs)."""
    if text is None or text.strip().lower() in ("none", "off", ""):
        return None
    from sdetr.platform.cost_cli import parse_hw

    try:
        return parse_hw(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--input", "--flops-input", 1)) from None


def rho_step(rho: float) -> int:
    """The MLflow step of a ρ point (steps are integers)."""
    return int(round(rho * 1000))


# -- checkpoint ----------------------------------------------------------------------------------
def _checkpoint_order(path: Path) -> tuple:
    """Sort key of a checkpoint file: (epoch, step, retry) from its (folder) name, then mtime."""
    name = path.parent.name if path.name == STATE_FILE else path.name
    m = _CKPT_NAME.match(name)
    numbers = tuple(int(g) if g else -1 for g in m.groups()) if m else (-1, -1, -1)
    return (*numbers, path.stat().st_mtime)


def checkpoint_candidates(folder: Path) -> list[Path]:
    """Checkpoint files under a folder, newest first: ``state.pth`` itself, Ray's
    ``checkpoint_epoch*/state.pth``, or ``checkpoint_epoch*.pth`` here or under ``checkpoints/``."""
    if (folder / STATE_FILE).is_file():
        return [folder / STATE_FILE]
    found = [d / STATE_FILE for d in folder.glob("checkpoint_epoch*") if (d / STATE_FILE).is_file()]
    for sub in (folder, folder / SINGLE_PROCESS_DIR):
        found += [p for p in sub.glob("checkpoint_epoch*.pth") if p.is_file()]
    return sorted(found, key=_checkpoint_order, reverse=True)


def run_folder_of(file: Path) -> Path | None:
    """The run folder holding a checkpoint file: Ray's ``<run>/checkpoint_*/state.pth`` and the
    single-process ``<run>/checkpoints/*.pth`` are both two levels down; a run folder has a run record
    or a config.yaml."""
    for folder in (file.parent, file.parent.parent):
        if any((folder / name).is_file() for name in (RUN_RECORD, TRIAL_RECORD, CONFIG_FILE)):
            return folder
    return None


def load_checkpoint(path: str | Path, log=print) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint file, its dict)`` for a file or a folder (newest readable checkpoint in it)."""
    from sdetr.detector.checkpoint import read_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: checkpoint not found (expected a .pth file, a checkpoint or run folder)"
        )
    if path.is_file():
        return path.resolve(), read_checkpoint(path)
    candidates = checkpoint_candidates(path)
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoint in this folder (looked for {STATE_FILE}, checkpoint_epoch*/{STATE_FILE} "
            f"and {SINGLE_PROCESS_DIR}/checkpoint_epoch*.pth)"
        )
    errors = []
    for file in candidates:
        try:
            obj = read_checkpoint(file)
        except CheckpointError as exc:
            log(f"warning: skipping unreadable checkpoint: {exc}")
            errors.append(str(exc))
            continue
        return file.resolve(), obj
    raise CheckpointError(f"{path}: none of its {len(candidates)} checkpoints is readable ({errors[0]})")


def config_of_checkpoint(obj: dict[str, Any], file: Path, data: str | None):
    """The `Config` a checkpoint was trained with: its ``config`` (sdetr) or, for an official Sparse
    DETR checkpoint, its ``args`` mapped onto the matching r50 / swint preset."""
    from sdetr.detector.checkpoint import model_config_from_official_args
    from sdetr.detector.config import Config
    from sdetr.detector.presets import PRESETS, get_preset

    if isinstance(obj.get("config"), dict):
        return Config.from_dict(obj["config"], source=f"{file} (its saved config)")
    if "args" in obj:
        if data is None:
            raise ConfigError(
                f"{file}: an official checkpoint (it stores 'args', not an sdetr config) names no data "
                "set sdetr can read; give --data DIR (COCO 2017 layout)"
            )
        model = model_config_from_official_args(obj["args"])
        name = f"{_OFFICIAL_PREFIX.get(model.backbone, model.backbone)}_sparse_detr_rho_{model.rho:g}"
        cfg = get_preset(name) if name in PRESETS else Config(preset="official")
        cfg.model = model
        return cfg
    raise CheckpointError(
        f"{file}: not an sdetr or official Sparse DETR checkpoint (it has neither 'config' nor 'args'; "
        f"keys: {', '.join(sorted(map(str, obj))[:8])})"
    )


def _read_json(path: Path, log=print) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log(f"warning: {path}: unreadable ({exc}); ignored")
        return {}
    return record if isinstance(record, dict) else {}


def _trial_id(run_dir: Path | None, run_record: dict[str, Any], log=print) -> str:
    """The sweep trial a run belongs to: its trial record, else a ``trial_id`` / tag in its run record
    (the MLflow run's ``sdetr.trial_id`` tag is read when the points are logged)."""
    trial = _read_json(run_dir / TRIAL_RECORD, log) if run_dir is not None else {}
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


# -- data ----------------------------------------------------------------------------------------
class ShardVal:
    """The val split of a shard folder as a map-style data set, like `CocoDetection` (same items).

    Read with pyarrow only: the ground truth from ``annotations/instances_<split>.json``, the image
    bytes from the split's Parquet files. One file's image column is held at a time, which suits the
    in-order reading of an evaluation.
    """

    def __init__(self, folder: Path, splits: tuple[str, ...], transforms, max_images: int = 0):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from sdetr.detector.data.coco import coco_from_dict, validate_annotations
        from sdetr.platform.shard import load_manifest

        manifest = load_manifest(folder)
        split = next((s for s in splits if s in manifest["splits"]), None)
        if split is None:
            have = ", ".join(sorted(manifest["splits"])) or "none"
            raise DataError(f"{folder}: no split {splits[0]!r} in {folder / 'manifest.json'} (has: {have})")
        entry = manifest["splits"][split]
        if not entry.get("complete"):
            raise DataError(
                f"{folder}: split {split!r} was not finished (interrupted?); re-run `sdetr data shard` "
                "with the same arguments to complete it"
            )
        data, _ = validate_annotations(folder / "annotations" / f"instances_{split}.json")
        if max_images > 0:
            keep = set(sorted(img["id"] for img in data["images"])[:max_images])
            data = dict(data)
            data["images"] = [img for img in data["images"] if img["id"] in keep]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        self.coco = coco_from_dict(data)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.transforms = transforms
        wanted = set(self.ids)
        self._where: dict[int, tuple[str, int]] = {}
        for shard in entry["shards"]:
            if not wanted - self._where.keys():
                break
            if not shard.get("rows"):
                continue
            file = str(folder / shard["file"])
            try:
                ids = pq.read_table(file, columns=["image_id"]).column("image_id").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"shard file {file} is not a readable Parquet file: {exc}") from None
            self._where.update((i, (file, row)) for row, i in enumerate(ids) if i in wanted)
        lost = sorted(wanted - self._where.keys())
        if lost:
            raise DataError(
                f"{folder}: image ids {lost[:5]} of annotations/instances_{split}.json are in none of the "
                f"split's shard files; re-run `sdetr data shard`"
            )
        self._file: str | None = None
        self._table = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import PIL.Image
        import pyarrow.parquet as pq

        from sdetr.detector.data.coco import prepare_target

        image_id = self.ids[index]
        file, row = self._where[image_id]
        if file != self._file:
            self._table = pq.read_table(file, columns=["image_id", "file_name", "image"])
            self._file = file
        cells = self._table.slice(row, 1).to_pylist()[0]
        try:
            with PIL.Image.open(io.BytesIO(cells["image"])) as img:
                image = img.convert("RGB")
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
            raise DataError(
                f"{file}: image {cells['file_name']} (image id {image_id}) cannot be decoded: {exc}"
            ) from None
        target = prepare_target(image_id, self.coco.imgToAnns.get(image_id, []), image.width, image.height)
        return self.transforms(image, target) if self.transforms is not None else (image, target)


def val_dataset(data: Path, cfg, val_images: int = 0):
    """The val images of a COCO 2017 layout folder or a shard folder, after the val transform of
    ``cfg.data``; ``val_images`` > 0 keeps the first ones by id (the ground truth too)."""
    from sdetr.detector.data import build_dataset, make_transforms
    from sdetr.platform.shard import MANIFEST

    if not data.is_dir():
        raise DataError(
            f"{data}: data folder not found (give --data: a COCO 2017 layout folder or a shard folder)"
        )
    if (data / MANIFEST).is_file():
        # `sdetr data shard` names the splits train / val; a folder sharded with --splits val2017 works too.
        splits = ("val", cfg.data.val_split)
        dataset = ShardVal(data, splits, make_transforms("val", cfg.data), max_images=val_images)
    elif (data / "annotations").is_dir():
        data_cfg = copy.deepcopy(cfg.data)
        data_cfg.root = str(data)
        data_cfg.max_val_images = val_images
        dataset = build_dataset("val", data_cfg)
    else:
        raise DataError(
            f"{data}: neither a shard folder (no {MANIFEST}) nor a COCO 2017 layout (no annotations/)"
        )
    if val_images > 0 and len(dataset) < val_images:
        raise DataError(f"--val {val_images}: the val split of {data} has {len(dataset)} images")
    if len(dataset) == 0:
        raise DataError(f"{data}: the val split has no images")
    return dataset


# -- evaluation ----------------------------------------------------------------------------------
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
    import torch

    from sdetr.detector.build import build_model
    from sdetr.detector.checkpoint import load_model_weights
    from sdetr.detector.config import resolve_device
    from sdetr.detector.cost import FlopReport, count_flops
    from sdetr.detector.data import collate_fn
    from sdetr.detector.evaluation.coco_eval import METRIC_NAMES, evaluate_detections
    from sdetr.detector.evaluation.postprocess import PostProcess
    from sdetr.platform.engine import predict, to_device

    # Everything a user can get wrong is checked before the model is built.
    rhos = check_rhos(rhos)
    for flag, value, low in (("--val", val_images, 0), ("--flops-images", flops_images, 0)):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{flag} {value!r}: expected a whole number >= {low} (0 = all)")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ConfigError(f"--batch-size {batch_size!r}: expected a positive whole number")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    dev = resolve_device(device)

    file, obj = load_checkpoint(checkpoint, log=log)
    cfg = config_of_checkpoint(obj, file, data)
    if cfg.model.rho <= 0:
        raise CheckpointError(
            f"{file}: a dense model (preset {cfg.preset}, model.rho={cfg.model.rho:g}); ρ applies to Sparse "
            "DETR only (a model trained with rho > 0, which has the scoring network)"
        )
    run_dir = run_folder_of(file)
    run_record = _read_json(run_dir / RUN_RECORD, log) if run_dir is not None else {}
    mlflow_entry = run_record.get("mlflow") if isinstance(run_record.get("mlflow"), dict) else {}
    data_path = _data_path(data, cfg, run_record)
    dataset = val_dataset(data_path, cfg, val_images)
    del obj  # the weights are loaded below; a full R50 checkpoint holds optimizer state too

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
        batch = to_device(*batch, dev)  # once for all ρ
        for rho in rhos:
            model.set_rho(rho)
            detections[rho] += predict(model, postprocess, [batch], dev, amp=cfg.train.amp)
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
        log(f"ρ {rho:g}: AP {point['AP']:.4f}, AP50 {point['AP50']:.4f}, {point['gflops']:.2f} GFLOPs")

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


def _single(image, device):
    """A batch of one unpadded image and its (all False) mask, for `count_flops`."""
    import torch

    mask = torch.zeros((1, *image.shape[-2:]), dtype=torch.bool, device=device)
    return image[None].to(device), mask


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _data_path(data: str | None, cfg, run_record: dict[str, Any]) -> Path:
    """--data, else the config's data.root; for a Ray run whose root is gone, the shard folder its
    run record names (Ray runs may shard a COCO root into the run folder)."""
    if data is not None:
        return Path(data).expanduser()
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


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# -- output --------------------------------------------------------------------------------------
def record_path(record: dict[str, Any], out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    folder = Path(record["run_dir"]) if record.get("run_dir") else Path(record["checkpoint"]).parent
    return folder / RECORD_FILE


def write_record(record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write the record atomically to ``out`` or its default place (module docstring); returns the path."""
    from sdetr.platform.shard import write_json_atomic

    path = record_path(record, out)
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name, e.g. {path / RECORD_FILE}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the record ({exc.strerror or exc})") from None
    return path


def _tracking_uri(record: dict[str, Any], explicit: str | None) -> str | None:
    """The store holding the run: --mlflow-uri (``none`` disables), else the run record's."""
    from sdetr.platform import tracking

    if explicit is not None:
        text = explicit.strip()
        return None if text.lower() in tracking.DISABLED else tracking.normalize_uri(text)
    return record.get("tracking_uri") or None


def _mlflow_run(record: dict[str, Any], uri: str, log=print):
    """``(client, run)`` of the record's MLflow run, or None (with a warning) when it cannot be reached.

    A missing SQLite file is not opened: MLflow would create an empty store in its place.
    """
    from sdetr.platform import tracking

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
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{METRIC_PREFIX}{name}", float(point[name]), now, rho_step(point["rho"]))
        for point in record["points"]
        for name in POINT_METRICS
        if name in point and math.isfinite(float(point[name]))
    ]
    rhos = ",".join(f"{p['rho']:g}" for p in record["points"])
    mlflow_client.log_batch(record["run_id"], metrics=metrics, tags=[RunTag(RHO_TAG, rhos)])
    mlflow_client.log_artifact(record["run_id"], str(path), artifact_path=ARTIFACT_DIR)


def format_table(record: dict[str, Any]) -> str:
    """The points as a Markdown table, the trained ρ marked."""
    fixed = record.get("fixed_input") or ""
    header = ["ρ", "AP", "AP50", "AP75", "GFLOPs"] + ([f"GFLOPs {fixed}"] if fixed else [])
    rows = []
    for p in record["points"]:
        trained = " (trained)" if math.isclose(p["rho"], record["trained_rho"]) else ""
        row = [f"{p['rho']:g}{trained}", *(f"{100 * p[k]:.1f}" for k in ("AP", "AP50", "AP75"))]
        row.append(f"{p['gflops']:.2f}")
        if fixed:
            row.append(f"{p['gflops_fixed']:.2f}")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    notes = [
        f"{record['checkpoint']} ({record['preset']}, trained at ρ {record['trained_rho']:g})",
        f"AP (%) on {record['val_images']} val images of {record['data']}; GFLOPs (papers' convention): "
        f"the mean over the first {record['flops_images']} of them"
        + (f", and on one {fixed} image (as sweeps count trials)" if fixed else "")
        + f"; device {record['device']}",
        "",
    ]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([*notes, line(header), rule, *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    """``python -m sdetr.platform.eval_cli ...`` until the CLI wires the command in."""
    from sdetr.detector.errors import SdetrError

    parser = argparse.ArgumentParser(prog="sdetr")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except SdetrError as exc:
        print(f"sdetr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
