"""The Ray Data pipeline (platform/ray_data.py) on a real local Ray, shared by the module."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from sdetr.detector.data.batching import collate_fn  # noqa: E402
from sdetr.detector.data.coco import CocoDetection  # noqa: E402
from sdetr.detector.data.synth import generate_synthetic_coco  # noqa: E402
from sdetr.detector.data.transforms import make_transforms  # noqa: E402
from sdetr.detector.errors import DataError  # noqa: E402
from sdetr.detector.presets import get_preset  # noqa: E402
from sdetr.platform.resources import cpus_per_worker  # noqa: E402
from sdetr.platform.shards import reader as ray_data  # noqa: E402
from sdetr.platform.shards.writer import shard_coco  # noqa: E402

N_TRAIN, N_VAL, BATCH = 24, 6, 4


@pytest.fixture(scope="module")
def ray_local():
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(coco_root, shard_dir)``: a small synthetic set in 3 train shards."""
    base = tmp_path_factory.mktemp("raydata")
    root = base / "coco"
    generate_synthetic_coco(root, n_train=N_TRAIN, n_val=N_VAL, seed=5, min_size=64, max_size=128)
    shard_coco(root, base / "shards", shard_size=8, progress=False)
    return root, base / "shards"


@pytest.fixture(scope="module")
def cfg(data):
    cfg = get_preset("tiny_deformable_detr")
    cfg.data.root = str(data[0])
    cfg.train.seed = 11
    return cfg


def ids_of(batches) -> list[list[int]]:
    return [[int(t["image_id"]) for t in targets] for _, _, targets in batches]


def run_split(ds, cfg, epoch: int, world: int = 2, **kwargs) -> list[list[list[int]]]:
    """Image ids per batch for each of ``world`` streaming-split workers, iterated concurrently."""
    shards = ds.streaming_split(world, equal=True)
    with ThreadPoolExecutor(world) as pool:
        runs = pool.map(
            lambda s: ids_of(ray_data.iter_epoch(s, cfg, "train", epoch, BATCH, **kwargs)), shards
        )
        return list(runs)


# -- driver-side checks (no Ray workers) ---------------------------------------------------------
def test_check_shards_names_file_and_missing_column(data, tmp_path):
    _, shards = data
    manifest = ray_data.check_shards(shards, ["train", "val"])
    assert ray_data.steps_per_epoch(manifest, "train", 2, BATCH) == 3
    assert ray_data.num_categories_max_id(shards) == 5

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((shards / "manifest.json").read_text())
    (broken / "train").mkdir()
    for shard in json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]:
        table = pq.read_table(shards / shard["file"])
        if shard["file"].endswith("00001.parquet"):
            table = table.drop_columns(["boxes", "area"])
        pq.write_table(table, broken / shard["file"])
    with pytest.raises(DataError, match=r"train/part-00001.parquet lacks required column\(s\) boxes, area"):
        ray_data.check_shards(broken, ["train"])
    with pytest.raises(DataError, match=r"no split 'test'"):
        ray_data.check_shards(shards, ["test"])
    with pytest.raises(DataError, match=r"manifest.json does not exist"):
        ray_data.check_shards(tmp_path, ["train"])


def test_read_split_fails_before_any_worker_on_bad_shards(data, tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "splits": {"train": {"complete": False}}})
    )
    with pytest.raises(DataError, match=r"split 'train' was not finished"):
        ray_data.read_split(tmp_path, "train")  # no ray.init needed: raised on the driver first


def test_ground_truth(data):
    _, shards = data
    gt = ray_data.coco_ground_truth(shards, "val")
    assert sorted(gt.imgs) == [1_000_001 + i for i in range(N_VAL)]
    assert len(ray_data.coco_ground_truth(shards, "val", max_images=2).imgs) == 2


# -- the pipeline --------------------------------------------------------------------------------
def test_batches_equal_the_plain_dataloader_path(ray_local, data, cfg):
    root, shards = data
    ds = ray_data.read_split(shards, "train")
    batches = list(ray_data.iter_epoch(ds.iterator(), cfg, "train", epoch=3, batch_size=BATCH))
    assert len(batches) == N_TRAIN // BATCH

    plain = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json")
    transforms = make_transforms("train", cfg.data)
    for images, masks, targets in batches:
        items = []
        for t in targets:
            image, target = plain[plain.ids.index(int(t["image_id"]))]
            seed = ray_data.sample_seed(cfg.train.seed, 3, int(t["image_id"]))
            items.append(ray_data.apply_seeded(transforms, image, target, seed))
        ref_images, ref_masks, ref_targets = collate_fn(items)
        assert torch.equal(images, ref_images) and torch.equal(masks, ref_masks)
        for got, ref in zip(targets, ref_targets):
            assert got.keys() == ref.keys()
            for key in ref:
                assert torch.equal(got[key], ref[key]), key


