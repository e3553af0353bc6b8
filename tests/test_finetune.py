"""Fine-tuning a tiny Sparse DETR checkpoint on a 3-class set with category ids 7, 12, 40: the load report
key by key, training on the contiguous labels, COCO evaluation under the original ids; bad input refused."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader

from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.checkpoint import read_checkpoint, save_atomic
from sdetr.detector.data import build_dataset, collate_fn
from sdetr.detector.data.categories import CategoryMap, build_category_map, check_same_categories
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import CheckpointError, DataError
from sdetr.detector.evaluation.coco_eval import evaluate_detections, per_category_ap, results_to_detections
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.finetune import FOCAL_PRIOR_BIAS, load_for_finetuning
from sdetr.detector.presets import get_preset

PRESET = "tiny_sparse_detr_rho_0.1"
NEW_IDS = {1: (7, "disc"), 2: (12, "box"), 3: (40, "wedge")}  # synthetic id -> (new id, new name)
SMALL = [
    "optim.batch_size=2",
    "data.train_scales=[128]",
    "data.random_crop=false",
    "data.val_scale=128",
    "data.val_max_size=160",
    "data.train_max_size=160",
    "data.num_workers=0",
    "model.num_queries=20",
]


def train_steps(model, cfg, dataset, steps: int) -> list[float]:
    """A few AdamW steps in plain PyTorch; returns the losses."""
    criterion = build_criterion(cfg.model, cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=collate_fn)
    model.train()
    losses = []
    for _, (images, masks, targets) in zip(range(steps), loader):
        loss = criterion.weighted_total(criterion(model(images, masks), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def derive_three_class_set(src, dst) -> None:
    """Keep the synthetic classes 1..3 as ids 7, 12, 40 with new names; drop the others."""
    for split in ("train2017", "val2017"):
        (dst / "annotations").mkdir(parents=True, exist_ok=True)
        os.symlink(src / split, dst / split)
        data = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        data["categories"] = [{"id": i, "name": n, "supercategory": "shape"} for i, n in NEW_IDS.values()]
        data["annotations"] = [
            dict(a, category_id=NEW_IDS[a["category_id"]][0])
            for a in data["annotations"]
            if a["category_id"] in NEW_IDS
        ]
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Sparse DETR trained 2 steps on the 5-class synthetic set, saved as platform/train.py does."""
    root = tmp_path_factory.mktemp("ft")
    generate_synthetic_coco(root / "synth", n_train=4, n_val=4, seed=3, min_size=96, max_size=128)
    derive_three_class_set(root / "synth", root / "three")
    cfg = get_preset(PRESET, [f"data.root={root / 'synth'}", *SMALL])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train_steps(model, cfg, build_dataset("train", cfg.data), steps=2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = root / "run" / "checkpoints" / "checkpoint_epoch0000.pth"
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1).state_dict(),
            "epoch": 0,
            "config": cfg.to_dict(),
            "history": [],
            "rng": {"torch": torch.get_rng_state()},
        },
        ckpt,
    )
    return root, ckpt


