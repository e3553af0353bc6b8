"""The `sdetr` command line, run as a user would (a real subprocess from the repo root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sdetr(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "sdetr.platform.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    path = Path(out.stdout.strip())
    assert path.name == "platform.py" and REPO not in path.parents
    assert not (REPO / "platform" / "__init__.py").exists()


def test_model_info_json():
    res = sdetr("model", "info", "tiny_sparse_detr_rho_0.1", "--set", "rho=0.2", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["preset"] == "tiny_sparse_detr_rho_0.1"
    assert info["num_params_total"] >= info["num_params_trainable"] > 1_000_000
    assert info["state_dict"]["transformer.level_embed"] == [4, 64]
    assert "transformer.enc_mask_predictor.layer2.4.weight" in info["state_dict"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["model", "info", "r50_sparse_detr"], "unknown preset 'r50_sparse_detr'"),
        (["model", "info", "tiny_deformable_detr", "--set", "model.depth=3"], "unknown config key"),
        (["train", "--preset", "tiny_deformable_detr", "--data", "/nonexistent/coco"], "/nonexistent/coco"),
    ],
)
def test_user_mistakes_give_one_clear_line(args, message):
    res = sdetr(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.startswith("sdetr: error: ")


def test_errors_raised_in_dataloader_workers_lose_the_traceback(tmp_path):
    import torch.utils.data

    from sdetr.detector.errors import DataError
    from sdetr.platform.cli.main import user_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise DataError("train2017/000000000007.jpg (image id 7): cannot read image")

    with pytest.raises(DataError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(info.value)
    assert user_message(info.value) == "train2017/000000000007.jpg (image id 7): cannot read image"
