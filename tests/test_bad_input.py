"""Every bad input of issue #13 (and the ones that already worked) is one clear line: the exit code, the
file, item or key named, no traceback. Run through the real command line (`sdetr.platform.cli.main`,
in this process: an exception that is not a user error would fail the test with its traceback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.platform.cli.main import main
from sdetr.platform.layout import SWEEP_RECORD, TRIAL_RECORD, TRIALS_DIR, write_json
from sdetr.platform.sweeps.results import status_table
from sdetr.platform.uris import redact

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "tiny_sparse_detr_rho_0.1",
    *("--set", "optim.batch_size=2", "--set", "data.train_scales=[128]", "--set", "data.random_crop=false"),
    *("--set", "data.val_scale=128", "--set", "data.num_workers=0", "--set", "train.progress=false"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    generate_synthetic_coco(root / "set", n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    return root / "set"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def copy_set(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_annotations(root: Path, split: str, fn) -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return path


def empty_split(d):
    return {**d, "images": [], "annotations": []}


def duplicate_image(d):
    return {**d, "images": d["images"] + [dict(d["images"][0])]}


# -- one line, exit 2: the case, what it must name ----------------------------------------------------
CASES = {
    "unknown storage scheme (train)": (["--workers", "1", "--storage", "foo://bar"], "foo://bar"),
    "misspelt tracking URI": (["--workers", "1", "--mlflow-uri", "foo://bar"], "foo://bar"),
    "zero workers": (["--workers", "0"], "--workers 0"),
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "negative epochs": (["--epochs", "-1"], "--epochs"),
    "zero batch size": (["--set", "optim.batch_size=0"], "optim.batch_size"),
    "zero epochs (Ray)": (["--workers", "1", "--epochs", "0"], "--epochs"),
    "unknown config key (worked)": (["--set", "optim.nope=1"], "optim.nope"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_refuses_with_one_line(case, data, tmp_path, capsys):
    extra, named = CASES[case]
    code, err = run(capsys, "train", *TINY, "--data", data, "--output", tmp_path / "run", *extra)
    assert code == 2, err
    assert err.startswith("sdetr: error: ") and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (Path.cwd() / "foo:").exists()


def test_unreachable_tracking_server_fails_in_seconds_naming_it(data, tmp_path):
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "sdetr.platform.cli", "train", *TINY, "--data", str(data), "--workers", "1"]
        + ["--storage", str(tmp_path), "--mlflow-uri", "http://user:s3cret@127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    took = time.monotonic() - start
    assert res.returncode == 2, res.stderr
    assert "http://user:***@127.0.0.1:9" in res.stderr and "cannot be reached" in res.stderr
    assert "s3cret" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert took < 60, took  # import time included; the probe itself gives up after 5 s
    assert not list(tmp_path.rglob("*.json"))  # nothing started


def test_sweep_storage_uri_is_never_a_local_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["sweep", "run", REPO / "sweeps" / "demo.yaml", "--storage", "foo://bar", "--name", "foo1"],
        ["sweep", "status", "demo", "--storage", "foo://bar"],
        ["sweep", "resume", "demo", "--storage", "foo://bar"],
        ["pareto", "demo", "--storage", "foo://bar"],
        ["eval", "--checkpoint", "foo://bar/runs/r1", "--rho", "0.1"],
    ):
        code, err = run(capsys, *argv)
        assert code == 2 and "storage foo://bar" in err and "unknown scheme 'foo'" in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_data_problems_name_the_file_or_id(data, tmp_path, capsys):
    out = tmp_path / "run"
    empty = copy_set(data, tmp_path / "empty")
    ann = edit_annotations(empty, "train", empty_split)
    code, err = run(capsys, "train", *TINY, "--data", empty, "--output", out)
    assert code == 2 and str(ann) in err and "no images" in err, err
    code, err = run(capsys, "data", "shard", "--coco", empty, "--out", tmp_path / "shards", "--no-progress")
    assert code == 2 and str(ann) in err and "lists no images" in err, err

    dup = copy_set(data, tmp_path / "dup")
    edit_annotations(dup, "train", duplicate_image)
    first = json.loads((data / "annotations" / "instances_train2017.json").read_text())["images"][0]["id"]
    code, err = run(capsys, "train", *TINY, "--data", dup, "--output", out)
    assert code == 2 and f"duplicate image id {first}" in err, err

    broken = copy_set(data, tmp_path / "broken")
    images = sorted((broken / "train2017").iterdir())
    images[0].unlink()
    images[1].write_bytes(b"not a jpeg")
    code, err = run(capsys, "train", *TINY, "--data", broken, "--output", out)
    assert code == 2 and "2 of the 4 train images" in err, err
    assert f"{images[0]} (missing)" in err and f"{images[1]} (cannot decode" in err
    assert not out.exists()  # refused before anything was written


def test_checkpoints_corrupt_newest_only_and_interrupted_writes(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", *TINY, "--data", data, "--output", out, "--epochs", "2"]
    assert run(capsys, *base)[0] == 0
    ckpts = out / "checkpoints"
    newest = ckpts / "checkpoint_epoch0001.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    tmp = ckpts / ".checkpoint_epoch0002.pth.abc123.tmp"  # as a run killed mid-save leaves it
    tmp.write_bytes(b"\0" * 1000)
    code, _ = run(capsys, *base)
    assert code == 0 and not tmp.exists()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # epoch 1 trained again, logged once

    for f in ckpts.iterdir():
        f.write_bytes(b"garbage")
    code, err = run(capsys, *base)
    assert code == 2 and str(ckpts) in err and "--restart" in err, err
    code, _ = run(capsys, *base, "--restart")
    assert code == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_secrets_are_masked_and_plain_http_tokens_refused(tmp_path, capsys, monkeypatch):
    assert redact("http://user:PASS@host:5000") == "http://user:***@host:5000"
    assert redact("postgresql://me:pw@db:5432/mlflow?sslpassword=x") == (
        "postgresql://me:***@db:5432/mlflow?sslpassword=***"
    )
    assert redact("https://TOKEN@host/") == "https://***@host/"
    assert redact("sqlite:////a/b.db") == "sqlite:////a/b.db"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    sweep_file = "sweeps/demo.yaml"
    code, err = run(
        capsys, "sweep", "submit", sweep_file, "--address", "http://10.1.2.3:8265", "--storage", "/x"
    )
    assert code == 2 and "plain http" in err and "10.1.2.3" in err, err
    code, err = run(
        capsys,
        *("sweep", "submit", sweep_file, "--address", "https://10.1.2.3:8265", "--storage", "/x"),
        *("--mlflow-uri", "http://u:Pw9x@h:5000"),
    )
    assert code == 2 and "Pw9x" not in err and "u:***@h" in err, err


def test_status_tells_a_dead_driver_from_a_running_one(tmp_path):
    sweep = tmp_path / "runs" / "s"
    write_json(
        sweep / TRIALS_DIR / "t1" / TRIAL_RECORD,
        {"trial_id": "t1", "label": "ρ=0.1", "epochs": 2, "cost": {"gflops": 1.0}},
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    driver = {"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}
    write_json(sweep / SWEEP_RECORD, {"name": "s", "status": "running", "driver": driver})
    table = status_table(sweep)
    assert "sweep s: stopped" in table and f"pid {dead.pid}" in table and "interrupted" in table, table
    write_json(
        sweep / SWEEP_RECORD, {"name": "s", "status": "running", "driver": {**driver, "pid": os.getpid()}}
    )
    assert "sweep s: running, 0/1" in status_table(sweep)
    old = {**driver, "host": "elsewhere", "heartbeat": time.time() - 600}
    write_json(sweep / SWEEP_RECORD, {"name": "s", "status": "running", "driver": old})
    assert "no heartbeat from its driver on elsewhere" in status_table(sweep)