def test_finetune_on_three_noncontiguous_classes(pretrained):
    root, ckpt = pretrained
    cfg = get_preset(PRESET, [f"data.root={root / 'three'}", *SMALL])
    train_set = build_dataset("train", cfg.data)
    val_set = build_dataset("val", cfg.data, category_map=train_set.category_map)
    cmap = train_set.category_map
    assert (cmap.mode, cmap.label_ids, cmap.names) == ("contiguous", (7, 12, 40), ("disc", "box", "wedge"))
    cfg.model.num_classes = cmap.num_classes  # follows the data set
    labels = torch.cat([train_set[i][1]["labels"] for i in range(len(train_set))])
    assert set(labels.tolist()) <= {0, 1, 2} and len(labels) > 0

    model = build_model(cfg.model)
    report = load_for_finetuning(model, ckpt)

    # The class-dependent keys, found independently: those whose shape changes with num_classes.
    state, saved = model.state_dict(), read_checkpoint(ckpt)["model"]
    other = build_model(get_preset(PRESET, [*SMALL, "model.num_classes=9"]).model).state_dict()
    by_shape = {k for k in state if other[k].shape != state[k].shape}
    heads = {f"class_embed.{i}.{p}" for i in range(4) for p in ("weight", "bias")}  # 2 dec, 2-stage, 1 enc
    heads |= {f"transformer.decoder.class_embed.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    heads |= {f"transformer.encoder.class_embed.0.{p}" for p in ("weight", "bias")}
    assert by_shape == heads
    assert set(report.reinitialised) == heads
    assert set(report.skipped) == heads
    assert set(report.loaded) == set(state) - heads
    assert len(report.loaded) + len(report.reinitialised) == len(state)
    assert (report.checkpoint_classes, report.model_classes) == (6, 3)
    assert "18 re-initialised" in str(report) and str(ckpt) in str(report)
    for k in report.loaded:
        assert torch.equal(state[k], saved[k]), k
    for i in range(4):  # official init: identical copies, focal prior bias
        assert torch.allclose(model.class_embed[i].bias, torch.full((3,), FOCAL_PRIOR_BIAS))
        assert torch.equal(model.class_embed[i].weight, model.class_embed[0].weight)

    losses = train_steps(model, cfg, train_set, steps=2)
    assert all(math.isfinite(v) for v in losses)

    model.eval()
    detections = []
    with torch.no_grad():
        for images, masks, targets in DataLoader(val_set, batch_size=2, collate_fn=collate_fn):
            results = PostProcess(num_select=30)(
                model(images, masks), torch.stack([t["orig_size"] for t in targets])
            )
            by_image = {int(t["image_id"]): r for t, r in zip(targets, results)}
            detections += results_to_detections(by_image, label_ids=cmap.label_ids)
    assert {d["category_id"] for d in detections} == {7, 12, 40}
    assert set(evaluate_detections(val_set.coco, detections)) >= {"AP", "AP50"}
    per_class = per_category_ap(val_set.coco, detections)
    assert set(per_class) == {7, 12, 40}
    # Unmapped labels (0, 1, 2) are not categories of this set: refused, not silently scored 0.
    with pytest.raises(DataError, match="not in the ground truth"):
        per_category_ap(val_set.coco, results_to_detections(by_image))


def test_other_architecture_is_refused_and_nothing_is_overwritten(pretrained, tmp_path):
    _, ckpt = pretrained
    model = build_model(get_preset("tiny_deformable_detr", [*SMALL, "model.num_classes=3"]).model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="another architecture") as err:
        load_for_finetuning(model, ckpt)
    message = str(err.value)
    assert "checkpoint keys the model lacks" in message and "transformer.enc_mask_predictor" in message
    assert len(message) < 1200  # a few keys and counts, not torch's wall of text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    wider = build_model(get_preset(PRESET, [*SMALL, "model.hidden_dim=96", "model.nheads=4"]).model)
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_for_finetuning(wider, ckpt)
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_for_finetuning(wider, bad)
    three = build_model(get_preset(PRESET, [*SMALL, "model.num_classes=3"]).model)
    with pytest.raises(CheckpointError, match="would have to be re-initialised"):
        load_for_finetuning(three, {"model": read_checkpoint(ckpt)["model"]}, reset_class_heads=False)


def test_same_class_count_loads_the_heads_unless_asked(pretrained):
    _, ckpt = pretrained
    saved = read_checkpoint(ckpt)["model"]
    model = build_model(get_preset(PRESET, SMALL).model)  # 6 classes, as the checkpoint
    assert load_for_finetuning(model, ckpt).reinitialised == []
    assert torch.equal(model.class_embed[0].weight, saved["class_embed.0.weight"])
    report = load_for_finetuning(
        model, {"model": saved, "args": {}}, reset_class_heads=True, source="official"
    )
    assert len(report.reinitialised) == 18 and report.source == "official"


def test_category_maps():
    coco_like = build_category_map([{"id": i} for i in (1, 2, 3, 4, 5)])
    assert (coco_like.mode, coco_like.num_classes) == ("raw", 6)  # DETR's layout: label = id
    ids, keep = coco_like.ids(torch.tensor([0, 3, 5, 9]))
    assert ids.tolist() == [3, 5] and keep.tolist() == [False, True, True, False]
    sparse = build_category_map([{"id": 40, "name": "c"}, {"id": 7, "name": "a"}, {"id": 12, "name": "b"}])
    assert sparse.label_ids == (7, 12, 40) and sparse.names == ("a", "b", "c")
    assert CategoryMap.from_dict(sparse.to_dict()) == sparse
    with pytest.raises(DataError, match=r"categories 99 \(new\) are not among the 3 categories"):
        check_same_categories(
            sparse, build_category_map([{"id": 7}, {"id": 99, "name": "new"}]), "x", "val.json"
        )
    with pytest.raises(DataError, match="not in the category map"):
        sparse.labels([7, 8])


# -- through the command line: sdetr train --init-from, sweep files ----------------------------------

CLI_TINY = [
    "--preset",
    PRESET,
    *("--set", "optim.batch_size=2", "--set", "data.train_scales=[128]", "--set", "data.random_crop=false"),
    *("--set", "data.val_scale=128", "--set", "data.val_max_size=160", "--set", "data.train_max_size=160"),
    *("--set", "data.num_workers=0", "--set", "train.progress=false", "--set", "model.num_queries=20"),
]


def cli(capsys, *argv) -> tuple[int, str, str]:
    from sdetr.platform.cli.main import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_finetune_from_a_run_folder_on_three_noncontiguous_classes(pretrained, tmp_path, capsys):
    """Acceptance: a tiny Sparse DETR trained on the synthetic set (1 epoch, `sdetr train`) is fine-tuned
    with --init-from on the 3-class set with ids 7, 12, 40; the report is exact and printed once, training
    runs, num_classes follows the data set, and COCO evaluation sees the classes under their own ids."""
    from sdetr.platform.training.engine import predict

    root, _ = pretrained
    base = tmp_path / "base"
    code, _, err = cli(
        capsys, "train", *CLI_TINY, "--data", root / "synth", "--epochs", "1", "--output", base
    )
    assert code == 0, err
    run = tmp_path / "ft"
    code, out, err = cli(
        capsys,
        "train",
        *CLI_TINY,
        "--data",
        root / "three",
        "--epochs",
        "1",
        "--output",
        run,
        "--init-from",
        base,
    )
    assert code == 0, err
    source = str(base / "checkpoints" / "checkpoint_epoch0000.pth")
    n = len(build_model(get_preset(PRESET, [*SMALL, "model.num_classes=3"]).model).state_dict())
    report = (
        f"initialised from {source}: {n - 18} tensors loaded, 18 re-initialised, 18 skipped "
        "(classes: checkpoint 6, model 3)"
    )
    assert out.count("initialised from ") == 1 and report in out

    saved = read_checkpoint(run / "checkpoints" / "checkpoint_epoch0000.pth")
    cmap = CategoryMap.from_dict(saved["categories"])
    assert (cmap.mode, cmap.label_ids, cmap.names) == ("contiguous", (7, 12, 40), ("disc", "box", "wedge"))
    assert saved["config"]["model"]["num_classes"] == 3 and saved["config"]["train"]["init_from"] == str(base)
    assert saved["model"]["class_embed.0.bias"].shape == (3,)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]) and "AP" in history[0]

    # The trained model's detections, mapped back through the saved map, are scored per original id.
    cfg = get_preset(PRESET, [f"data.root={root / 'three'}", *SMALL, "model.num_classes=3"])
    model = build_model(cfg.model)
    model.load_state_dict(saved["model"])
    val_set = build_dataset("val", cfg.data, category_map=cmap)
    loader = DataLoader(val_set, batch_size=2, collate_fn=collate_fn)
    detections = predict(
        model, PostProcess(num_select=30), loader, torch.device("cpu"), label_ids=cmap.label_ids
    )
    assert {d["category_id"] for d in detections} == {7, 12, 40}
    assert set(per_category_ap(val_set.coco, detections)) == {7, 12, 40}

    # `sdetr predict` writes the original ids too.
    image = next((root / "three" / "val2017").iterdir())
    code, _, err = cli(
        capsys, "predict", "--checkpoint", run, image, "--threshold", "0", "--out", tmp_path / "p"
    )
    assert code == 0, err
    predicted = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert predicted and {d["category_id"] for d in predicted} <= {7, 12, 40}

    # `sdetr eval` on a data set with categories the checkpoint does not know: one line, exit 2.
    code, _, err = cli(capsys, "eval", "--checkpoint", run, "--rho", "0.1", "--data", root / "synth")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "categories 1 (" in err and "are not among the 3 categories" in err


