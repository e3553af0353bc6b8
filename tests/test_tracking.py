"""MLflow helpers: URI resolution, one run created once and continued, no duplicate steps after a resume."""

from __future__ import annotations

import pytest

from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.metric_logger import MetricLogger


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri("none", tmp_path) is None
    assert tracking.resolve_tracking_uri("http://host:5000", None) == "http://host:5000"
    # Relative SQLite URIs and bare .db paths become absolute: Ray workers run in other directories.
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel.db", None) == f"sqlite:///{tmp_path.resolve()}/rel.db"
    assert tracking.resolve_tracking_uri("x/m.db", None) == f"sqlite:///{tmp_path.resolve()}/x/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="not a local folder.*--mlflow-uri"):
        tracking.resolve_tracking_uri(None, None)
    with pytest.raises(ConfigError, match="tracking URI 'mlruns'"):
        tracking.resolve_tracking_uri("mlruns", None)


def test_run_is_created_once_continued_and_never_logs_a_step_twice(tmp_path):
    uri = tracking.sqlite_uri(tmp_path / "mlflow.db")
    artifacts = (tmp_path / "artifacts").as_uri()
    params = {f"p{i}": i for i in range(150)} | {"long": "x" * 7000}
    run = tracking.start_run(uri, "demo", artifact_location=artifacts, params=params, tags={"k": "v"})
    assert not run.resumed
    client = tracking.client(uri)
    got = client.get_run(run.run_id)
    assert got.info.run_name == "demo" and got.data.tags["k"] == "v"
    assert len(got.data.params) == 151 and got.data.params["long"].endswith("…")
    assert client.get_experiment(run.experiment_id).artifact_location == artifacts
    # Creating the experiment again (another driver) finds the same one.
    assert tracking.ensure_experiment(client, tracking.DEFAULT_EXPERIMENT) == run.experiment_id

    logger = MetricLogger(uri, run.run_id)
    for step in range(1, 6):
        assert logger.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step, marker="train/loss")
    logger.log({"epoch": 0, "val/AP": 0.1, "nan": float("nan")}, 0, marker="epoch")
    logger.flush()
    tracking.finish_run(uri, run.run_id, "FAILED")

    # A resumed attempt replays steps 4..5 and epoch 0 before reaching new ground.
    again = tracking.start_run(uri, "demo", previous_run_id=run.run_id, params={"p0": "changed"})
    assert again.resumed and again.run_id == run.run_id
    assert client.get_run(run.run_id).info.status == "RUNNING"
    logger = MetricLogger(uri, run.run_id)
    assert logger.restore_floor("train/loss") == 5 and logger.restore_floor("epoch") == 0
    for step in range(4, 8):
        logger.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step, marker="train/loss")
    assert not logger.log({"epoch": 0, "val/AP": 0.1}, 0, marker="epoch")
    logger.log({"epoch": 1, "val/AP": 0.2}, 1, marker="epoch")
    logger.flush()
    tracking.finish_run(uri, run.run_id)

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(run.run_id, key))

    assert steps("train/loss") == [1, 2, 3, 4, 5, 6, 7]
    assert steps("train/lr") == [1, 2, 3, 4, 5, 6, 7]
    assert steps("val/AP") == [0, 1] and steps("nan") == []
    assert client.get_run(run.run_id).data.params["p0"] == "0"  # params are logged once, at creation
    assert client.get_run(run.run_id).info.status == "FINISHED"
    runs = client.search_runs([run.experiment_id])
    assert [r.info.run_id for r in runs] == [run.run_id]

    # A recorded run id that the store does not know starts a new run instead of failing.
    fresh = tracking.start_run(uri, "demo2", previous_run_id="0" * 32, log=lambda *_: None)
    assert not fresh.resumed and fresh.run_id != run.run_id


def test_a_store_that_is_away_at_the_end_does_not_fail_a_finished_run(tmp_path):
    from sdetr.platform.training.driver import mark_run

    uri = tracking.sqlite_uri(tmp_path / "mlflow.db")
    run = tracking.start_run(uri, "demo")
    mark_run(run, "FINISHED")
    assert tracking.client(uri).get_run(run.run_id).info.status == "FINISHED"

    gone = tracking.sqlite_uri(tmp_path / "gone" / "mlflow.db")
    away = tracking.TrackedRun(gone, run.experiment_id, run.run_id)
    lines: list[str] = []
    mark_run(away, "FINISHED", log=lines.append)  # no exception: the training result stands
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: could not mark MLflow run {run.run_id} FINISHED"), lines
