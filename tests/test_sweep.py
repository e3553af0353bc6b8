"""A real sweep on a local Ray: killed mid-sweep, resumed, and checked in MLflow and on disk.

The driver is killed with SIGKILL once a trial has checkpointed an epoch; `sdetr sweep resume` must
finish every trial (the interrupted ones from their checkpoints), and MLflow must hold exactly one
parent run and one child run per trial, with per-epoch metrics (no epoch twice), cost metrics, the
``pareto_optimal`` tag and the front's CSV/PNG/HTML on the parent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.platform import tracking
from sdetr.platform.pareto import pareto_mask
from sdetr.platform.shards.writer import shard_coco

pytestmark = pytest.mark.slow
EXPERIMENT = "test-sweeps"
RHOS = [0.1, 0.5]


def sweep_yaml(
    data: Path,
    name: str,
    rhos: list[float] = RHOS,
    epochs: int = 2,
    resources: str = "{workers: 1, cpus_per_worker: 0.5, max_concurrent: 2}",
    scheduler: str = "{type: none}",
) -> str:
    """By default two tiny trials at once, 2 epochs of 8 steps each (16 images, batch 2, one worker)."""
    return textwrap.dedent(
        f"""\
        name: {name}
        preset: tiny_sparse_detr_rho_0.1
        set:
          optim.batch_size: 2
          optim.lr_drop: 100
          data.train_scales: [128]
          data.random_crop: false
          data.val_scale: 128
          train.progress: false
          train.log_every_steps: 2
        space:
          model.rho: {rhos}
        resources: {resources}
        scheduler: {scheduler}
        epochs: {epochs}
        data: {data}
        mlflow: {{experiment: {EXPERIMENT}}}
        cost: {{input: [128, 160], fps: false}}
        """
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweepdata")
    generate_synthetic_coco(root / "coco", n_train=16, n_val=4, seed=3, min_size=96, max_size=128)
    shard_coco(root / "coco", root / "shards", shard_size=8, progress=False)
    return root / "shards"


def sdetr(*argv: str, **kw) -> list[str]:
    return [sys.executable, "-m", "sdetr.platform.cli", *argv]


def wait_for(
    predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the sweep exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            )
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def epochs_done(sweep_dir: Path) -> dict[str, int]:
    out = {}
    for f in (sweep_dir / "trials").glob("*/history.json"):
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            out[f.parent.name] = len(json.loads(f.read_text())["history"])
    return out


def test_sweep_killed_then_resumed(shards, tmp_path):
    storage = tmp_path / "runs"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(sweep_yaml(shards, "kill"))
    sweep_dir = storage / "kill"
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            sdetr("sweep", "run", str(spec), "--storage", str(storage)),
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        # Kill once some trial has a checkpointed epoch and has not finished: mid-sweep, mid-trial.
        wait_for(lambda: 1 in epochs_done(sweep_dir).values(), 600, "a trial's first epoch", proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        # The driver's local Ray cluster shares its session: take it down as a lost machine would be.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = epochs_done(sweep_dir)
    assert sum(before.values()) < 2 * len(RHOS), f"the sweep had finished before it was killed: {before}"

    status = subprocess.run(
        sdetr("sweep", "status", "kill", "--storage", str(storage)), capture_output=True, text=True
    )
    assert status.returncode == 0 and "trials completed" in status.stdout, status.stderr

    resumed = subprocess.run(
        sdetr("sweep", "resume", "kill", "--storage", str(storage)),
        capture_output=True, text=True, env=env, timeout=900, start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert epochs_done(sweep_dir) == {t: 2 for t in epochs_done(sweep_dir)} and len(
        epochs_done(sweep_dir)
    ) == len(RHOS)

    # The trial interrupted mid-way continued from its checkpoint instead of starting again.
    interrupted = [t for t, n in before.items() if n == 1]
    for trial in interrupted:
        events = [
            json.loads(line)
            for line in (sweep_dir / "trials" / trial / "events.jsonl").read_text().splitlines()
        ]
        assert [e["event"] for e in events].count("start") == 1, events
        assert any(e["event"] == "resume" and e["epoch"] >= 1 for e in events), events

    # MLflow: one parent, one child per trial, every metric once per epoch.
    client = tracking.client(tracking.sqlite_uri(storage / "mlflow.db"))
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sdetr.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(RHOS)
    trial_ids = {r.data.tags["sdetr.trial_id"] for r in children}
    assert trial_ids == set(epochs_done(sweep_dir))
    gflops = {}
    for run in children:
        history = client.get_metric_history(run.info.run_id, "val/AP")
        assert sorted(m.step for m in history) == [0, 1], history
        cost = json.loads((sweep_dir / "trials" / run.data.tags["sdetr.trial_id"] / "cost.json").read_text())
        assert run.data.metrics["cost/gflops"] == pytest.approx(cost["gflops"])
        assert len(client.get_metric_history(run.info.run_id, "cost/gflops")) == 1
        assert float(run.data.params["model.rho"]) == float(run.data.params["sweep.model.rho"])
        assert run.data.tags["pareto_optimal"] in ("true", "false")
        gflops[float(run.data.params["model.rho"])] = cost["gflops"]
    assert gflops[0.1] < gflops[0.5]

    # The front marked in MLflow is the front of the (AP, GFLOPs) points.
    points = [
        {"AP": r.data.metrics["val/AP"], "gflops": r.data.metrics["cost/gflops"], "id": r.info.run_id}
        for r in children
    ]
    expected = {p["id"] for p, on in zip(points, pareto_mask(points)) if on}
    assert {r.info.run_id for r in children if r.data.tags["pareto_optimal"] == "true"} == expected
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    assert artifacts == {"pareto/pareto.csv", "pareto/pareto.png", "pareto/pareto.html"}
    csv_text = (sweep_dir / "pareto" / "pareto.csv").read_text()
    assert csv_text.count("\n") == 1 + len(RHOS)

    # Re-running the same file on the finished sweep changes nothing.
    again = subprocess.run(
        sdetr("sweep", "run", str(spec), "--storage", str(storage)),
        capture_output=True, text=True, env=env, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    # ... and starts no Ray cluster to find that out.
    assert "has finished" in again.stdout and "Started a local Ray" not in again.stdout + again.stderr
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == 1 + len(RHOS)
    assert epochs_done(sweep_dir) == {t: 2 for t in trial_ids}


def test_encoders_sweep_puts_detector_families_on_one_plot(shards, tmp_path):
    """sweeps/encoders_tiny.yaml, run on three of its six detectors: one per code path a trial can take
    (Sparse DETR's scoring network and DAM loss, Lite DETR's interleaved encoder, Faster R-CNN's
    torchvision heads and losses). All six load in test_sweep_spec.py and train in single-process tests;
    each real trial here costs about a minute of CPU, mostly the start-up of its Ray processes."""
    import yaml

    shipped = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "sweeps" / "encoders_tiny.yaml").read_text()
    )
    presets = ["tiny_sparse_detr_rho_0.1", "tiny_lite_detr_h3l1_3p1x2", "tiny_faster_rcnn_fpn"]
    assert set(presets) < set(shipped["space"]["preset"])
    shipped["space"]["preset"] = presets
    shipped.update(data=str(shards), epochs=1, cost={"input": [128, 160], "fps": False})
    # All three at once: most of a tiny trial is Ray Train's start-up, which overlaps well.
    shipped["resources"] = {"workers": 1, "cpus_per_worker": 0.4, "max_concurrent": 3}
    shipped["set"] = {
        "optim.batch_size": 2,
        "data.max_train_images": 8,
        "data.train_scales": [128],
        "data.random_crop": False,
        "data.val_scale": 128,
        "train.progress": False,
    }
    spec = tmp_path / "encoders.yaml"
    spec.write_text(yaml.safe_dump(shipped))
    storage = tmp_path / "runs"
    done = subprocess.run(
        sdetr("sweep", "run", str(spec), "--storage", str(storage)),
        capture_output=True, text=True, timeout=900, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = storage / "encoders_tiny"
    rows = list(csv.DictReader((sweep_dir / "pareto" / "pareto.csv").open()))
    assert sorted(r["preset"] for r in rows) == sorted(presets)
    assert all(r["status"] == "completed" and r["AP"] != "" and float(r["gflops"]) > 0 for r in rows)
    assert len({r["gflops"] for r in rows}) == 3  # each trial counted its own model
    assert any(r["on_front"] == "1" for r in rows)


def test_moasha_sweep_with_real_trials(shards, tmp_path):
    """Three tiny trials, two epochs, one MOASHA rung at epoch 1 keeping ceil(n/3) of the n trials that
    reached it: the first trial at the rung always continues, a later one only if it ranks first. Which
    trials stop depends on arrival order; what must hold is the bookkeeping around it."""
    import yaml

    from sdetr.platform.sweeps.moasha import read_record

    storage = tmp_path / "runs"
    spec = tmp_path / "moasha.yaml"
    spec.write_text(
        sweep_yaml(
            shards,
            "moasha",
            rhos=[0.1, 0.3, 0.5],
            resources="{workers: 1, cpus_per_worker: 0.4, max_concurrent: 3}",
            scheduler="{type: moasha, grace_period: 1, reduction_factor: 3}",
        )
    )
    done = subprocess.run(
        sdetr("sweep", "run", str(spec), "--storage", str(storage)),
        capture_output=True, text=True, timeout=900, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = storage / "moasha"
    epochs = epochs_done(sweep_dir)
    record = read_record(sweep_dir / "moasha.json")
    assert len(epochs) == 3 and set(epochs.values()) <= {1, 2} and 2 in epochs.values(), epochs
    assert record["stopped_at"] == {t: 1 for t, n in epochs.items() if n == 1}
    rows = {r["trial_id"]: r for r in csv.DictReader((sweep_dir / "pareto" / "pareto.csv").open())}
    for trial, n in epochs.items():
        assert rows[trial]["status"] == ("completed" if n == 2 else "stopped_early")
        # (the column exists only when some trial was stopped)
        assert rows[trial].get("stopped_at_epoch", "") == ("" if n == 2 else "1")
        if n == 1:
            assert rows[trial]["on_front"] == "0"
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["scheduler"] == "moasha"
