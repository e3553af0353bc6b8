"""What a sweep produced, read back from its folder: trial states, the Pareto front and its artifacts.

Everything here works from files the trials write (``trials/<id>/sdetr_trial.json``, ``history.json``,
``sdetr_run.json``, ``dynamic_rho.json``), so ``sdetr sweep status`` and ``sdetr pareto`` work while
the sweep runs, after it was killed, and on a copy of its folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.layout import (
    DYNAMIC_RHO_FILE,
    PARETO_DIR,
    RUN_RECORD,
    SWEEP_RECORD,
    TRIAL_RECORD,
    TRIAL_STATES_FILE,
    TRIALS_DIR,
    read_json,
    write_json,
)
from sdetr.platform.pareto import (
    ParetoPoint,
    format_table,
    label_for,
    mark_front,
    plot_png,
    write_csv,
    write_html,
)
from sdetr.platform.training.report import read_history


def trial_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per trial: its record, epochs done, the last epoch's metrics, its state and MLflow run."""
    states = read_json(sweep_dir / TRIAL_STATES_FILE) or {}
    rows = []
    for folder in sorted((sweep_dir / TRIALS_DIR).glob("*")):
        record = read_json(folder / TRIAL_RECORD)
        if not record:
            continue
        history = read_history(folder)
        run = (read_json(folder / RUN_RECORD) or {}).get("mlflow") or {}
        done = len(history)
        if done >= record["epochs"]:
            state = "completed"
        else:
            state = states.get(record["trial_id"], "running")
        rows.append(
            {
                **record,
                "folder": str(folder),
                "epochs_done": done,
                "last": history[-1] if history else {},
                "state": state,
                "run_id": run.get("run_id", ""),
                "tracking_uri": run.get("tracking_uri", ""),
            }
        )
    return rows


def collect_points(sweep_dir: Path, log=print) -> list:
    """Pareto points: one per trial, plus the dynamic-ρ evaluations of trained trials."""
    points = []
    for row in trial_rows(sweep_dir):
        cost = row["cost"]
        extra = {"epochs_done": row["epochs_done"], "AP50": row["last"].get("AP50")}
        label = row["label"]
        if row["state"] == "stopped_early":
            # A scheduler stops a trial right after the rung it reported at: its epochs are the rung.
            extra["stopped_at_epoch"] = row["epochs_done"]
            label = f"{label} (stopped at epoch {row['epochs_done']})"
        points.append(
            ParetoPoint(
                label=label,
                AP=row["last"].get("AP"),
                gflops=cost.get("gflops"),
                trial_id=row["trial_id"],
                run_id=row["run_id"],
                preset=row["preset"],
                backbone=row["backbone"],
                rho=row["rho"],
                fps=cost.get("fps"),
                params=cost.get("params"),
                status=row["state"],
                extra=extra,
            )
        )
        dyn = read_json(Path(row["folder"]) / DYNAMIC_RHO_FILE) or {}
        # The curve's GFLOPs must be counted as the trials' were: on the same fixed input, or as a val mean.
        trial_input = cost.get("cost_input", "")
        fixed = trial_input.startswith("3x")
        if dyn.get("points") and fixed and dyn.get("fixed_input") != trial_input:
            log(
                f"warning: {row['folder']}/{DYNAMIC_RHO_FILE}: GFLOPs counted on "
                f"{dyn.get('fixed_input') or 'val images'}, the sweep's on {trial_input}; left off the plot "
                "(rerun `sdetr eval` with --flops-input)"
            )
            continue
        for p in dyn.get("points", []):
            gflops = p.get("gflops_fixed") if fixed else p.get("gflops")
            points.append(
                ParetoPoint(
                    label=f"{label_for(p['rho'], row['backbone'], row['preset'])} (dyn)",
                    AP=p.get("AP"),
                    gflops=gflops,
                    trial_id=row["trial_id"],
                    run_id=row["run_id"],
                    preset=row["preset"],
                    backbone=row["backbone"],
                    rho=p["rho"],
                    params=cost.get("params"),  # the same model; only the kept tokens differ
                    status="completed",
                    source="dynamic_rho",
                    extra={"trained_rho": row["rho"]},
                )
            )
    return points