def test_cli_finetune_bad_input_is_one_line(pretrained, tmp_path, capsys):
    root, ckpt = pretrained
    data = ["--data", root / "three", "--epochs", "1"]
    code, _, err = cli(capsys, "train", *CLI_TINY, *data, "--output", tmp_path / "a", "--reset-class-heads")
    assert code == 2 and "--reset-class-heads needs --init-from" in err
    code, _, err = cli(capsys, "train", *CLI_TINY, *data, "--init-from", tmp_path / "nothing.pth")
    assert code == 2 and "not found" in err and "nothing.pth" in err
    # A Sparse DETR checkpoint into a Deformable DETR: the differing keys, nothing written.
    other = [a if a != PRESET else "tiny_deformable_detr" for a in CLI_TINY]
    code, _, err = cli(capsys, "train", *other, *data, "--output", tmp_path / "b", "--init-from", ckpt)
    assert code == 2 and "another architecture" in err and "transformer.enc_mask_predictor" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_sweep_file_init_from_is_checked_and_reaches_the_trials(pretrained, tmp_path):
    from sdetr.detector.errors import ConfigError
    from sdetr.platform.sweeps.load import load_sweep

    _, ckpt = pretrained
    path = tmp_path / "ft.yaml"
    path.write_text(f"preset: {PRESET}\nspace: {{model.rho: [0.1, 0.2]}}\ninit_from: {ckpt}\n")
    spec = load_sweep(path)
    assert spec.trial_config({"model.rho": 0.2}).train.init_from == str(ckpt)
    path.write_text(f"preset: {PRESET}\nspace: {{model.rho: [0.1]}}\ninit_from: {tmp_path / 'no.pth'}\n")
    with pytest.raises(ConfigError, match=r"ft.yaml:3: init_from: .*no.pth: not found"):
        load_sweep(path)
    path.write_text(f"preset: {PRESET}\nspace: {{model.rho: [0.1]}}\ninit_from: [1]\n")
    with pytest.raises(ConfigError, match="init_from: expected the path of a checkpoint"):
        load_sweep(path)


