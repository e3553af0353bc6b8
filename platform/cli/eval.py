"""``sdetr eval``: dynamic ρ, one trained Sparse DETR checkpoint evaluated at several keeping ratios.

    sdetr eval --checkpoint C [--data DIR] [--rho 0.05,0.1,0.2,0.3,0.5] [--val N] [--flops-images K]
               [--flops-input HxW|none] [--device auto|cpu|cuda] [--batch-size B]
               [--mlflow-uri URI | --no-mlflow] [--out FILE] [--json]

``--checkpoint`` takes a ``.pth`` file, a Ray checkpoint folder or a run folder, local or a URI on
object storage (``s3://...``: copied to a temporary folder, the record written back beside it)
(`sdetr.platform.evaluation.checkpoints`); the measurement, the record (``dynamic_rho.json``) and its
MLflow logging are `sdetr.platform.evaluation.dynamic_rho`'s, imported by the handler (it pulls in
torch and the models, and the parser is built for every ``sdetr`` command).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform.cli.cost import parse_hw
from sdetr.platform.layout import DYNAMIC_RHO_FILE

DEFAULT_RHOS = (0.05, 0.1, 0.2, 0.3, 0.5)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` under the ``sdetr`` sub-parsers (sets ``func``)."""
    p = subparsers.add_parser(
        "eval",
        help="dynamic ρ: AP and GFLOPs of one Sparse DETR checkpoint at several keeping ratios",
        description=(
            "Evaluate one trained Sparse DETR checkpoint at several encoder token keeping ratios ρ: COCO "
            "AP on the val images and GFLOPs (papers' convention, mean over the first --flops-images of "
            f"them) per ρ. Writes {DYNAMIC_RHO_FILE} into the run folder and logs the points to the run's "
            "MLflow run."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a .pth file, a Ray checkpoint folder (state.pth) or a run folder (its newest checkpoint); "
        "a path or a URI (s3://...)",
    )
    p.add_argument(
        "--data",
        help="COCO 2017 layout folder or shard folder, or a URI of shards (default: the checkpoint "
        "config's data.root)",
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
        metavar="HxW",
        help="also GFLOPs on one random image of this size, as sweeps measure trials (default: the "
        "image `sdetr cost` counts by default; none to skip)",
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
        "--out", type=Path, help=f"where to write the record (default: <run folder>/{DYNAMIC_RHO_FILE})"
    )
    p.add_argument(
        "--json", action="store_true", help="print the record as one JSON object instead of a table"
    )
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    from sdetr.platform.storage import is_uri

    rhos = parse_rhos(args.rho)
    if not is_uri(args.checkpoint):
        return _eval(args, rhos, args.checkpoint, None)
    from sdetr.platform.evaluation.checkpoints import fetch_remote

    with tempfile.TemporaryDirectory(prefix="sdetr-eval-") as tmp:
        remote = fetch_remote(args.checkpoint, Path(tmp), log=_stderr)
        return _eval(args, rhos, remote.local, remote)


def _eval(args, rhos: list[float], checkpoint, remote) -> int:
    """Evaluate a local checkpoint; ``remote``: the `RemoteCheckpoint` it is a copy of (the record then
    names the URIs and goes back beside the checkpoint on storage, unless --out says where)."""
    from sdetr.platform.evaluation import dynamic_rho
    from sdetr.platform.storage import Location

    record = dynamic_rho.evaluate_rhos(
        checkpoint,
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
    uri = None if args.no_mlflow else dynamic_rho.tracking_uri_of(record, args.mlflow_uri)
    target = dynamic_rho.mlflow_run_of(record, uri, log=_stderr) if uri else None
    if target is not None and not record["trial_id"]:
        record["trial_id"] = target[1].data.tags.get(dynamic_rho.TRIAL_TAG, "")
    shown = None
    if remote is not None:
        record["checkpoint"] = remote.uri_of(record["checkpoint"])
        if record["run_dir"]:
            record["run_dir"] = remote.uri_of(record["run_dir"])
    if remote is not None and args.out is None:
        # Beside the checkpoint, as locally: in its run folder (`sdetr pareto` reads it there).
        path = dynamic_rho.write_record(record, remote.local_root / DYNAMIC_RHO_FILE)
        Location(remote.remote_root).upload(path, DYNAMIC_RHO_FILE)
        shown = f"{remote.remote_root}/{DYNAMIC_RHO_FILE}"
    else:
        path = dynamic_rho.write_record(record, args.out)
    if target is not None:
        dynamic_rho.log_to_mlflow(record, path, target[0])
    if args.json:
        print(json.dumps(record))
    else:
        print(format_table(record))
        print(f"record: {shown or path}")
        if target is not None:
            metrics = f"{dynamic_rho.METRIC_PREFIX}* at step round(ρ·1000)"
            print(f"MLflow: {record['run_id']} ({uri}), metrics {metrics}")
    return 0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_rhos(text: str) -> list[float]:
    """``"0.05, 0.1,0.2"`` -> [0.05, 0.1, 0.2] (sorted), or a ConfigError saying what is wrong."""
    from sdetr.platform.evaluation.dynamic_rho import check_rhos

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


def parse_flops_input(text: str | None) -> tuple[int, int] | None:
    """``"850x1040"`` -> (850, 1040); not given -> `FIXED_INPUT_HW` (``sdetr cost``'s default input);
    ``none`` -> None (no fixed-input GFLOPs)."""
    from sdetr.detector.cost import FIXED_INPUT_HW

    if text is None:
        return FIXED_INPUT_HW
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        return parse_hw(text)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--input", "--flops-input", 1)) from None


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
