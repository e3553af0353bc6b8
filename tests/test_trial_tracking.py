"""What a person reads about a sweep in MLflow and the terminal: run names = labels, the preset tag the
configuration really is, AP in percent, the parent run's description, the sweep's last lines."""

from __future__ import annotations

from sdetr.detector.presets import get_preset
from sdetr.platform import tracking
from sdetr.platform.layout import RUN_RECORD, write_json
from sdetr.platform.pareto import ParetoPoint, mark_front
from sdetr.platform.sweeps.report_callback import name_mlflow_run
from sdetr.platform.sweeps.summary import DESCRIPTION_TAG, front_description, gflops_note, next_steps
from sdetr.platform.sweeps.trial import effective_preset, headline_metrics, trial_description
from sdetr.platform.training.worker import percent_twins

COST = {
    "gflops": 1.53,
    "gflops_fixed": 39.9,
    "fixed_input": "3x850x1040",
    "params": 14.4e6,
    "fps": None,
    "cost_input": "val[:10]",
    "mean_input_hw": [160.0, 211.2],
}


def test_the_preset_tag_is_the_configuration_the_trial_trains():
    cfg = get_preset("mini_sparse_detr_rho_0.1")
    assert effective_preset(cfg) == "mini_sparse_detr_rho_0.1"
    cfg.model.rho = 0.5  # a sweep over model.rho from the ρ = 0.1 preset
    assert effective_preset(cfg) == "mini_sparse_detr_rho_0.5"
    cfg.model.rho = 0.25  # no preset builds this one: say what differs
    assert effective_preset(cfg) == "mini_sparse_detr_rho_0.1 (rho=0.25)"
    other = get_preset("r50_deformable_detr")
    other.model.num_queries = 100
    assert effective_preset(other) == "r50_deformable_detr (num_queries=100)"


def test_trial_run_is_named_after_its_label_and_says_what_it_is(tmp_path):
    uri = tracking.sqlite_uri(tmp_path / "mlflow.db")
    run = tracking.start_run(uri, "abcde_00001", experiment="e", log=lambda *_: None)
    folder = tmp_path / "trial"
    folder.mkdir()
    name_mlflow_run(folder, "Sparse ρ=0.1 R18")  # no run record yet: nothing to name, no error
    write_json(folder / RUN_RECORD, {"mlflow": run.to_dict()})
    name_mlflow_run(folder, "Sparse ρ=0.1 R18")
    got = tracking.client(uri).get_run(run.run_id)
    assert got.info.run_name == "Sparse ρ=0.1 R18"
    cfg = get_preset("mini_sparse_detr_rho_0.1")
    text = trial_description("Sparse ρ=0.1 R18", cfg, COST)
    assert "GFLOPs 1.53 (mean over 10 val images as evaluated (~160x211))" in text
    assert "39.9 on one 3x850x1040 image" in text and "FPS not measured" in text
    metrics = headline_metrics(COST, 0.1)
    assert metrics == {"GFLOPs": 1.53, "GFLOPs_fixed": 39.9, "params_M": 14.4, "rho": 0.1}


def test_ap_twins_are_percent():
    twins = percent_twins({"epoch": 1, "AP": 0.1234, "AP50": 0.4, "train_loss": 3.0})
    assert twins == {"AP_percent": 12.34, "AP50_percent": 40.0}


def test_parent_description_and_last_lines():
    pts = [
        ParetoPoint("", 0.2, 2.23, backbone="resnet18", preset="mini_deformable_detr", extra={"AP50": 0.41}),
        ParetoPoint("", 0.19, 1.53, backbone="resnet18", rho=0.1, extra={"AP50": 0.38}),
        ParetoPoint("", 0.1, 1.9, backbone="resnet18", rho=0.5, extra={"AP50": 0.2}),
    ]
    mark_front(pts)
    note = gflops_note([COST])
    assert note == (
        "mean over 10 val images as evaluated (~160x211) (at the papers' 3x850x1040: MLflow's GFLOPs_fixed)"
    )
    text = front_description("demo", pts, note)
    assert "| ★ | **Sparse ρ=0.1 R18** | 19.0 | 38.0 | 1.53 |" in text
    assert "|  | Sparse ρ=0.5 R18 | 10.0 | 20.0 | 1.90 |" in text and "pareto/pareto.png" in text
    assert DESCRIPTION_TAG == "mlflow.note.content"  # what the MLflow UI shows as a run's description
    lines = next_steps("demo", "/x/runs/demo/pareto", "sqlite:////x/runs/mlflow.db", "abc")
    assert lines[0].startswith("Open the plot: /x/runs/demo/pareto/pareto.png")
    assert "ui --backend-store-uri sqlite:////x/runs/mlflow.db" in lines[1] and "'demo' (abc)" in lines[1]
    assert lines[-1] == "Trials: sdetr sweep status demo"
    remote = next_steps("demo", "s3://b/runs/demo/pareto", None, None, storage="s3://b/runs")
    assert remote[-1] == "Trials: sdetr sweep status demo --storage s3://b/runs"