@pytest.mark.slow
def test_ray_workers_load_init_from_in_the_model_setup(pretrained, tmp_path, capfd):
    """--workers: the worker's model set-up loads train.init_from (the report printed once, by rank 0).
    With lr 0 the trained run's weights are exactly the checkpoint's, except the re-initialised heads."""
    import ray

    from sdetr.platform.cli.main import main

    root, ckpt = pretrained
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        argv = ["train", *CLI_TINY, "--data", root / "synth", "--epochs", "1", "--workers", "1"]
        argv += ["--storage", tmp_path, "--name", "ft", "--address", ray.get_runtime_context().gcs_address]
        argv += ["--init-from", ckpt, "--reset-class-heads", "--mlflow-uri", "none"]
        argv += ["--set", "optim.lr=0", "--set", "optim.lr_backbone=0", "--set", "train.eval_every_epochs=5"]
        assert main([str(a) for a in argv]) == 0
    finally:
        ray.shutdown()
    out = capfd.readouterr().out
    assert out.count("initialised from ") == 1 and "18 re-initialised" in out
    state = read_checkpoint(next((tmp_path / "ft").glob("checkpoint_epoch*/state.pth")))
    saved = read_checkpoint(ckpt)["model"]
    assert state["config"]["train"]["init_from"] == str(ckpt)
    assert CategoryMap.from_dict(state["categories"]).label_ids == (-1, 1, 2, 3, 4, 5)
    for k, v in state["model"].items():
        if "class_embed" in k:
            assert "bias" not in k or torch.allclose(v, torch.full_like(v, FOCAL_PRIOR_BIAS)), k
        elif "running_" not in k and "num_batches_tracked" not in k:
            assert torch.equal(v, saved[k]), k
