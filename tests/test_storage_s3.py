"""The storage layer against a real S3-API server (moto_server on 127.0.0.1): files, errors, shards
written and read on s3://, and `sdetr sweep status` / `sdetr pareto` on a sweep that lives there."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import ConfigError
from sdetr.platform.cli.main import main
from sdetr.platform.layout import HISTORY_FILE, SWEEP_RECORD, TRIAL_RECORD, TRIALS_DIR
from sdetr.platform.shards.dataset import ShardDataset, check_shards, coco_ground_truth
from sdetr.platform.storage import Location, RunStorage

from .services import BUCKET, start_s3, stop


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    saved = dict(os.environ)
    proc, endpoint = start_s3(tmp_path_factory.mktemp("s3"), {})
    yield endpoint
    stop(proc)
    os.environ.clear()
    os.environ.update(saved)


def test_files_and_errors(s3):
    root = Location(f"s3://{BUCKET}/runs").check()
    run = root.child("r1")
    run.write_json("a/b.json", {"x": 1})
    run.write_text("c.txt", "hello")
    assert run.read_json("a/b.json") == {"x": 1} and run.read_text("c.txt") == "hello"
    assert run.read_text("missing") is None and run.read_json("missing", default=3) == 3
    assert root.list_dirs() == ["r1"] and run.list_files() == ["c.txt"] and run.list_dirs() == ["a"]
    storage = RunStorage(f"s3://{BUCKET}/runs", "r1")
    assert storage.local is None and storage.run_dir == f"s3://{BUCKET}/runs/r1"
    assert storage.artifact_location() == f"s3://{BUCKET}/runs/mlartifacts"
    with pytest.raises(ConfigError, match="bucket 'nope' does not exist"):
        Location("s3://nope/runs").check()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=f"storage s3://{BUCKET}/runs: cannot be reached"):
            Location(f"s3://{BUCKET}/runs").check()
        assert time.monotonic() - start < 30
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def test_shards_written_and_read_on_s3(s3, tmp_path, capsys):
    generate_synthetic_coco(tmp_path / "coco", n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    uri = f"s3://{BUCKET}/data/shards"
    assert main(["data", "shard", "--coco", str(tmp_path / "coco"), "--out", uri, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == uri
    manifest = check_shards(uri, ["train", "val"])
    assert manifest["splits"]["train"]["num_images"] == 4
    assert len(coco_ground_truth(uri, "val").imgs) == 2
    image, target = ShardDataset(uri, "val")[0]
    assert image.width >= 96 and int(target["image_id"]) in coco_ground_truth(uri, "val").imgs
    assert not list(Path.cwd().glob("s3:*"))  # never a local folder named after the URI


def test_status_and_pareto_of_a_sweep_on_s3(s3, capsys):
    sweep = Location(f"s3://{BUCKET}/runs").child("demo")
    for i, (rho, ap, gflops) in enumerate([(0.1, 0.2, 1.0), (0.3, 0.25, 1.5), (0.5, 0.22, 2.0)]):
        trial = f"trial_{i}"
        sweep.write_json(
            f"{TRIALS_DIR}/{trial}/{TRIAL_RECORD}",
            {
                "trial_id": trial,
                "label": f"ρ={rho}",
                "preset": "tiny_sparse_detr_rho_0.1",
                "backbone": "resnet18",
                "rho": rho,
                "epochs": 2,
                "cost": {"gflops": gflops, "params": 1e6, "cost_input": "3x128x160"},
                "params": {"model.rho": rho},
            },
        )
        history = [{"epoch": 0, "AP": ap / 2}, {"epoch": 1, "AP": ap, "AP50": 2 * ap}]
        sweep.write_json(f"{TRIALS_DIR}/{trial}/{HISTORY_FILE}", {"epochs": 2, "history": history})
    driver = {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}
    sweep.write_json(SWEEP_RECORD, {"name": "demo", "status": "running", "driver": driver, "mlflow": None})

    assert main(["sweep", "status", "demo", "--storage", f"s3://{BUCKET}/runs"]) == 0
    out = capsys.readouterr().out
    assert "sweep demo: stopped" in out and "3/3 trials completed" in out and "trial_1" in out, out
    assert main(["pareto", "demo", "--storage", f"s3://{BUCKET}/runs", "--no-mlflow"]) == 0
    assert sweep.list_files("pareto") == ["pareto.csv", "pareto.html", "pareto.png"]
    csv = sweep.read_text("pareto/pareto.csv")
    assert "trial_1" in csv and "trial_2" in csv
