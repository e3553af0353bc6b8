"""What a sweep produced, read back from its folder: trial states, the Pareto front and its artifacts.

Everything here works from files the trials write (``trials/<id>/sdetr_trial.json``, ``history.json``,
``sdetr_run.json``, ``dynamic_rho.json``), so ``sdetr sweep status`` and ``sdetr pareto`` work while
the sweep runs, after it was killed, and on a copy of its folder.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.layout import (
    DYNAMIC_RHO_FILE,
    HISTORY_FILE,
    METRICS_SPOOL,
    PARETO_DIR,
    RUN_RECORD,
    SWEEP_RECORD,
    TRIAL_RECORD,
    TRIAL_STATES_FILE,
    TRIALS_DIR,
)
from sdetr.platform.metric_logger import MetricLogger, send_spool
from sdetr.platform.pareto import (
    ParetoPoint,
    format_table,
    label_for,
    mark_front,
    plot_png,
    write_csv,
    write_html,
)
from sdetr.platform.storage import Location
from sdetr.platform.sweeps.heartbeat import driver_state
from sdetr.platform.sweeps.summary import DESCRIPTION_TAG, front_description, gflops_note, next_steps
from sdetr.platform.uris import redact, usable_uri


def trial_rows(sweep_dir: str | Path | Location) -> list[dict[str, Any]]:
    """One dict per trial: its record, epochs done, the last epoch's metrics, its state and MLflow run."""
    sweep = Location.of(sweep_dir)
    states = sweep.read_json(TRIAL_STATES_FILE) or {}
    rows = []
    for trial_id in sweep.list_dirs(TRIALS_DIR):
        folder = sweep.child(TRIALS_DIR, trial_id)
        record = folder.read_json(TRIAL_RECORD)
        if not record:
            continue
        saved = folder.read_json(HISTORY_FILE, default={})
        history = list(saved.get("history", [])) if isinstance(saved, dict) else []
        run = (folder.read_json(RUN_RECORD) or {}).get("mlflow") or {}
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


def collect_points(sweep_dir: str | Path | Location, log=print) -> list:
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
        dyn = Location.of(row["folder"]).read_json(DYNAMIC_RHO_FILE) or {}
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
                    extra={"trained_rho": row["rho"], "AP50": p.get("AP50")},
                )
            )
    return points


def record_states(sweep_dir: str | Path | Location, grid) -> dict[str, str]:
    """Tune's verdict per trial: a trial Tune ended before its last epoch was stopped by the scheduler."""
    sweep = Location.of(sweep_dir)
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    states = sweep.read_json(TRIAL_STATES_FILE) or {}
    for trial in trials:
        if trial.status == "ERROR":
            states[trial.trial_id] = "error"
        elif trial.status == "TERMINATED":
            states[trial.trial_id] = "stopped_early"  # overridden by "completed" when history is complete
        else:
            states[trial.trial_id] = "running"  # pending or paused when the sweep stopped
    sweep.write_json(TRIAL_STATES_FILE, states)
    return states


