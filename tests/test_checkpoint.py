"""Official checkpoints (a ``model`` state_dict plus the argparse ``args``) load strictly."""

from __future__ import annotations

import argparse

import pytest
import torch

from sdetr.detector.build import build_model
from sdetr.detector.checkpoint import load_model_weights, model_config_from_official_args, save_atomic
from sdetr.detector.errors import CheckpointError
from sdetr.detector.presets import get_preset
from tests.test_model import padded_batch


def official_like_checkpoint(model, path, **args):
    """Mimic what the official main.py saves: model/optimizer/lr_scheduler/epoch/args."""
    namespace = argparse.Namespace(backbone="resnet50", dataset_file="coco", **args)
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 49, "args": namespace},
        path,
    )


def test_official_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path):
    cfg = get_preset("tiny_sparse_detr_rho_0.1").model
    torch.manual_seed(1)
    source = build_model(cfg).eval()
    path = tmp_path / "checkpoint.pth"
    official_like_checkpoint(source, path, rho=0.1, two_stage=True)
    torch.manual_seed(2)
    target = build_model(cfg).eval()
    obj = load_model_weights(target, path)
    assert obj["epoch"] == 49
    images, mask = padded_batch([(96, 128), (80, 64)])
    with torch.no_grad():
        a, b = source(images, mask), target(images, mask)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_wrong_preset_names_the_mismatch(tmp_path):
    path = tmp_path / "dense.pth"
    official_like_checkpoint(build_model(get_preset("tiny_deformable_detr").model), path)
    sparse = build_model(get_preset("tiny_sparse_detr_rho_0.1").model)
    with pytest.raises(CheckpointError, match=r"dense\.pth.*missing keys: .*enc_mask_predictor"):
        load_model_weights(sparse, path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_truncated_or_missing_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    model = build_model(get_preset("tiny_deformable_detr").model)
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_model_weights(model, path)


def test_truncated_real_checkpoint(tmp_path):
    model = build_model(get_preset("tiny_deformable_detr").model)
    path = tmp_path / "ckpt.pth"
    save_atomic({"model": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        load_model_weights(model, path)


def test_model_config_from_official_args():
    args = argparse.Namespace(
        backbone="swin-t",
        with_box_refine=True,
        two_stage=True,
        eff_query_init=True,
        eff_specific_head=True,
        rho=0.3,
        use_enc_aux_loss=True,
        num_queries=300,
        hidden_dim=256,
        dataset_file="coco",
        lr=2e-4,
    )
    cfg = model_config_from_official_args(args)
    assert cfg.backbone == "swin_t" and cfg.rho == 0.3 and cfg.use_enc_aux_loss and cfg.eff_query_init
    expected = get_preset("swint_sparse_detr_rho_0.3").model
    assert cfg == expected
