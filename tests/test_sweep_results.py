"""Reading a sweep back from its folder: trial states, stopped-early trials kept off the front, status."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from sdetr.platform.layout import SWEEP_RECORD, TRIAL_RECORD, TRIALS_DIR
from sdetr.platform.sweeps.results import (
    TRIAL_STATES_FILE,
    collect_points,
    finalize,
    record_states,
    status_table,
)


def make_trial(sweep_dir: Path, trial_id: str, rho: float, aps: list[float], epochs: int, gflops: float):
    folder = sweep_dir / TRIALS_DIR / trial_id
    folder.mkdir(parents=True)
    record = {
        "trial_id": trial_id,
        "params": {"model.rho": rho},
        "label": f"ρ={rho} R18",
        "preset": "tiny_sparse_detr_rho_0.1",
        "backbone": "resnet18",
        "rho": rho,
        "epochs": epochs,
        "cost": {"gflops": gflops, "params": 11.8e6, "fps": None, "cost_input": "3x850x1040"},
    }
    (folder / TRIAL_RECORD).write_text(json.dumps(record))
    history = [{"epoch": i, "AP": ap, "AP50": 2 * ap} for i, ap in enumerate(aps)]
    (folder / "history.json").write_text(json.dumps({"epochs": epochs, "history": history}))
    return folder


def test_stopped_early_and_failed_trials_are_never_on_the_front(tmp_path):
    sweep = tmp_path / "s"
    (sweep).mkdir()
    (sweep / SWEEP_RECORD).write_text(json.dumps({"name": "s", "mlflow": None, "status": "finished"}))
    make_trial(sweep, "t0", 0.1, [0.1, 0.2, 0.3], 3, 30.0)  # completed
    make_trial(sweep, "t1", 0.2, [0.4], 3, 20.0)  # ASHA stopped it after one epoch: best-looking point
    make_trial(sweep, "t2", 0.3, [0.35, 0.5], 3, 40.0)  # failed in its last epoch
    make_trial(sweep, "t3", 0.5, [0.1, 0.2, 0.25], 3, 50.0)  # completed, dominated by t0
    grid = SimpleNamespace(
        _experiment_analysis=SimpleNamespace(
            trials=[
                SimpleNamespace(trial_id="t0", status="TERMINATED"),
                SimpleNamespace(trial_id="t1", status="TERMINATED"),
                SimpleNamespace(trial_id="t2", status="ERROR"),
                SimpleNamespace(trial_id="t3", status="TERMINATED"),
            ]
        )
    )
    record_states(sweep, grid)
    assert json.loads((sweep / TRIAL_STATES_FILE).read_text())["t2"] == "error"
    points = {p.trial_id: p for p in collect_points(sweep)}
    assert {k: p.status for k, p in points.items()} == {
        "t0": "completed",
        "t1": "stopped_early",
        "t2": "error",
        "t3": "completed",
    }
    summary = finalize(sweep, log=lambda *_: None)
    assert [p.trial_id for p in summary["front"]] == ["t0"]
    csv_text = (sweep / "pareto" / "pareto.csv").read_text()
    assert "stopped_early" in csv_text and "error" in csv_text
    # The CSV and the plot's label say at which rung (epoch) a stopped trial stopped.
    import csv

    rows = {r["trial_id"]: r for r in csv.DictReader(csv_text.splitlines())}
    assert rows["t1"]["stopped_at_epoch"] == "1" and rows["t0"]["stopped_at_epoch"] == ""
    assert points["t1"].label.endswith("(stopped at epoch 1)")
    table = status_table(sweep)
    assert "2/4 trials completed" in table
    assert "1/3" in table and "stopped_early" in table


def test_dynamic_rho_points_join_the_plot(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / SWEEP_RECORD).write_text(json.dumps({"name": "s", "mlflow": None}))
    folder = make_trial(sweep, "t0", 0.1, [0.3], 1, 30.0)
    points = [
        {"rho": r, "AP": 0.2 + r, "gflops": 1.0 + r, "gflops_fixed": 29.0 + 10 * r} for r in (0.05, 0.2)
    ]
    (folder / "dynamic_rho.json").write_text(json.dumps({"fixed_input": "3x850x1040", "points": points}))
    collected = collect_points(sweep)
    dyn = [p for p in collected if p.source == "dynamic_rho"]
    # The sweep counted GFLOPs at the fixed input, so the curve uses its fixed-input figures too.
    assert [p.gflops for p in dyn] == [29.5, 31.0]
    assert all(p.label.endswith("(dyn)") and p.trial_id == "t0" for p in dyn)


def test_dynamic_rho_counted_on_another_input_is_left_off(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / SWEEP_RECORD).write_text(json.dumps({"name": "s", "mlflow": None}))
    folder = make_trial(sweep, "t0", 0.1, [0.3], 1, 30.0)
    points = [{"rho": 0.2, "AP": 0.4, "gflops": 1.2, "gflops_fixed": 2.0}]
    (folder / "dynamic_rho.json").write_text(json.dumps({"fixed_input": "3x128x160", "points": points}))
    warnings = []
    collected = collect_points(sweep, log=warnings.append)
    assert [p.source for p in collected] == ["trial"]
    assert "3x128x160" in warnings[0] and "3x850x1040" in warnings[0]