def record_states(sweep_dir: Path, grid) -> dict[str, str]:
    """Tune's verdict per trial: a trial Tune ended before its last epoch was stopped by the scheduler."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    states = read_json(sweep_dir / TRIAL_STATES_FILE) or {}
    for trial in trials:
        if trial.status == "ERROR":
            states[trial.trial_id] = "error"
        elif trial.status == "TERMINATED":
            states[trial.trial_id] = "stopped_early"  # overridden by "completed" when history is complete
        else:
            states[trial.trial_id] = "running"  # pending or paused when the sweep stopped
    write_json(sweep_dir / TRIAL_STATES_FILE, states)
    return states


def finalize(sweep_dir: Path, log=print, mlflow: bool = True) -> dict[str, Any]:
    """Compute the front, write pareto.csv/png/html, and mark it in MLflow (parent artifacts and a
    ``pareto_optimal`` tag on every trial run). Returns {"points": [...], "front": [...]}."""
    points = mark_front(collect_points(sweep_dir, log))
    out = sweep_dir / PARETO_DIR
    out.mkdir(parents=True, exist_ok=True)
    title = f"{sweep_dir.name}: AP vs GFLOPs"
    files = [
        write_csv(points, out / "pareto.csv"),
        plot_png(points, out / "pareto.png", title=title),
        write_html(points, out / "pareto.html", title=title),
    ]
    log(format_table(points))
    log(f"Pareto front: {', '.join(str(f) for f in files)}")
    record = read_json(sweep_dir / SWEEP_RECORD) or {}
    tracked = record.get("mlflow")
    if mlflow and tracked:
        _log_front(tracked, points, files)
    front = [p for p in points if p.on_front]
    return {"points": points, "front": front}


def _log_front(tracked: dict[str, str], points: list, files: list[Path]) -> None:
    client = tracking.client(tracked["tracking_uri"])
    for f in files:
        client.log_artifact(tracked["run_id"], str(f), artifact_path=PARETO_DIR)
    trial_points = [p for p in points if p.source == "trial"]
    for p in trial_points:
        if p.run_id:
            tracking.set_tags(client, p.run_id, {"pareto_optimal": str(p.on_front).lower()})
    front = [p for p in trial_points if p.on_front]
    done = [p for p in trial_points if p.status == "completed"]
    summary = {"pareto/front_size": len(front), "pareto/trials_completed": len(done)}
    if done:
        summary["pareto/best_AP"] = max(p.AP for p in done)
    logger = tracking.MetricLogger(tracked["tracking_uri"], tracked["run_id"])
    logger.log(summary, 0)
    logger.flush()
    tracking.set_tags(
        client, tracked["run_id"], {"sdetr.pareto_front": ", ".join(p.label for p in front)[:5000]}
    )


def status_table(sweep_dir: Path) -> str:
    """``sdetr sweep status``: one line per trial."""
    if not (sweep_dir / SWEEP_RECORD).is_file():
        raise ConfigError(f"{sweep_dir}: no sweep there (no {SWEEP_RECORD})")
    record = read_json(sweep_dir / SWEEP_RECORD) or {}
    rows = trial_rows(sweep_dir)
    header = ("trial", "label", "epochs", "AP", "AP50", "GFLOPs", "state")
    lines = [header]
    for r in rows:
        ap, ap50 = r["last"].get("AP"), r["last"].get("AP50")
        lines.append(
            (
                r["trial_id"],
                r["label"],
                f"{r['epochs_done']}/{r['epochs']}",
                _fmt(ap),
                _fmt(ap50),
                _fmt(r["cost"].get("gflops"), 1),
                r["state"],
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    body = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    done = sum(r["state"] == "completed" for r in rows)
    head = f"sweep {sweep_dir.name}: {record.get('status', '?')}, {done}/{len(rows)} trials completed"
    if record.get("mlflow"):
        head += f"; MLflow {record['mlflow']['tracking_uri']} parent run {record['mlflow']['run_id']}"
    return head + "\n" + (body if rows else "(no trial has started yet)")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
