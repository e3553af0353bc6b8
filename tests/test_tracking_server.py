"""MLflow as a cluster runs it: ``mlflow server`` backed by PostgreSQL, artifacts on an S3-API server,
all started here on 127.0.0.1. Tracking URIs are checked in seconds; a server that goes away mid-run
loses nothing (metrics kept in the run folder's spool file and sent when it is back); a sweep whose
storage, shards and artifacts are on s3:// is killed, resumed and tracked by the server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.cli.main import main
from sdetr.platform.layout import (
    COST_FILE,
    DYNAMIC_RHO_FILE,
    EVENTS_FILE,
    HISTORY_FILE,
    METRICS_SPOOL,
    RUN_RECORD,
    SWEEP_RECORD,
    TRIAL_RECORD,
    TRIALS_DIR,
)
from sdetr.platform.metric_logger import MetricLogger
from sdetr.platform.pareto import pareto_mask
from sdetr.platform.shards.writer import shard_coco
from sdetr.platform.storage import Location
from sdetr.platform.training.report import read_history
from sdetr.platform.uris import check_tracking_uri

from .services import BUCKET, start_mlflow, start_postgres, start_s3, stop
from .test_sweep import sdetr, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    saved = dict(os.environ)
    folder = tmp_path_factory.mktemp("servers")
    with contextlib.ExitStack() as cleanup:  # whatever started is stopped, also when a later start fails
        cleanup.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        s3, _ = start_s3(folder, {})
        cleanup.callback(stop, s3)
        database, stop_pg = start_postgres()
        cleanup.callback(stop_pg)
        mlflow, uri = start_mlflow(folder, database, f"s3://{BUCKET}/mlartifacts")
        state = {"folder": folder, "database": database, "uri": uri, "mlflow": mlflow}
        cleanup.callback(lambda: stop(state["mlflow"]))  # the test restarts it
        yield state


def test_uris_are_checked_in_seconds(servers):
    check_tracking_uri(servers["uri"])
    check_tracking_uri(servers["database"])
    wrong_db = servers["database"].replace("postgres@", "postgres:pw@").rsplit("/", 1)[0] + "/nope"
    cases = [
        (wrong_db, r"postgres:\*\*\*@127.0.0.1.*cannot connect.*nope"),
        ("http://127.0.0.1:9", "cannot be reached"),
        (os.environ["AWS_ENDPOINT_URL"], "not an MLflow server"),  # answers http, but is not MLflow
    ]
    for uri, message in cases:
        # Seconds, not the minutes of MLflow's retries (289 s before); generous for a loaded CI machine.
        start = time.monotonic()
        with pytest.raises(ConfigError, match=message):
            check_tracking_uri(uri)
        assert time.monotonic() - start < 30, uri


def test_a_server_that_goes_away_loses_nothing(servers, tmp_path):
    uri = servers["uri"]
    run = tracking.start_run(uri, "away", experiment="away", artifact_location=f"s3://{BUCKET}/art")
    messages: list[str] = []
    # The spool file of a run folder on object storage, as a Ray worker of an s3:// run keeps it.
    folder = Location(f"s3://{BUCKET}/runs/away")
    spool = f"{folder}/{METRICS_SPOOL}"
    logger = MetricLogger(uri, run.run_id, spool=spool, log=messages.append)
    logger.log({"epoch": 0, "AP": 0.1}, 0, marker="epoch")
    assert logger.flush()
    # A second run whose worker dies after logging epoch 0 and restarts while the server is away.
    other = tracking.start_run(uri, "restarted", experiment="away")
    first = MetricLogger(uri, other.run_id, log=messages.append)
    first.log({"epoch": 0, "AP": 0.5}, 0, marker="epoch")
    assert first.flush()

    stop(servers["mlflow"])
    start = time.monotonic()
    logger.log({"epoch": 1, "AP": 0.2}, 1, marker="epoch")
    assert not logger.flush()
    assert time.monotonic() - start < 60  # training is not held up for minutes
    assert logger.pending == 2 and len(folder.read_text(METRICS_SPOOL).splitlines()) == 2
    assert any("unreachable" in m and f"kept in {spool}" in m for m in messages), messages
    restarted = MetricLogger(uri, other.run_id, log=messages.append)
    assert restarted.restore_floor("epoch") is None  # the server cannot say: no error, decided later
    assert restarted.log({"epoch": 0, "AP": 0.5}, 0, marker="epoch")  # replayed from the checkpoint
    restarted.log({"epoch": 1, "AP": 0.6}, 1, marker="epoch")
    assert not restarted.flush() and restarted.pending == 4

    # A process that restarts meanwhile sends what its predecessor could not.
    port = int(uri.rsplit(":", 1)[1])
    servers["mlflow"], _ = start_mlflow(servers["folder"], servers["database"], f"s3://{BUCKET}/art", port)
    again = MetricLogger(uri, run.run_id, spool=spool, log=messages.append)
    assert again.pending == 2 and again.restore_floor("epoch") == 1
    assert not again.log({"epoch": 1, "AP": 0.2}, 1, marker="epoch")  # a replayed epoch: not twice
    again.log({"epoch": 2, "AP": 0.3}, 2, marker="epoch")
    assert again.flush() and not folder.exists(METRICS_SPOOL)
    history = tracking.client(uri).get_metric_history(run.run_id, "AP")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.1), (1, 0.2), (2, 0.3)]
    # The restarted worker's first flush that reaches the server leaves out the epoch it already has.
    # (Up to three flushes, as training would retry: a loaded server can miss the 15 s read timeout.)
    assert any(restarted.flush() for _ in range(3)) and restarted.pending == 0
    for key, values in (("AP", [(0, 0.5), (1, 0.6)]), ("epoch", [(0, 0.0), (1, 1.0)])):
        history = tracking.client(uri).get_metric_history(other.run_id, key)
        assert sorted((m.step, m.value) for m in history) == values, key
    assert not restarted.log({"epoch": 1, "AP": 0.6}, 1, marker="epoch")


def _sweep_file(data: str, name: str) -> str:
    """Two tiny trials at once, 2 epochs of 4 steps (8 train images, batch 2, one worker each)."""
    return textwrap.dedent(
        f"""\
        name: {name}
        preset: tiny_sparse_detr_rho_0.1
        set:
          optim.batch_size: 2
          optim.lr_drop: 100
          data.train_scales: [96]
          data.random_crop: false
          data.val_scale: 96
          train.progress: false
          train.log_every_steps: 4
        space:
          model.rho: [0.1, 0.5]
        resources: {{workers: 1, cpus_per_worker: 0.5, max_concurrent: 2}}
        epochs: 2
        data: {data}
        mlflow: {{experiment: cluster-sweep}}
        cost: {{input: [96, 128], fps: false}}
        """
    )


def _epochs_on_storage(sweep: Location) -> dict[str, int]:
    return {t: len(read_history(sweep.child(TRIALS_DIR, t))) for t in sweep.list_dirs(TRIALS_DIR)}


def test_sweep_on_s3_into_the_server_killed_and_resumed(servers, tmp_path, capsys):
    """The cluster set-up end to end: shards, trial folders, checkpoints and MLflow artifacts on the
    S3-API server, tracking in the PostgreSQL-backed `mlflow server`. The sweep's driver is SIGKILLed
    once a trial has finished an epoch; `sweep resume` then finishes it. Exactly one MLflow run per trial,
    each epoch and the cost logged once, the front marked; `sweep status`, `pareto` and `eval --checkpoint
    s3://...` work; the same `sweep run` again finds the sweep finished without starting Ray. (The one
    kill-and-resume sweep of the suite: local storage takes the same paths through `storage.Location`.)"""
    generate_synthetic_coco(tmp_path / "coco", n_train=8, n_val=2, seed=3, min_size=80, max_size=96)
    shard_coco(tmp_path / "coco", tmp_path / "shards", shard_size=8, progress=False)
    data = f"s3://{BUCKET}/cluster/shards"
    Location(data).upload_tree(tmp_path / "shards")  # what `sdetr data shard --out s3://...` does
    storage, name, uri = f"s3://{BUCKET}/cluster/runs", "s3sweep", servers["uri"]
    spec = tmp_path / "sweep.yaml"
    spec.write_text(_sweep_file(data, name))
    sweep = Location(storage).child(name)
    command = sdetr("sweep", "run", str(spec), "--storage", storage, "--mlflow-uri", uri)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_for(lambda: 1 in _epochs_on_storage(sweep).values(), 600, "a trial's first epoch", proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver's local Ray goes with it
            os.killpg(proc.pid, signal.SIGKILL)
    before = _epochs_on_storage(sweep)
    assert sum(before.values()) < 4, f"the sweep had finished before it was killed: {before}"
    assert not list(Path.cwd().glob("s3:*")) and not list(tmp_path.glob("s3:*"))  # never a local "s3:" folder

    # In this process (a command's start-up is most of its time): status, later pareto and eval.
    assert main(["sweep", "status", name, "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert f"sweep {name}: stopped" in out and "trials completed" in out, out

    # `sweep resume`, the tracking URI given again as for a server whose URI carries a password.
    resume = sdetr("sweep", "resume", name, "--storage", storage, "--mlflow-uri", uri)
    again = subprocess.run(
        resume, capture_output=True, text=True, env=env, timeout=900, start_new_session=True
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _epochs_on_storage(sweep) == {t: 2 for t in before} and len(before) == 2
    # The trial killed mid-way continued from its checkpoint: its events.jsonl, on the S3-API server.
    for trial in [t for t, n in before.items() if n == 1]:
        events = [
            json.loads(line) for line in sweep.child(TRIALS_DIR, trial).read_text(EVENTS_FILE).splitlines()
        ]
        assert [e["event"] for e in events].count("start") == 1, events
        assert any(e["event"] == "resume" and e["epoch"] >= 1 for e in events), events
        assert any(e["event"] == "checkpoint" for e in events), events

    client = tracking.client(uri)
    exp = client.get_experiment_by_name("cluster-sweep")
    assert exp.artifact_location == f"{storage}/mlartifacts"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sdetr.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1 == 2
    assert {r.data.tags["sdetr.trial_id"] for r in children} == set(before)
    gflops = {}
    for run in children:
        for key in ("val/AP", "epoch", "epoch/train_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == [0, 1], (run.data.tags["sdetr.trial_id"], key, steps)
        cost = sweep.child(TRIALS_DIR, run.data.tags["sdetr.trial_id"]).read_json(COST_FILE)
        assert run.data.metrics["cost/gflops"] == pytest.approx(cost["gflops"])
        assert len(client.get_metric_history(run.info.run_id, "cost/gflops")) == 1
        assert float(run.data.params["model.rho"]) == float(run.data.params["sweep.model.rho"])
        gflops[float(run.data.params["model.rho"])] = cost["gflops"]
        assert run.data.tags["pareto_optimal"] in ("true", "false")
        assert not sweep.child(TRIALS_DIR, run.data.tags["sdetr.trial_id"]).exists(METRICS_SPOOL)
        # The pictures of each evaluation, in the trial's folder on object storage and in its run.
        trial_folder = sweep.child(TRIALS_DIR, run.data.tags["sdetr.trial_id"])
        assert trial_folder.list_files("pictures/epoch_002"), trial_folder
        assert client.list_artifacts(run.info.run_id, "pictures/epoch_002")
    assert gflops[0.1] < gflops[0.5]
    # The front marked in MLflow is the front of the (AP, GFLOPs) points.
    points = [
        {"AP": r.data.metrics["val/AP"], "gflops": r.data.metrics["cost/gflops"], "id": r.info.run_id}
        for r in children
    ]
    expected = {p["id"] for p, on in zip(points, pareto_mask(points)) if on}
    assert {r.info.run_id for r in children if r.data.tags["pareto_optimal"] == "true"} == expected
    pareto = {a.path for a in client.list_artifacts(parents[0].info.run_id, "pareto")}
    assert pareto == {"pareto/pareto.csv", "pareto/pareto.png", "pareto/pareto.html"}
    assert sweep.parent().child("mlartifacts").list_dirs()  # the artifacts went to the S3-API server

    capsys.readouterr()
    assert main(["sweep", "status", name, "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert f"sweep {name}: finished" in out and "2/2 trials completed" in out, out
    sweep.remove("pareto/pareto.png")
    assert main(["pareto", name, "--storage", storage]) == 0
    assert sweep.list_files("pareto") == ["pareto.csv", "pareto.html", "pareto.png"]

    trial = min(before)
    capsys.readouterr()
    argv = ["eval", "--checkpoint", f"{sweep.uri}/{TRIALS_DIR}/{trial}", "--rho", "0.1,0.3", "--val", "2"]
    assert main([*argv, "--flops-images", "1", "--flops-input", "none", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["checkpoint"].startswith(f"{sweep.uri}/{TRIALS_DIR}/{trial}/checkpoint_epoch0001")
    assert record["trial_id"] == trial and record["data"] == data
    assert sweep.child(TRIALS_DIR, trial).read_json(DYNAMIC_RHO_FILE)["points"][0]["rho"] == 0.1
    run_id = next(r.info.run_id for r in children if r.data.tags["sdetr.trial_id"] == trial)
    assert len(client.get_metric_history(run_id, "dynamic_rho/AP")) == 2

    # Running the same file on the finished sweep changes nothing, and starts no Ray cluster to find that out.
    again = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, start_new_session=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "has finished" in again.stdout and "Started a local Ray" not in again.stdout + again.stderr
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == 3
    assert _epochs_on_storage(sweep) == {t: 2 for t in before}


def test_metrics_kept_after_a_run_ended_are_sent_by_pareto(servers, capsys):
    """A trial whose run ended while the server was away leaves its spool file in its folder (on s3);
    the next `sdetr pareto` (as the end of a sweep or its resume) sends it and removes it."""
    uri = servers["uri"]
    parent = tracking.start_run(uri, "ended", experiment="ended", artifact_location=f"s3://{BUCKET}/art")
    child = tracking.start_run(uri, "t0", experiment="ended", parent_run_id=parent.run_id)
    sweep = Location(f"s3://{BUCKET}/ended/runs").child("ended")
    trial = sweep.child(TRIALS_DIR, "t0")
    trial.write_json(
        TRIAL_RECORD,
        {"trial_id": "t0", "label": "ρ=0.1", "preset": "tiny_sparse_detr_rho_0.1", "backbone": "resnet18",
         "rho": 0.1, "epochs": 2, "cost": {"gflops": 1.0, "params": 1e6, "cost_input": "3x96x128"},
         "params": {}},
    )  # fmt: skip
    trial.write_json(
        HISTORY_FILE, {"epochs": 2, "history": [{"epoch": 0, "AP": 0.1}, {"epoch": 1, "AP": 0.2}]}
    )
    trial.write_json(RUN_RECORD, {"mlflow": {**child.to_dict()}})
    kept = [
        {"key": "val/AP", "value": 0.2, "timestamp": 1, "step": 1},
        {"key": "epoch", "value": 2, "timestamp": 1, "step": 1},
    ]
    trial.write_text(METRICS_SPOOL, "".join(json.dumps(m) + "\n" for m in kept))
    sweep.write_json(SWEEP_RECORD, {"name": "ended", "status": "finished", "mlflow": parent.to_dict()})
    assert main(["pareto", "ended", "--storage", f"s3://{BUCKET}/ended/runs"]) == 0
    assert "sent 2 metrics that t0 kept" in capsys.readouterr().out
    assert not trial.exists(METRICS_SPOOL)
    client = tracking.client(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(child.run_id, "val/AP")] == [(1, 0.2)]
    assert client.get_run(child.run_id).data.tags["pareto_optimal"] == "true"
