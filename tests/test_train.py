"""Single-process training on a small synthetic set: the loss falls, runs resume, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import ConfigError, DataError
from sdetr.detector.presets import get_preset
from sdetr.platform.training.local import train


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root / "set", n_train=4, n_val=2, seed=1, min_size=96, max_size=128)
    return root / "set"


def small_config(data, out, epochs=2, **extra):
    overrides = [
        f"data.root={data}",
        f"train.output_dir={out}",
        f"optim.epochs={epochs}",
        "optim.batch_size=2",
        "optim.lr=1e-3",
        "optim.lr_backbone=1e-3",
        "optim.lr_drop=100",
        "data.train_scales=[128]",
        "data.random_crop=false",
        "data.val_scale=128",
        "data.num_workers=0",
        "train.progress=false",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return get_preset("tiny_sparse_detr_rho_0.1", overrides)


def test_short_training_lowers_the_loss(small_synth, tmp_path):
    cfg = small_config(small_synth, tmp_path / "run", epochs=12)
    logged: list[str] = []
    history = train(cfg, log=lambda *a: logged.append(" ".join(map(str, a))))
    losses = [r["train_loss"] for r in history]
    assert len(losses) == 12
    # Overfitting four images: the mean of the last three epochs is well under the first three's.
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3]), losses
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(history[-1])
    # The epoch's line: counted from 1, AP in percent.
    last = history[-1]
    assert f"epoch 12 | loss {last['train_loss']:.4f} | AP {100 * last['AP']:.1f} % | " in "\n".join(logged)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(12))
    assert (tmp_path / "run" / "config.yaml").is_file()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["checkpoint_epoch0010.pth", "checkpoint_epoch0011.pth"]
    # train.channels_last (the default) trained the convolutions in NHWC order.
    state = torch.load(tmp_path / "run" / "checkpoints" / kept[-1], weights_only=True)["model"]
    convs = [v for k, v in state.items() if v.dim() == 4]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)


def test_channels_last_gives_the_same_outputs():
    """train.channels_last changes only the memory order: the same outputs, up to rounding."""
    from sdetr.detector.build import build_model
    from tests.test_model import padded_batch

    model = build_model(get_preset("tiny_sparse_detr_rho_0.1").model).eval()
    images, masks = padded_batch([(96, 128), (80, 112)], seed=1)
    with torch.no_grad():
        plain = model(images, masks)
        model = model.to(memory_format=torch.channels_last)
        nhwc = model(images, masks)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(nhwc[key], plain[key], atol=1e-4, rtol=1e-4)


def test_rerun_resumes_skips_corrupt_and_refuses_other_configs(small_synth, tmp_path):
    out = tmp_path / "run"
    logs: list[str] = []
    train(small_config(small_synth, out, epochs=2), log=logs.append)
    # Same command again: finished, nothing to do.
    history = train(small_config(small_synth, out, epochs=2), log=logs.append)
    assert len(history) == 2 and "already finished" in logs[-1]
    # More epochs: continues from the latest valid checkpoint; a torn newest file is skipped.
    ckpts = out / "checkpoints"
    newest = ckpts / "checkpoint_epoch0001.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    history = train(small_config(small_synth, out, epochs=3), log=logs.append)
    assert any("resuming from checkpoint_epoch0000.pth" in line for line in logs)
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]
    with pytest.raises(ConfigError, match="different config.*model.rho"):
        train(small_config(small_synth, out, epochs=3, **{"model.rho": 0.3}), log=logs.append)


def test_missing_data_and_too_few_classes_are_clear_errors(small_synth, tmp_path):
    with pytest.raises(DataError, match="nowhere.*not found"):
        train(small_config(tmp_path / "nowhere", tmp_path / "a"))
    with pytest.raises(ConfigError, match="num_classes=6"):
        train(small_config(small_synth, tmp_path / "b", **{"model.num_classes": 3}))
