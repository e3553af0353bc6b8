"""Pictures of the method (boxes; Sparse DETR's token scores, kept tokens and DAM target) and ``sdetr
predict`` on synthetic images: sizes, files, COCO-format detections, and bad input named."""

from __future__ import annotations

import json

import PIL.Image
import pytest
import torch

from sdetr.detector.build import build_model
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.evaluation.visualize import TITLE_HEIGHT, sparse_maps
from sdetr.detector.presets import get_preset
from sdetr.platform.cli.main import main
from sdetr.platform.training.pictures import draw


def _model(preset: str):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.model.num_queries = 20
    return cfg, build_model(cfg.model).eval()


@pytest.mark.parametrize(("preset", "panels"), [("mini_sparse_detr_rho_0.1", 4), ("mini_deformable_detr", 1)])
def test_picture_has_one_panel_per_view_at_the_input_size(preset, panels):
    _, model = _model(preset)
    image = torch.randn(3, 96, 136)
    pic, dets = draw(model, image, threshold=0.0)
    # Boxes, then for Sparse DETR: scores, kept tokens, DAM target; each as large as the model's input.
    assert pic.size == (panels * 136, 96 + TITLE_HEIGHT)
    assert dets["boxes"].shape[-1] == 4 and len(dets["scores"]) == len(dets["labels"]) > 0
    assert (dets["boxes"][:, 2:] <= torch.tensor([136.0, 96.0]) + 1e-3).all()


def test_sparse_maps_keep_rho_of_the_tokens_and_the_dam_target_as_many():
    _, model = _model("mini_sparse_detr_rho_0.1")
    h, w = 96, 128
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool))
    maps = sparse_maps(out, 0)
    tokens = int(out["spatial_shapes"].prod(1).sum())
    keep = int(tokens * 0.1) + 1  # the official count: int(valid * rho) + 1
    assert maps["kept"].shape == maps["target"].shape == maps["scores"].shape == (tokens,)
    assert int(maps["kept"].sum()) == int(maps["target"].sum()) == keep
    assert float(maps["scores"].min()) >= 0.0 and float(maps["scores"].max()) <= 1.0
    # The kept tokens are the highest-scoring ones.
    assert maps["scores"][maps["kept"] > 0].min() >= maps["scores"][maps["kept"] == 0].max()


@pytest.fixture(scope="module")
def synth_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, n_train=1, n_val=3, min_size=96, max_size=160)
    return root / "val2017"


def _checkpoint(tmp_path, preset: str):
    cfg, model = _model(preset)
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def test_predict_writes_pictures_and_coco_detections_and_names_bad_input(tmp_path, synth_images, capsys):
    ckpt = _checkpoint(tmp_path, "mini_sparse_detr_rho_0.1")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(ckpt), str(synth_images), str(bad), str(tmp_path / "missing.png")]
    rc = main([*args, "--rho", "0.3", "--threshold", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2  # some input was bad...
    assert f"{bad}: cannot read the image" in err and "missing.png: no such file or folder" in err
    names = sorted(p.name for p in synth_images.glob("*.jpg"))
    assert len(names) == 3  # ...and every good image was still processed
    cfg = get_preset("mini_sparse_detr_rho_0.1").data
    for name in names:
        with (
            PIL.Image.open(synth_images / name) as src,
            PIL.Image.open(out / name.replace(".jpg", ".png")) as pic,
        ):
            w, h = src.size
            scale = min(cfg.val_scale / min(w, h), cfg.val_max_size / max(w, h))
            assert (
                pic.size[1] == round(h * scale) + TITLE_HEIGHT
                or abs(pic.size[1] - h * scale - TITLE_HEIGHT) <= 1
            )
            assert abs(pic.size[0] - 4 * w * scale) <= 4
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["file_name"] for d in dets} <= set(names)
    for d in dets:
        assert set(d) == {"image_id", "file_name", "category_id", "bbox", "score"} and len(d["bbox"]) == 4
        with PIL.Image.open(synth_images / d["file_name"]) as src:
            assert (
                d["bbox"][0] + d["bbox"][2] <= src.size[0] + 1
                and d["bbox"][1] + d["bbox"][3] <= src.size[1] + 1
            )


def test_predict_refuses_bad_rho_and_missing_checkpoint(tmp_path, synth_images, capsys):
    ckpt = _checkpoint(tmp_path, "mini_deformable_detr")
    assert main(["predict", "--checkpoint", str(ckpt), str(synth_images), "--rho", "1.5"]) == 2
    assert "--rho 1.5: outside (0, 1]" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pth"), str(synth_images)]) == 2
    assert "none.pth: checkpoint not found" in capsys.readouterr().err
    # A dense model has no keeping ratio to change.
    out = str(tmp_path / "o")
    assert main(["predict", "--checkpoint", str(ckpt), str(synth_images), "--rho", "0.2", "--out", out]) == 2
    assert "rho" in capsys.readouterr().err
