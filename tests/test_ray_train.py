"""Ray Train on a real local Ray cluster (CPU, gloo): learning, fault tolerance, driver death, errors.

One synthetic set (16 train / 4 val images, 96-128 px) and one 2-CPU Ray cluster are shared by the
whole module; every TrainerFit costs ~15 s of fixed overhead, so runs are few and short: 2 workers x
batch 2 -> 4 steps per epoch, a checkpoint every 2 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from ray.train.v2._internal.execution.callback import TrainContextCallback

from sdetr.detector.checkpoint import read_checkpoint
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import ConfigError, DataError
from sdetr.detector.presets import get_preset
from sdetr.platform import tracking
from sdetr.platform.resources import cpus_per_worker
from sdetr.platform.shards.reader import check_shards
from sdetr.platform.shards.writer import shard_coco
from sdetr.platform.storage import RunStorage
from sdetr.platform.training.driver import launch, run
from sdetr.platform.training.report import read_history
from sdetr.platform.training.run_plan import DistributedOptions, plan_run, prepare_data

PRESET = "tiny_sparse_detr_rho_0.1"
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 16 images / 2 workers / batch 2
TINY = [
    "optim.batch_size=2",
    "optim.lr=1e-3",
    "optim.lr_backbone=1e-3",
    "optim.lr_drop=100",
    "data.train_scales=[128]",
    "data.random_crop=false",
    "data.val_scale=128",
    "data.num_workers=0",
    "train.progress=false",
    "train.log_every_steps=1",
    "train.eval_every_epochs=2",  # COCO evaluation after the last epoch only: each one costs seconds
]


def tiny_config(data, epochs=EPOCHS, extra=()):
    return get_preset(PRESET, [f"data.root={data}", f"optim.epochs={epochs}", *TINY, *extra])


def options(storage, name, every=0, **kw):
    return DistributedOptions(
        workers=2, storage=str(storage), name=name, checkpoint_every_steps=every, keep_checkpoints=2, **kw
    )


def sdetr_train_argv(data, storage, name, epochs, address, every=0):
    argv = ["train", "--preset", PRESET, "--data", str(data), "--epochs", str(epochs)]
    argv += ["--workers", "2", "--storage", str(storage), "--name", name, "--address", address]
    argv += ["--keep-checkpoints", "2", "--checkpoint-every-steps", str(every)]
    for item in TINY:
        argv += ["--set", item]
    return argv


def sdetr_main(argv) -> int:
    from sdetr.platform.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    generate_synthetic_coco(root / "coco", n_train=16, n_val=4, seed=1, min_size=96, max_size=128)
    shard_coco(root / "coco", root / "shards", shard_size=8, progress=False)
    return root


@pytest.fixture(scope="module")
def cluster():
    import ray

    # Two CPUs: 2 workers x 0.75 CPU, leaving 0.5 to Ray Data's read tasks.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class HistoryAtEachReport(TrainContextCallback):
    """In rank 0, as each ``ray.train.report`` starts: how many epochs ``history.json`` holds (one line
    per report in ``out``). A scheduler that stops a trial on a report ends its workers while report()
    returns, so the epoch being reported must be in the file by then."""

    def __init__(self, run_dir: str, out: str):
        self.run_dir, self.out = run_dir, out

    @contextlib.contextmanager
    def on_report(self):
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            with open(self.out, "a") as f:
                f.write(f"{len(read_history(self.run_dir))}\n")
        yield


@pytest.fixture(scope="module")
def clean_run(data, cluster):
    """An uninterrupted 2-worker run; the reference for the fault test."""
    storage = data / "runs"
    start = time.monotonic()
    plan = plan_run(tiny_config(data / "shards"), options(storage, "clean", trace_data=True), log=print)
    plan.callbacks.append(HistoryAtEachReport(str(storage / "clean"), str(data / "history_at_report.txt")))
    summary = launch(plan, log=print)
    return summary, storage / "clean", time.monotonic() - start


def final_weights(summary) -> dict[str, torch.Tensor]:
    return read_checkpoint(summary["state_file"])["model"]


# -- errors before any worker starts ----------------------------------------------------------------
def test_errors_before_any_worker_starts(data, tmp_path, capsys):
    shards = data / "shards"
    common = ["--workers", "2", "--storage", str(tmp_path / "runs"), "--name", "e"]
    cases = [
        (["--preset", "no_such_preset", "--data", str(shards)], "no_such_preset"),
        (["--preset", PRESET, "--data", str(tmp_path / "nowhere")], "nowhere.*not found"),
    ]
    for argv, pattern in cases:
        assert sdetr_main(["train", *argv, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdetr: error:") and re.search(pattern, err), err

    # Parquet shards that lack a required column.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in shards.iterdir():
        if item.is_dir():
            (broken / item.name).mkdir()
            for f in item.iterdir():
                (broken / item.name / f.name).write_bytes(f.read_bytes())
        else:
            (broken / item.name).write_bytes(item.read_bytes())
    part = broken / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["boxes"]), part)
    with pytest.raises(DataError, match="lacks required column.*boxes"):
        run(tiny_config(broken), options(tmp_path / "runs", "b"))

    # More workers or GPUs than the cluster has (a local cluster: this machine's CPUs and GPUs).
    cpus = os.cpu_count() or 1
    with pytest.raises(ConfigError, match=f"--workers {cpus + 1}.*{cpus} CPUs"):
        run(tiny_config(shards), DistributedOptions(workers=cpus + 1, storage=str(tmp_path / "runs")))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--gpus-per-worker 1: 2 workers x 1 GPUs = 2 GPUs.*has 0"):
            run(tiny_config(shards), options(tmp_path / "runs", "g", gpus_per_worker=1))
    with pytest.raises(ConfigError, match="Ray Data"):
        run(tiny_config(shards), options(tmp_path / "runs", "c", cpus_per_worker=cpus / 2))
    # None of this started a run: no run folder was written.
    assert not (tmp_path / "runs").exists()


def test_only_a_lost_worker_actor_is_retried_by_the_driver():
    """A ``ControllerError`` around a dead worker actor is retried from the snapshot; nothing else is."""
    import ray.exceptions
    import ray.train

    from sdetr.platform.training.driver import lost_worker_at_start

    assert lost_worker_at_start(ray.train.ControllerError(ray.exceptions.ActorDiedError()))
    assert not lost_worker_at_start(ray.train.ControllerError(ValueError("a bug in a callback")))
    assert not lost_worker_at_start(ray.train.WorkerGroupError("rank 0 raised", {0: ValueError("x")}))
    assert not lost_worker_at_start(ray.exceptions.ActorDiedError())


def test_runs_have_no_placement_group_cleaner():
    """Ray Train's cleaner removes live runs' placement groups on a loaded machine (driver.Trainer)."""
    import ray.train

    from sdetr.platform.training.driver import PlacementGroupCleanerCallback, Trainer

    trainer = Trainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    kinds = [type(cb) for cb in trainer._create_default_callbacks()]
    assert kinds and PlacementGroupCleanerCallback not in kinds


def record_whether_print_is_pythons_own(config):
    import builtins
    import types

    Path(config["out"]).write_text(str(isinstance(builtins.print, types.BuiltinFunctionType)))


def test_workers_keep_pythons_print(data, cluster, tmp_path):
    """Ray Train replaces ``print`` in its workers (every line reached the terminal twice, and
    ``redirect_stdout`` no longer silenced pycocotools); sdetr's workers keep Python's own."""
    import ray.train

    from sdetr.platform.training.driver import WORKER_RUNTIME_ENV, Trainer, build_trainer

    seen = {}
    for name, runtime_env in (("ray_default", None), ("sdetr", WORKER_RUNTIME_ENV)):
        trainer = Trainer(
            record_whether_print_is_pythons_own,
            train_loop_config={"out": str(tmp_path / f"{name}.print")},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(tmp_path), worker_runtime_env=runtime_env
            ),
        )
        trainer.fit()
        seen[name] = (tmp_path / f"{name}.print").read_text()
    assert seen == {"ray_default": "False", "sdetr": "True"}
    # ... and every run of sdetr's uses it.
    plan = plan_run(tiny_config(data / "shards"), options(tmp_path / "runs", "plan"), log=lambda *a: None)
    assert build_trainer(plan, None).run_config.worker_runtime_env == WORKER_RUNTIME_ENV


def log_excerpt(text: str, size: int = 3000) -> str:
    """The first traceback of a failed run's log (the cause) and its end (the outcome)."""
    first = text.find("Traceback")
    head = text[first : first + size] if first >= 0 else ""
    return f"{head}\n[...]\n{text[-size:]}"


