"""Real sweeps on a local Ray, started as a user starts them (`sdetr sweep run`), and the helpers the other
sweep tests share. The one kill-and-resume sweep of the suite is on object storage, into an `mlflow
server` (tests/test_tracking_server.py); here MOASHA runs real trials of three detector families.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
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


def test_moasha_over_detector_families_puts_them_on_one_plot(shards, tmp_path):
    """sweeps/encoders_tiny.yaml under MOASHA, on three of its six detectors: one per code path a trial
    can take (Sparse DETR's scoring network and DAM loss, Lite DETR's interleaved encoder, Faster R-CNN's
    torchvision heads and losses); all six load in test_sweep_spec.py and train in single-process tests.
    Two epochs, one MOASHA rung at epoch 1 keeping ceil(n/3) of the n trials that reached it: the first
    trial at the rung always continues, a later one only if it ranks first. Which trials stop depends on
    arrival order; what must hold is the bookkeeping around it, and every family on the front's plot.
    One sweep for both (each real trial costs about a minute of CPU, mostly its Ray processes' start-up)."""
    import yaml

    from sdetr.platform.sweeps.moasha import read_record

    shipped = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "sweeps" / "encoders_tiny.yaml").read_text()
    )
    presets = ["tiny_sparse_detr_rho_0.1", "tiny_lite_detr_h3l1_3p1x2", "tiny_faster_rcnn_fpn"]
    assert set(presets) < set(shipped["space"]["preset"])
    shipped["space"]["preset"] = presets
    shipped.update(
        data=str(shards),
        epochs=2,
        cost={"input": [128, 160], "fps": False},
        scheduler={"type": "moasha", "grace_period": 1, "reduction_factor": 3},
    )
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
    # Ray's bookkeeping stays in its log files: no report records, worker-group set-up or dataset lines.
    for noise in ("Reporting training result", "Started training worker group", "execution finished"):
        assert noise not in done.stdout + done.stderr, noise
    # Each trial epoch once: the sweep's own line, not also the Train worker's.
    assert " epoch 1/2 " in done.stdout and not re.search(r"epoch \d+ \| loss", done.stdout + done.stderr)
    sweep_dir = storage / "encoders_tiny"
    rows = {r["trial_id"]: r for r in csv.DictReader((sweep_dir / "pareto" / "pareto.csv").open())}
    # Every family on the plot, with its own cost and an AP, stopped early or not.
    assert sorted(r["preset"] for r in rows.values()) == sorted(presets)
    assert all(r["AP"] != "" and float(r["gflops"]) > 0 for r in rows.values())
    assert len({r["gflops"] for r in rows.values()}) == 3  # each trial counted its own model
    assert any(r["on_front"] == "1" for r in rows.values())
    # MOASHA's bookkeeping.
    epochs = epochs_done(sweep_dir)
    record = read_record(sweep_dir / "moasha.json")
    assert len(epochs) == 3 and set(epochs.values()) <= {1, 2} and 2 in epochs.values(), epochs
    # Every trial with one epoch was stopped at the rung. A stopped trial can also have finished its
    # second (last) epoch before Ray ended it (the epochs here take seconds): it then counts as completed.
    assert set(record["stopped_at"].values()) <= {1}
    assert {t for t, n in epochs.items() if n == 1} <= set(record["stopped_at"])
    for trial, n in epochs.items():
        assert rows[trial]["status"] == ("completed" if n == 2 else "stopped_early")
        # (the column exists only when some trial was stopped)
        assert rows[trial].get("stopped_at_epoch", "") == ("" if n == 2 else "1")
        if n == 1:
            assert rows[trial]["on_front"] == "0"
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["scheduler"] == "moasha"
