"""``sdetr eval`` (platform/cli/eval.py, platform/evaluation/): one Sparse DETR checkpoint evaluated at
several ρ, the checkpoint lookup in run folders, and the pyarrow-only shard data set it reads.

A randomly initialised tiny Sparse DETR stands in for a trained one (its AP is ~0, which is fine for
the plumbing); a spy on `predict` checks that each ρ's detections are scored at that ρ.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from sdetr.detector.build import build_model
from sdetr.detector.cost import FIXED_INPUT_HW, cost_of_preset
from sdetr.detector.data import build_dataset
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.errors import CheckpointError, ConfigError, DataError, SdetrError
from sdetr.detector.presets import get_preset
from sdetr.platform import tracking
from sdetr.platform.cli.eval import add_eval_parser, parse_flops_input, parse_rhos
from sdetr.platform.cli.main import main as sdetr_main
from sdetr.platform.evaluation import dynamic_rho
from sdetr.platform.evaluation.checkpoints import load_checkpoint, resolve_checkpoint, run_folder_of
from sdetr.platform.evaluation.dynamic_rho import evaluate_rhos
from sdetr.platform.shards.dataset import ShardDataset
from sdetr.platform.shards.writer import shard_coco

PRESET = "tiny_sparse_detr_rho_0.1"
RHOS = [0.05, 0.1, 0.2, 0.3, 0.5]
SCHEMA = {"checkpoint", "preset", "backbone", "trained_rho", "trial_id", "run_id", "points"}
POINT_KEYS = {"rho", "AP", "AP50", "AP75", "APs", "APm", "APl", "gflops", "gflops_fixed"}


def tiny_config(data, preset=PRESET):
    overrides = [
        f"data.root={data}",
        "data.val_scale=128",
        "data.val_max_size=160",
        "data.num_workers=0",
        "optim.batch_size=2",
    ]
    return get_preset(preset, overrides)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "synth"
    generate_synthetic_coco(root, n_train=0, n_val=4, seed=3, min_size=96, max_size=128)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth):
    """A tiny Sparse DETR checkpoint file (random init) and its config."""
    cfg = tiny_config(synth)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0}, path)
    return path, cfg


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One SQLite store for the module: creating its schema takes seconds."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = tracking.sqlite_uri(folder / "mlflow.db")
    tracking.start_run(
        uri, "warm-up", artifact_location=(folder / "mlartifacts").as_uri(), log=lambda *_: None
    )
    return uri


def make_run(tmp_path, trained, uri, trial_tag="t-007"):
    """A Ray-style run folder: config.yaml, sdetr_run.json naming a (finished) MLflow run, checkpoints."""
    ckpt, cfg = trained
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoint_epoch0000_step000002"
    good.mkdir(parents=True)
    shutil.copy(ckpt, good / "state.pth")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    tracked = tracking.start_run(
        uri,
        "run",
        tags={"sdetr.trial_id": trial_tag, "sdetr.run_dir": str(run_dir)},
        log=lambda *_: None,
    )
    tracking.finish_run(uri, tracked.run_id)
    (run_dir / "sdetr_run.json").write_text(json.dumps({"name": "run", "mlflow": tracked.to_dict()}))
    return run_dir, good / "state.pth", tracked


def eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdetr")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def run_cli(argv: list[str]) -> int:
    args = eval_args(argv)
    return args.func(args)


def test_curve_from_a_run_folder_is_written_and_logged_to_its_mlflow_run(
    tmp_path, trained, mlflow_store, capsys
):
    run_dir, state, tracked = make_run(tmp_path, trained, mlflow_store)
    # A newer but torn checkpoint: skipped with a warning, the older readable one is evaluated.
    torn = run_dir / "checkpoint_epoch0001_step000002"
    torn.mkdir()
    (torn / "state.pth").write_bytes(b"not a checkpoint")

    rc = run_cli(
        ["--checkpoint", str(run_dir), "--rho", "0.5, 0.05,0.1,0.2,0.3", "--val", "3"]
        + ["--flops-images", "1", "--flops-input", "96x128", "--device", "cpu", "--json"]
    )
    assert rc == 0
    out, err = capsys.readouterr()
    assert "skipping unreadable checkpoint" in err and str(torn / "state.pth") in err
    printed = json.loads(out)
    record = json.loads((run_dir / "dynamic_rho.json").read_text())
    assert printed == record

    assert set(record) >= SCHEMA
    assert record["checkpoint"] == str(state.resolve())
    assert record["preset"] == PRESET and record["backbone"] == "resnet18"
    assert record["trained_rho"] == 0.1
    assert record["run_id"] == tracked.run_id
    assert record["trial_id"] == "t-007"  # from the MLflow run's tag
    assert record["val_images"] == 3 and record["flops_images"] == 1
    assert record["fixed_input"] == "3x96x128"
    points = record["points"]
    assert [p["rho"] for p in points] == RHOS
    for p in points:
        assert set(p) == POINT_KEYS
        for key in POINT_KEYS - {"rho", "gflops", "gflops_fixed"}:
            assert math.isfinite(p[key]) and 0.0 <= p[key] <= 1.0
    for key in ("gflops", "gflops_fixed"):
        gflops = [p[key] for p in points]
        assert all(a < b for a, b in zip(gflops, gflops[1:])), (key, gflops)
    # Each ρ's progress line (beside the JSON on stdout): AP in percent.
    for p in points:
        ap, ap50 = 100 * p["AP"], 100 * p["AP50"]
        line = f"ρ {p['rho']:g}: AP {ap:.1f} %, AP50 {ap50:.1f} %, {p['gflops']:.2f} GFLOPs"
        assert line in err, err

    c = tracking.client(tracked.tracking_uri)
    for name in ("gflops", "gflops_fixed", "AP", "AP50"):
        history = sorted(c.get_metric_history(tracked.run_id, f"dynamic_rho/{name}"), key=lambda m: m.step)
        assert [m.step for m in history] == [50, 100, 200, 300, 500]
        assert [m.value for m in history] == pytest.approx([p[name] for p in points])
    run = c.get_run(tracked.run_id)
    assert run.data.tags["sdetr.dynamic_rho"] == "0.05,0.1,0.2,0.3,0.5"
    assert run.info.status == "FINISHED"  # logged into, not restarted
    assert [a.path for a in c.list_artifacts(tracked.run_id, "dynamic_rho")] == [
        "dynamic_rho/dynamic_rho.json"
    ]


def test_gflops_match_the_cost_model_and_no_mlflow_writes_only_the_file(
    tmp_path, trained, synth, mlflow_store, capsys
):
    run_dir, state, tracked = make_run(tmp_path, trained, mlflow_store)
    (run_dir / "sdetr_trial.json").write_text(json.dumps({"trial_id": "t-042"}))  # as a sweep trial's folder
    out = tmp_path / "elsewhere" / "curve.json"
    rc = run_cli(
        [
            "--checkpoint",
            str(state),
            "--rho",
            "0.1",
            "--val",
            "2",
            "--flops-images",
            "0",
            "--flops-input",
            "96x128",
        ]
        + ["--device", "cpu", "--no-mlflow", "--out", str(out)]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "0.1 (trained)" in table and str(out) in table
    record = json.loads(out.read_text())
    assert not (run_dir / "dynamic_rho.json").exists()
    assert record["trial_id"] == "t-042" and record["run_id"] == tracked.run_id
    c = tracking.client(tracked.tracking_uri)
    assert c.get_metric_history(tracked.run_id, "dynamic_rho/gflops") == []
    assert "sdetr.dynamic_rho" not in c.get_run(tracked.run_id).data.tags

    # "--flops-images 0" = all evaluated images, the same mean as `sdetr cost --val 2`; the fixed input
    # as `sdetr cost --input 96x128` (how sweeps count their trials).
    on_val = cost_of_preset(tiny_config(synth), val_images=2, device="cpu", fps=False)["gflops"]
    fixed = cost_of_preset(tiny_config(synth), input_hw=(96, 128), device="cpu", fps=False)["gflops"]
    assert record["flops_images"] == 2
    assert record["points"][0]["gflops"] == pytest.approx(on_val, rel=1e-9)
    assert record["points"][0]["gflops_fixed"] == pytest.approx(fixed, rel=1e-9)
    assert fixed != pytest.approx(on_val)
    # Without --flops-input, the fixed input is the one `sdetr cost` counts by default.
    assert parse_flops_input(eval_args(["--checkpoint", str(state)]).flops_input) == FIXED_INPUT_HW


def test_each_rho_scores_its_own_detections_on_coco_and_shard_folders(tmp_path, trained, synth, monkeypatch):
    from sdetr.detector.data.coco import validate_annotations
    from sdetr.platform.training import engine

    gt, _ = validate_annotations(synth / "annotations" / "instances_val2017.json")
    seen_rhos = []

    def spy(model, postprocess, loader, device, amp="none"):
        # Perfect detections at ρ = 0.5 only: its AP must be 1 and every other ρ's 0.
        seen_rhos.append(model.rho)
        (images, masks, targets), *_ = list(loader)
        if model.rho != 0.5:
            return []
        ids = {int(t["image_id"]) for t in targets}
        return [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]
            if a["image_id"] in ids and not a["iscrowd"]
        ]

    monkeypatch.setattr(engine, "predict", spy)
    ckpt, _ = trained
    shards = tmp_path / "shards"
    shard_coco(synth, shards, shard_size=3, splits=("val",), progress=False)
    quiet = {"device": "cpu", "flops_images": 1, "fixed_input_hw": None, "log": lambda *_: None}
    on_coco = evaluate_rhos(ckpt, [0.5, 0.2], val_images=4, **quiet)
    on_shards = evaluate_rhos(ckpt, [0.2, 0.5], data=str(shards), **quiet)
    assert sorted(set(seen_rhos)) == [0.2, 0.5]
    for record in (on_coco, on_shards):
        assert [p["rho"] for p in record["points"]] == [0.2, 0.5]
        assert record["points"][0]["AP"] == 0.0
        assert record["points"][1]["AP"] == pytest.approx(1.0)
        assert record["val_images"] == 4
        assert record["run_id"] == "" and record["trial_id"] == ""
        assert record["fixed_input"] == "" and "gflops_fixed" not in record["points"][0]
    assert on_shards["data"] == str(shards)
    # Same images through the same val transform whichever folder they come from.
    assert [p["gflops"] for p in on_shards["points"]] == pytest.approx(
        [p["gflops"] for p in on_coco["points"]]
    )


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0.1,abc", "'abc' is not a number"),
        ("0,0.5", "outside (0, 1]"),
        ("1.5", "outside (0, 1]"),
        ("nan", "outside (0, 1]"),
        (" , ", "no ρ values"),
        ("0.1,0.1002", "share the MLflow step 100"),
    ],
)
def test_bad_rho_lists_are_config_errors(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_rhos(text)
    assert fragment in str(info.value) and repr(text) in str(info.value)


def test_parse_rhos_sorts_and_dedupes():
    assert parse_rhos("0.3, 0.05,0.3,1") == [0.05, 0.3, 1.0]


def test_user_mistakes_are_sdetr_errors_naming_the_path(tmp_path, trained, synth, capsys):
    ckpt, _ = trained

    def fails(exc_type, *args, **kwargs) -> str:
        with pytest.raises(exc_type) as info:
            evaluate_rhos(*args, device="cpu", log=lambda *_: None, **kwargs)
        assert isinstance(info.value, SdetrError)
        return str(info.value)

    missing = tmp_path / "nope.pth"
    assert str(missing) in fails(CheckpointError, missing, [0.1])

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 definitely not torch")
    assert str(garbage) in fails(CheckpointError, garbage, [0.1])

    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert str(empty) in fails(CheckpointError, empty, [0.1])

    dense = tmp_path / "dense.pth"
    torch.save({"model": {}, "config": tiny_config(synth, "tiny_deformable_detr").to_dict()}, dense)
    msg = fails(CheckpointError, dense, [0.1])
    assert str(dense) in msg and "Sparse DETR only" in msg

    official = tmp_path / "official.pth"
    torch.save(
        {"model": {}, "args": argparse.Namespace(backbone="resnet50", rho=0.1, two_stage=True)}, official
    )
    assert str(official) in fails(ConfigError, official, [0.1]) and "--data" in fails(
        ConfigError, official, [0.1]
    )

    no_data = tmp_path / "no_data"
    assert str(no_data) in fails(DataError, ckpt, [0.1], data=str(no_data))
    assert "has 4 images" in fails(DataError, ckpt, [0.1], val_images=40)
    assert "(0, 1]" in fails(ConfigError, ckpt, [0.1, 2.0])

    # The CLI glue lets them through for `sdetr` to print as one line (exit status 2).
    assert sdetr_main(["eval", "--checkpoint", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdetr: error: ") and str(missing) in err[0]
    with pytest.raises(ConfigError, match="'x'"):
        run_cli(["--checkpoint", str(ckpt), "--rho", "0.1,x"])
    with pytest.raises(ConfigError, match="--flops-input '12x12'"):
        run_cli(["--checkpoint", str(ckpt), "--flops-input", "12x12"])


def test_checkpoint_lookup_in_run_folders(tmp_path):
    def save(path, epoch):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {}, "config": {"preset": PRESET}, "epoch": epoch}, path)

    # Single-process trainer: <run>/checkpoints/checkpoint_epochNNNN.pth beside <run>/config.yaml.
    single = tmp_path / "single"
    for epoch in (2, 10):
        save(single / "checkpoints" / f"checkpoint_epoch{epoch:04d}.pth", epoch)
    (single / "config.yaml").write_text("preset: x\n")
    ckpt = load_checkpoint(single)
    file = ckpt.file
    assert (
        file == (single / "checkpoints" / "checkpoint_epoch0010.pth").resolve() and ckpt.state["epoch"] == 10
    )
    assert ckpt.run_dir == run_folder_of(file) == single.resolve()
    assert resolve_checkpoint(single) == (file, single.resolve())
    assert ckpt.config.preset == PRESET and not ckpt.official
    record = {"run_dir": str(single), "checkpoint": str(file)}
    assert dynamic_rho.record_path(record) == single / "dynamic_rho.json"

    # Ray: the highest (epoch, step, retry) wins; a checkpoint folder itself is accepted too.
    ray_run = tmp_path / "ray"
    names = [
        "checkpoint_epoch0001_step000002-1",
        "checkpoint_epoch0001_step000010",
        "checkpoint_epoch0000_step000099",
    ]
    for i, name in enumerate(names):
        save(ray_run / name / "state.pth", i)
    assert load_checkpoint(ray_run).state["epoch"] == 1
    assert resolve_checkpoint(ray_run)[0] == (ray_run / names[1] / "state.pth").resolve()
    assert load_checkpoint(ray_run / names[0]).state["epoch"] == 0

    # A loose file outside any run folder: the record goes beside it.
    loose = tmp_path / "loose" / "model.pth"
    save(loose, 0)
    assert run_folder_of(loose) is None and load_checkpoint(loose).run_dir is None
    assert (
        dynamic_rho.record_path({"run_dir": "", "checkpoint": str(loose)})
        == loose.parent / "dynamic_rho.json"
    )


def test_an_unreachable_mlflow_store_is_a_warning_and_never_created(tmp_path):
    missing = tmp_path / "gone" / "mlflow.db"
    record = {"run_id": "abc", "run_dir": str(tmp_path), "tracking_uri": tracking.sqlite_uri(missing)}
    messages = []
    uri = dynamic_rho.tracking_uri_of(record, None)
    assert dynamic_rho.mlflow_run_of(record, uri, log=messages.append) is None
    assert not missing.exists() and "does not exist" in messages[0]
    assert dynamic_rho.tracking_uri_of(record, "none") is None
    assert dynamic_rho.tracking_uri_of(record, str(tmp_path / "other.db")) == tracking.sqlite_uri(
        tmp_path / "other.db"
    )


def test_shard_dataset_yields_the_coco_folders_items(tmp_path, synth):
    """A shard folder read with pyarrow alone gives `CocoDetection`'s ids, ground truth and items."""
    cfg = tiny_config(synth)
    shards = tmp_path / "shards"
    shard_coco(synth, shards, shard_size=3, splits=("val",), progress=False)  # 4 images: 2 shard files
    coco = build_dataset("val", cfg.data)
    assert len(coco) == 4
    for max_images in (0, 3):
        from_shards = ShardDataset(shards, "val", coco.transforms, max_images=max_images)
        assert from_shards.ids == coco.ids[: max_images or None]
        assert sorted(from_shards.coco.getAnnIds()) == sorted(coco.coco.getAnnIds(imgIds=from_shards.ids))
    from_shards = ShardDataset(shards, "val", coco.transforms)
    for i in (3, 0, 2, 1):  # out of order: crosses shard files both ways
        (image, target), (want_image, want_target) = from_shards[i], coco[i]
        assert torch.equal(image, want_image)
        assert target.keys() == want_target.keys()
        for key in target:
            assert torch.equal(target[key], want_target[key]), key
    with pytest.raises(DataError, match="no split 'train'"):
        ShardDataset(shards, "train")