def finalize(
    sweep_dir: str | Path | Location, log=print, mlflow: bool = True, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Compute the front, write pareto.csv/png/html, and mark it in MLflow (parent artifacts and a
    ``pareto_optimal`` tag on every trial run). Returns {"points": [...], "front": [...]}.

    ``tracking_uri``: the sweep's store when the saved one is masked (it had a password); else the
    saved one, or $MLFLOW_TRACKING_URI when it is the same URI."""
    sweep = Location.of(sweep_dir)
    points = mark_front(collect_points(sweep, log))
    title = f"{sweep.name}: AP vs GFLOPs"
    note = gflops_note([r["cost"] for r in trial_rows(sweep)])
    with tempfile.TemporaryDirectory(prefix="sdetr-pareto-") as tmp:
        # Written in place on a local sweep; on object storage drawn here and uploaded.
        out = sweep.local / PARETO_DIR if sweep.local is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = [
            write_csv(points, out / "pareto.csv"),
            plot_png(points, out / "pareto.png", title=title, xlabel=f"GFLOPs ({note})"),
            write_html(points, out / "pareto.html", title=title, xlabel=f"GFLOPs ({note})"),
        ]
        if sweep.local is None:
            for f in files:
                sweep.upload(f, f"{PARETO_DIR}/{f.name}")
        log(format_table(points, note))
        log(f"Pareto front: {', '.join(f'{sweep}/{PARETO_DIR}/{f.name}' for f in files)}")
        record = sweep.read_json(SWEEP_RECORD) or {}
        tracked = record.get("mlflow")
        if tracked:
            uri = tracking_uri or usable_uri(tracked["tracking_uri"])
            if uri is None and mlflow:
                log(
                    f"note: MLflow not updated: give {tracked['tracking_uri']} with its password "
                    "in $MLFLOW_TRACKING_URI"
                )
            tracked = {**tracked, "tracking_uri": uri} if uri else None
        if mlflow and tracked:
            send_spools(sweep, tracked["tracking_uri"], log)
            _log_front(tracked, points, files)
            tracking.set_tags(
                tracking.client(tracked["tracking_uri"]),
                tracked["run_id"],
                {DESCRIPTION_TAG: front_description(sweep.name, points, note)},
            )
        tracked = tracked or {}
        for line in next_steps(
            sweep.name,
            f"{sweep}/{PARETO_DIR}",
            tracked.get("tracking_uri"),
            tracked.get("run_id"),
            storage=sweep.parent().uri,
        ):
            log(line)
    front = [p for p in points if p.on_front]
    return {"points": points, "front": front}


def send_spools(sweep_dir: str | Path | Location, tracking_uri: str, log=print) -> int:
    """Send the metrics trials kept in their spool files (``mlflow_pending.jsonl``: the tracking server
    was away when a worker flushed, and the run ended before it came back); returns how many. Called
    when a sweep ends and by ``sdetr pareto``; a store still unreachable leaves the files for next time."""
    sweep = Location.of(sweep_dir)
    sent = 0
    for row in trial_rows(sweep):
        folder = Location.of(row["folder"])
        if not row["run_id"] or not folder.is_file(METRICS_SPOOL):
            continue
        try:
            count = send_spool(tracking_uri, row["run_id"], f"{folder}/{METRICS_SPOOL}", log=log)
        except ConfigError as exc:
            log(f"warning: {exc}")
            continue
        log(f"sent {count} metrics that {row['trial_id']} kept while MLflow was unreachable")
        sent += count
    return sent


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
    logger = MetricLogger(tracked["tracking_uri"], tracked["run_id"])
    logger.log(summary, 0)
    logger.flush()
    tracking.set_tags(
        client, tracked["run_id"], {"sdetr.pareto_front": ", ".join(p.label for p in front)[:5000]}
    )


def status_table(sweep_dir: str | Path | Location) -> str:
    """``sdetr sweep status``: one line per trial; "running" only while the sweep's driver is alive."""
    sweep = Location.of(sweep_dir)
    record = sweep.read_json(SWEEP_RECORD)
    if record is None:
        raise ConfigError(f"{sweep}: no sweep there (no {SWEEP_RECORD})")
    status, detail = driver_state(record)
    rows = trial_rows(sweep)
    header = ("trial", "label", "epoch", "AP %", "AP50 %", "GFLOPs", "state")
    lines = [header]
    for r in rows:
        ap, ap50 = r["last"].get("AP"), r["last"].get("AP50")
        state = r["state"]
        if state == "running" and status != "running":
            state = "interrupted"  # its driver is gone: nothing runs it
        lines.append(
            (
                r["trial_id"],
                r["label"],
                f"{r['epochs_done']}/{r['epochs']}",
                _fmt(None if ap is None else 100 * ap, 1),
                _fmt(None if ap50 is None else 100 * ap50, 1),
                _fmt(r["cost"].get("gflops"), 2),
                state,
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    body = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    done = sum(r["state"] == "completed" for r in rows)
    state = f"{status} {detail}".rstrip()
    head = f"sweep {sweep.name}: {state}, {done}/{len(rows)} trials completed"
    if record.get("mlflow"):
        head += f"\nMLflow {redact(record['mlflow']['tracking_uri'])} parent run {record['mlflow']['run_id']}"
    if status == "stopped":
        head += f"\n`sdetr sweep resume {sweep.name}` continues it"
    return head + "\n" + (body if rows else "(no trial has started yet)")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