def test_cpu_budget_and_coco_input(data, tmp_path):
    # Workers never take the CPUs Ray Data's read tasks need (0.5), and at most one CPU each.
    assert cpus_per_worker(2, None, 2.0) == 0.75
    assert cpus_per_worker(2, None, 16.0) == 1.0
    assert cpus_per_worker(1, None, 1.0) == 0.5
    assert cpus_per_worker(4, 0.25, 2.0) == 0.25
    # A COCO-layout --data is sharded once into the run folder, and reused by the next attempt.
    storage = RunStorage(str(tmp_path / "runs"), "coco")
    logs: list[str] = []
    shards = prepare_data(str(data / "coco"), storage, logs.append)
    assert shards == str(tmp_path / "runs" / "coco" / "shards") and "sharding" in logs[0]
    manifest = check_shards(shards, ["train", "val"])
    assert manifest["splits"]["train"]["num_images"] == 16
    assert prepare_data(str(data / "coco"), storage, logs.append) == shards
    assert prepare_data(shards, storage, logs.append) == shards  # a shard folder is used as it is
    with pytest.raises(DataError, match="neither a shard folder"):
        prepare_data(str(tmp_path), storage)


# -- learning, sharding, tracking --------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_learn_on_disjoint_shards(clean_run):
    summary, run_dir, seconds = clean_run
    print(f"uninterrupted run: {seconds:.0f}s")
    state = read_checkpoint(summary["state_file"])
    history = state["history"]
    assert [int(r["epoch"]) for r in history] == list(range(EPOCHS))
    # Every epoch was in history.json before its report (one report per epoch: no mid-epoch checkpoints).
    at_report = (run_dir.parent.parent / "history_at_report.txt").read_text().split()
    assert at_report == [str(n) for n in range(1, EPOCHS + 1)], at_report
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < losses[0], losses
    assert {"AP", "AP50", "APs"} <= set(history[-1]) and "AP" not in history[0]
    assert state["position"] == {
        "epoch": EPOCHS - 1,
        "batches_done": STEPS_PER_EPOCH,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "global_step": EPOCHS * STEPS_PER_EPOCH,
    }
    # Sparse DETR's scaling: lr x sqrt(global batch 4 / 16).
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)

    # Each epoch the two workers' shards are disjoint and together cover the 16 training images.
    train_ids = {int(i) for i in pq.read_table(Path(summary["data"]) / "train", columns=["image_id"])[0]}
    seen = {}
    for rank in (0, 1):
        for line in (run_dir / "workers" / f"rank{rank}.data.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault((rec["epoch"], rank), []).extend(rec["image_ids"])
    for epoch in range(EPOCHS):
        a, b = seen[(epoch, 0)], seen[(epoch, 1)]
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert set(a) | set(b) == train_ids

    # Checkpoints: the last two kept, named by epoch and step.
    kept = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_epoch"))
    assert kept == ["checkpoint_epoch0000_step000004", "checkpoint_epoch0001_step000004"]

    # MLflow (SQLite in the storage folder): params, per-step losses and lr, per-epoch AP.
    client = tracking.client(summary["mlflow"]["tracking_uri"])
    assert summary["mlflow"]["tracking_uri"] == tracking.sqlite_uri(run_dir.parent / "mlflow.db")
    mrun = client.get_run(summary["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.params["model.rho"] == "0.1"
    assert mrun.data.tags["sdetr.checkpoint"].endswith("checkpoint_epoch0001_step000004")
    steps = [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert len(client.get_metric_history(mrun.info.run_id, "train/lr")) == EPOCHS * STEPS_PER_EPOCH
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "val/AP")] == [EPOCHS - 1]


# -- a worker killed mid-epoch -------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_weights(data, clean_run):
    run_dir = data / "runs" / "killed"
    result: dict = {}

    def target():
        try:
            # A checkpoint every 2 steps: the kill lands mid-epoch, past epoch 1's step-2 checkpoint.
            result["summary"] = run(
                tiny_config(data / "shards"), options(data / "runs", "killed", every=2), log=print
            )
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    # Kill rank 1 from outside (SIGKILL) as soon as epoch 1's mid-epoch checkpoint is registered:
    # the restarted workers must resume in the middle of an epoch.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    mid_epoch = f"checkpoint_epoch0001_step{STEPS_PER_EPOCH // 2:06d}"
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        try:
            registered = mid_epoch in snapshot.read_text()
            pid = int((run_dir / "workers" / "rank1.pid").read_text())
        except (OSError, ValueError):
            registered = False
        if registered:
            os.kill(pid, signal.SIGKILL)
            killed = json.loads((run_dir / "workers" / "rank1.json").read_text())
        time.sleep(0.05)
    thread.join(timeout=900)
    assert killed is not None, "the run ended before rank 1 could be killed"
    assert "error" not in result, result.get("error")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    print(f"killed rank 1 at {killed}; resumed from {resumes}")
    assert [(e["epoch"], e["batches_done"]) for e in resumes] == [(1, STEPS_PER_EPOCH // 2)], events
    torch.testing.assert_close(final_weights(result["summary"]), final_weights(clean_run[0]))


# -- the driver killed; the same command run again -----------------------------------------------------
@pytest.mark.slow
def test_driver_death_then_rerun_continues_the_run(data, cluster, tmp_path):
    storage = tmp_path / "runs"
    argv = sdetr_train_argv(data / "shards", storage, "drv", EPOCHS, cluster, every=2)
    cmd = [sys.executable, "-m", "sdetr.platform.cli", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "first.log"  # a file, not a pipe: nobody reads a pipe while we wait
    with open(log, "w") as f:
        first = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    run_dir = storage / "drv"
    first_epoch = f"checkpoint_epoch0000_step{STEPS_PER_EPOCH:06d}"
    deadline = time.monotonic() + 600  # generous: a loaded CI machine starts Ray Train slowly

    def registered() -> bool:  # the first epoch's checkpoint, once Ray's run snapshot names it
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        return snapshot.is_file() and first_epoch in snapshot.read_text()

    while time.monotonic() < deadline and first.poll() is None and not registered():
        time.sleep(0.2)
    assert first.poll() is None, log_excerpt(log.read_text())
    assert registered(), f"no checkpoint registered in 600 s\n{log_excerpt(log.read_text())}"
    old_workers = [int((run_dir / "workers" / f"rank{r}.pid").read_text()) for r in (0, 1)]
    first.send_signal(signal.SIGKILL)
    first.wait()
    # Ray ends a dead driver's job, workers included: nothing keeps training behind our back.
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in old_workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in old_workers)

    # The newest checkpoint is torn as well: it is skipped for the one before (step 2 of epoch 0), so
    # epoch 0's last steps, and its epoch metrics, which MLflow already has, come round again.
    newest = run_dir / first_epoch / "state.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, log_excerpt(out)
    assert "resuming run" in out and "skipping unreadable checkpoint" in out
    assert "Reporting training result" not in out and "Started training worker group" not in out
    assert re.search(r"epoch 1 \| loss", out), out[-3000:]  # outside a sweep, the worker's epoch line
    assert re.search("resuming from .*checkpoint_epoch0000_step000002: epoch 1, batch 2", out), out[-3000:]
    # The retrained epoch's checkpoint did not reuse the torn one's registered folder.
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert f"{first_epoch}-1" in [e.get("name") for e in events if e["event"] == "checkpoint"]

    record = json.loads((run_dir / "sdetr_run.json").read_text())
    client = tracking.client(record["mlflow"]["tracking_uri"])
    runs = client.search_runs([record["mlflow"]["experiment_id"]])
    assert [r.info.run_name for r in runs] == ["drv"] and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    for key in ("epoch", "epoch/train_loss", "epoch/train_loss_ce"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(EPOCHS)), key
    assert [m.step for m in client.get_metric_history(run_id, "val/AP")] == [EPOCHS - 1]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
