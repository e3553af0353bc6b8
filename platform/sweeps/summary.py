"""What a sweep says to a person: how its GFLOPs were counted, the MLflow descriptions of the parent run
(what the sweep compares; where the front is) and the lines that end ``sdetr sweep run`` / ``sdetr pareto``
(what to open next). Plain text from the sweep's records: no torch, no Ray.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdetr.platform.layout import DEFAULT_STORAGE
from sdetr.platform.pareto import ParetoPoint, label_for
from sdetr.platform.pareto.files import ap_is_fraction, cells, ordered

# MLflow shows this tag as the run's description (Markdown) on the run page and in the runs table.
DESCRIPTION_TAG = "mlflow.note.content"


def gflops_text(cost: dict[str, Any]) -> str:
    """How a trial's ``gflops`` were counted: ``mean over 10 val images as evaluated (~160x211)`` or
    ``one 3x850x1040 image``."""
    text = str(cost.get("cost_input", ""))
    if text.startswith("val"):
        h, w = cost.get("mean_input_hw") or (0, 0)
        n = text[len("val[:") : -1]
        return f"mean over {n} val images as evaluated (~{h:.0f}x{w:.0f})"
    return f"one {text} image" if text else ""


def gflops_note(costs: Sequence[dict[str, Any]]) -> str:
    """The GFLOPs axis of a sweep: how its trials were counted (they are all counted the same way), and
    the papers' fixed input when the trials also have that figure."""
    texts = sorted({gflops_text(c) for c in costs if c} - {""})
    note = "; ".join(texts) or "papers' convention"
    fixed = {c.get("fixed_input") for c in costs if c and c.get("gflops_fixed") is not None}
    if fixed and not all(t.startswith("one ") for t in texts):
        note += f" (at the papers' {', '.join(sorted(fixed))}: MLflow's GFLOPs_fixed)"
    return note


def sweep_description(spec) -> str:
    """The parent run's description when the sweep starts: what it compares, on what, and how."""
    grid = spec.grid_points() or [{}]
    labels = []
    for params in grid:
        cfg = spec.trial_config(params)
        labels.append(label_for(cfg.model.rho, cfg.model.backbone, cfg.preset))
    searched = ", ".join(d.key for d in spec.space) or "nothing"
    cost = "mean over the first val images, as evaluated" if spec.cost_input is None else "one image"
    if spec.cost_input is not None:
        cost = f"one 3x{spec.cost_input[0]}x{spec.cost_input[1]} image"
    return (
        f"**Sweep `{spec.name}`** ({spec.path}): "
        + (f"compares {', '.join(labels)}" if spec.algorithm == "grid" else f"searches {searched}")
        + f"; {spec.num_trials()} trials of {spec.trial_config({}).optim.epochs} epochs on `{spec.data}`.\n\n"
        f"Objectives: AP (max) against GFLOPs (min), GFLOPs counted on {cost}. The Pareto front "
        "(table, `pareto/pareto.png`, `pareto/pareto.html`) is written here when the sweep ends."
    )


def front_description(name: str, points: Sequence[ParetoPoint], note: str) -> str:
    """The parent run's description once the front is known: a Markdown table of every point, front
    members in bold, and where the plot is."""
    fraction = ap_is_fraction(points)
    lines = [
        f"**Sweep `{name}`: AP against GFLOPs.** Plot: artifacts `pareto/pareto.png` (interactive: "
        "`pareto/pareto.html`). Front members in bold.",
        "",
        "| | model | AP (%) | AP50 (%) | GFLOPs | params (M) | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in ordered(points):
        c = cells(p, fraction)
        mark = "★" if p.on_front else ""
        label = f"**{p.label}**" if p.on_front else p.label
        row = [mark, label, c["AP"], c["AP50"], c["GFLOPs"], c["Params (M)"], p.status.replace("_", " ")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"GFLOPs: {note}. AP: COCO box AP on the val split."]
    return "\n".join(lines)


def _mlflow_command() -> str:
    """``mlflow`` as this installation runs it: ``.venv/bin/mlflow`` when it is not on PATH."""
    exe = Path(sys.executable).parent / "mlflow"
    if shutil.which("mlflow") == str(exe) or not exe.exists():
        return "mlflow"
    try:
        return os.path.relpath(exe)
    except ValueError:
        return str(exe)


def next_steps(
    name: str, pareto_dir: str, tracking_uri: str | None, parent_run: str | None, storage: str | None = None
) -> list[str]:
    """The last lines of a sweep: the picture to open, MLflow (with this sweep's store) and the status
    command (with ``--storage`` where the sweep is not under the default ``./runs``)."""
    out = [f"Open the plot: {pareto_dir}/pareto.png (interactive: {pareto_dir}/pareto.html)"]
    if tracking_uri:
        where = f"parent run '{name}'" + (f" ({parent_run})" if parent_run else "")
        if tracking_uri.startswith(("http://", "https://")):
            out.append(f"MLflow: open {tracking_uri}, {where}")
        else:
            out.append(f"MLflow: {_mlflow_command()} ui --backend-store-uri {tracking_uri}  then {where}")
    default = storage in (None, DEFAULT_STORAGE, os.path.abspath(DEFAULT_STORAGE))
    out.append(f"Trials: sdetr sweep status {name}" + ("" if default else f" --storage {storage}"))
    return out
