"""Run folders and checkpoints written before the layout change (#11) still work.

The code of the last release before the move (commit `LEGACY_COMMIT`) is taken from git history, trains
one epoch into a run folder, and today's code then resumes that run, reads its checkpoint with
``sdetr eval`` and its records with the shared readers. Skipped only where the clone has no history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.platform.cli import main as sdetr
from sdetr.platform.layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, read_jsonl

LEGACY_COMMIT = "21a46f8"  # main before the platform/ and detector/ folders were laid out by role
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "optim.batch_size=2",
    "optim.lr_drop=100",
    "data.train_scales=[128]",
    "data.random_crop=false",
    "data.val_scale=128",
    "data.num_workers=0",
    "train.progress=false",
]


def legacy_tree(dest: Path) -> Path:
    """A package root where ``import sdetr`` finds the legacy code (a plain folder put first on the path
    wins over the editable install's finder, which Python consults after the path)."""
    has = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{LEGACY_COMMIT}^{{commit}}"])
    if has.returncode != 0:
        pytest.skip(f"commit {LEGACY_COMMIT} is not in this clone's history")
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", LEGACY_COMMIT], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    pkg = dest / "pkg" / "sdetr"
    pkg.mkdir(parents=True)
    for name in ("detector", "platform", "csrc"):
        (pkg / name).symlink_to(src / name)
    return dest / "pkg"


@pytest.mark.slow
def test_legacy_run_folder_resumes_and_evaluates(tmp_path):
    data = tmp_path / "data"
    generate_synthetic_coco(data, n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    root = legacy_tree(tmp_path / "legacy")
    run = tmp_path / "runs" / "old"
    argv = ["train", "--preset", "tiny_sparse_detr_rho_0.1", "--data", str(data), "--output", str(run)]
    sets = [a for item in TINY for a in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(root), "SDETR_MSDA_BACKEND": "pytorch"}
    old = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sdetr.platform.cli as c, sys; print(c.__file__); sys.exit(c.main(sys.argv[1:]))",
        ]
        + argv
        + ["--epochs", "1", *sets],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert old.returncode == 0, old.stderr[-2000:]
    assert old.stdout.splitlines()[0] == str(root / "sdetr" / "platform" / "cli.py")  # the legacy code ran
    assert (run / CONFIG_FILE).is_file()
    assert len(read_jsonl(run / METRICS_FILE)) == 1
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == ["checkpoint_epoch0000.pth"]

    # Today's code: the same command with two epochs continues the legacy run (same config) ...
    assert sdetr([*argv, "--epochs", "2", *sets]) == 0
    epochs = [r["epoch"] for r in read_jsonl(run / METRICS_FILE)]
    assert epochs == [0, 1]
    # ... and `sdetr eval` reads the run folder's newest checkpoint (written by today's code) as well as
    # the legacy one.
    for checkpoint in (run, run / CHECKPOINTS_DIR / "checkpoint_epoch0000.pth"):
        out = tmp_path / f"rho_{checkpoint.name}.json"
        code = sdetr(
            ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--rho", "0.1,0.5"]
            + ["--flops-images", "1", "--flops-input", "none", "--no-mlflow", "--out", str(out)]
        )
        assert code == 0
        record = json.loads(out.read_text())
        assert [p["rho"] for p in record["points"]] == [0.1, 0.5]