def test_val_batches_and_rank_slices(ray_local, data, cfg):
    _, shards = data
    ds = ray_data.read_split(shards, "val")
    whole = ids_of(ray_data.iter_epoch(ds.iterator(), cfg, "val", 0, BATCH))
    assert whole == [[1_000_001 + i for i in range(4)], [1_000_005, 1_000_006]]  # file order, nothing dropped
    per_rank = [
        ids_of(ray_data.iter_epoch(ds.iterator(), cfg, "val", 0, 2, rank=r, world_size=2)) for r in range(2)
    ]
    flat = [sorted(i for b in ids for i in b) for ids in per_rank]
    assert set(flat[0]).isdisjoint(flat[1]) and sorted(flat[0] + flat[1]) == sorted(sum(whole, []))
    manifest = ray_data.check_shards(shards, ["val"])
    assert max(len(b) for b in per_rank) == ray_data.steps_per_epoch(manifest, "val", 2, 2)
    # max_images keeps the first images by id, as CocoDetection does.
    first = ids_of(
        ray_data.iter_epoch(ray_data.read_split(shards, "val", max_images=3).iterator(), cfg, "val", 0, 4)
    )
    assert first == [[1_000_001, 1_000_002, 1_000_003]]
    assert ray_data.steps_per_epoch(manifest, "val", 1, 4, max_images=3) == 1


def test_worker_shards_are_disjoint_deterministic_and_reshuffled(ray_local, data, cfg):
    _, shards = data
    ds = ray_data.read_split(shards, "train")
    epoch0, epoch1 = run_split(ds, cfg, 0), run_split(ds, cfg, 1)
    for epoch in (epoch0, epoch1):
        assert [len(w) for w in epoch] == [N_TRAIN // 2 // BATCH] * 2
        seen = [{i for b in worker for i in b} for worker in epoch]
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(1, N_TRAIN + 1))
    assert epoch0 != epoch1  # reshuffled per epoch
    # A second run (a new split of a freshly read dataset) replays the same epoch exactly.
    assert run_split(ray_data.read_split(shards, "train"), cfg, 1) == epoch1


def test_skip_batches_yields_the_tail_without_decoding_the_head(ray_local, data, cfg, monkeypatch):
    _, shards = data
    ds = ray_data.read_split(shards, "train")
    full = list(ray_data.iter_epoch(ds.iterator(), cfg, "train", 2, BATCH))
    decoded = []
    real = ray_data.decode_row
    monkeypatch.setattr(
        ray_data, "decode_row", lambda row, *a: decoded.append(row["image_id"]) or real(row, *a)
    )
    tail = list(ray_data.iter_epoch(ds.iterator(), cfg, "train", 2, BATCH, skip_batches=4))
    assert ids_of(tail) == ids_of(full)[4:]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, full[4:]))
    assert sorted(decoded) == sorted(i for b in ids_of(full)[4:] for i in b)


@pytest.mark.slow
def test_torch_trainer_two_workers_with_cpu_headroom(ray_local, data, cfg, tmp_path):
    """Two Train workers with fractional CPUs leave room for the read tasks (no hang)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _, shards = data

    def loop(config):
        import ray.train

        from sdetr.platform.shards import reader as rd

        it = ray.train.get_dataset_shard("train")
        ids = [
            int(t["image_id"]) for _, _, tg in rd.iter_epoch(it, config["cfg"], "train", 0, BATCH) for t in tg
        ]
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(ids))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "out": str(tmp_path)},
        scaling_config=ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": cpus_per_worker(2, None, 2.0)}
        ),
        datasets={"train": ray_data.read_split(shards, "train")},
        dataset_config=ray_data.dataset_config(),
        run_config=RunConfig(name="raydata-test", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ids = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in range(2)]
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(1, N_TRAIN + 1))
