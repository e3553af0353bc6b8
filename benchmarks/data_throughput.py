"""Images/s of the Ray Data input pipeline against a plain torch DataLoader, same JPEGs, same CPUs.

    python benchmarks/data_throughput.py [--data data/synth] [--cpus 2] [--reps 3]

Every variant produces the same training batches: the tiny preset's train transforms, batch size
``optim.batch_size``, ``(images, masks, targets)`` as `collate_fn`. Variants:

* ``dataloader``: `CocoDetection` + `collate_fn`, ``DataLoader(num_workers=cpus)`` (persistent workers,
  as platform/train.py). ``dataloader (batches not sent)`` does the same work but returns only the
  batch size from the workers: the gap is the cost of moving batch tensors between processes.
* ``ray collate``: platform/ray_data.py as shipped: Parquet shards read by Ray, JPEG decode and
  transforms in the consumer's collate (``iter_epoch``), one consumer on the driver.
* ``ray collate xN``: the same consumed by N Ray actors through ``streaming_split(N, equal=True)``,
  as N Train workers would.
* ``ray map_batches``: decode + transforms in Ray Data tasks (``map_batches``), decoded pixels travel
  through the object store to the consumer, which only pads.

Images/s are medians over ``--reps`` timed epochs after one untimed warm-up epoch per variant; the
timed epochs are interleaved across variants (rep 1 of each, then rep 2, ...). The per-image
breakdown (read, decode, transform, collate) is measured single-threaded in this process.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import torch

from sdetr.detector.data.batching import collate_fn
from sdetr.detector.data.coco import CocoDetection, prepare_target
from sdetr.detector.data.synth import generate_synthetic_coco
from sdetr.detector.data.transforms import make_transforms
from sdetr.detector.presets import get_preset
from sdetr.platform.shards import reader as ray_data
from sdetr.platform.shards.manifest import REQUIRED_COLUMNS
from sdetr.platform.shards.writer import shard_coco

_cleanup: list = []  # called before ray.shutdown()


def count_images(batches) -> int:
    return sum(len(targets) for _, _, targets in batches)


# -- variants ------------------------------------------------------------------------------------
def collate_and_count(batch) -> int:
    """Builds the batch like `collate_fn` but sends only its size back to the main process."""
    return len(collate_fn(batch)[2])


def setup_dataloader(cfg, root: Path, cpus: int, send_batches: bool = True):
    from torch.utils.data import DataLoader

    dataset = CocoDetection(
        root / "train2017",
        root / "annotations" / "instances_train2017.json",
        make_transforms("train", cfg.data),
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn if send_batches else collate_and_count,
        num_workers=cpus,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    if not send_batches:
        return lambda epoch: sum(loader)
    return lambda epoch: count_images(loader)


def setup_ray_collate(cfg, shards: Path, prefetch: int):
    it = ray_data.read_split(shards, "train").iterator()
    bs = cfg.optim.batch_size
    return lambda epoch: count_images(
        ray_data.iter_epoch(it, cfg, "train", epoch, bs, prefetch_batches=prefetch)
    )


def setup_ray_consumers(cfg, shards: Path, workers: int):
    import ray

    @ray.remote
    class Consumer:
        def __init__(self, it, cfg):
            torch.set_num_threads(1)
            self.it, self.cfg = it, cfg

        def epoch(self, epoch):
            batches = ray_data.iter_epoch(self.it, self.cfg, "train", epoch, self.cfg.optim.batch_size)
            return count_images(batches)

    splits = ray_data.read_split(shards, "train").streaming_split(workers, equal=True)
    # Train would give each worker `cpus_per_worker(workers, None, total)` CPUs. Here the actors stay alive
    # while the other variants run (interleaved), so they reserve nothing: reservations would only
    # block the other variants' tasks (Ray does not cap a process's CPU use either way).
    actors = [Consumer.options(num_cpus=0).remote(it, cfg) for it in splits]
    ray.get([a.__ray_ready__.remote() for a in actors])  # start-up is not throughput
    _cleanup.extend(lambda a=a: ray.kill(a) for a in actors)
    return lambda epoch: sum(ray.get([a.epoch.remote(epoch) for a in actors]))


def _decode_in_task(table, cfg, epoch: int) -> dict[str, np.ndarray]:
    """map_batches UDF: decode + transform in a Ray task; emits pixels and target columns."""
    transforms = make_transforms("train", cfg.data)
    out = {k: [] for k in ("image", "image_id", "boxes", "labels", "area", "iscrowd", "orig_size", "size")}
    for row in table.select(list(REQUIRED_COLUMNS)).to_pylist():
        seed = ray_data.sample_seed(cfg.train.seed, epoch, row["image_id"])
        image, target = ray_data.decode_row(row, transforms, seed)
        out["image"].append(image.numpy())
        for key in out:
            if key != "image":
                out[key].append(target[key].numpy().reshape(-1))
    return {k: _ragged(v) for k, v in out.items()}


def _ragged(values: list[np.ndarray]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def setup_ray_map_batches(cfg, shards: Path):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class PadCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            images = [torch.from_numpy(np.asarray(im)) for im in batch["image"]]
            targets = [
                {
                    "boxes": torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1, 4)),
                    "labels": torch.from_numpy(np.asarray(lab)),
                    "image_id": torch.tensor(int(np.asarray(i)[0])),
                    "area": torch.from_numpy(np.asarray(a)),
                    "iscrowd": torch.from_numpy(np.asarray(c)),
                    "orig_size": torch.from_numpy(np.asarray(o)),
                    "size": torch.from_numpy(np.asarray(s)),
                }
                for b, lab, i, a, c, o, s in zip(
                    batch["boxes"], batch["labels"], batch["image_id"], batch["area"], batch["iscrowd"],
                    batch["orig_size"], batch["size"],
                )
            ]  # fmt: skip
            padded, masks = collate_fn(list(zip(images, targets)))[:2]
            return padded, masks, targets

    base = ray_data.read_split(shards, "train")

    def run(epoch):
        # Two decode tasks at a time on half a CPU each: the read tasks keep room to run.
        ds = base.map_batches(_decode_in_task, fn_kwargs={"cfg": cfg, "epoch": epoch}, batch_format="pyarrow",
                              batch_size=16, concurrency=2, num_cpus=0.5)  # fmt: skip
        batches = ds.iter_torch_batches(
            batch_size=cfg.optim.batch_size, collate_fn=PadCollate(), drop_last=True, device="cpu",
            local_shuffle_buffer_size=1000, local_shuffle_seed=cfg.train.seed + epoch,
        )  # fmt: skip
        return count_images(batches)

    return run


# -- where the time goes -------------------------------------------------------------------------
def breakdown(cfg, root: Path, shards: Path, n: int = 200) -> dict[str, float]:
    """Milliseconds per image of each stage, single-threaded."""
    files = ray_data.shard_files(shards, ray_data.check_shards(shards, ["train"]), "train")
    start = time.perf_counter()
    rows = [r for f in files for r in pq.read_table(f, columns=list(REQUIRED_COLUMNS)).to_pylist()]
    read_parquet = (time.perf_counter() - start) / len(rows)
    rows = rows[:n]
    start = time.perf_counter()
    for r in rows:
        (root / "train2017" / r["file_name"]).read_bytes()
    read_files = (time.perf_counter() - start) / n
    start = time.perf_counter()
    images = [PIL.Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    decode = (time.perf_counter() - start) / n
    transforms = make_transforms("train", cfg.data)
    start = time.perf_counter()
    samples = []
    for r, im in zip(rows, images):
        target = prepare_target(r["image_id"], ray_data.row_annotations(r), im.width, im.height)
        samples.append(
            ray_data.apply_seeded(transforms, im, target, ray_data.sample_seed(0, 0, r["image_id"]))
        )
    transform = (time.perf_counter() - start) / n
    bs = cfg.optim.batch_size
    start = time.perf_counter()
    for i in range(0, n - bs + 1, bs):
        collate_fn(samples[i : i + bs])
    collate = (time.perf_counter() - start) / (n - n % bs)
    ms = {"read parquet rows": read_parquet, "read jpeg files": read_files, "decode": decode,
          "transform (incl. target)": transform, "collate (pad)": collate}  # fmt: skip
    return {k: v * 1e3 for k, v in ms.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--shards", type=Path, default=None, help="default: <data>_shards")
    parser.add_argument("--preset", default="tiny_deformable_detr")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default="dataloader,ray_collate,ray_collate_workers,ray_map_batches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = get_preset(args.preset)
    cfg.data.root = str(args.data)
    shards = args.shards or args.data.with_name(args.data.name + "_shards")

    summary = generate_synthetic_coco(args.data)  # the default 1000/100 set; a no-op when present
    n_images = summary["train"]["images"]
    shard_coco(args.data, shards, splits=("train",), progress=False)
    print(f"data: {args.data} ({n_images} train images) -> {shards}; batch {cfg.optim.batch_size}, "
          f"{args.cpus} CPUs, {os.cpu_count()} cores visible, load {os.getloadavg()[0]:.2f}")  # fmt: skip

    print("\nper image, single thread (ms):")
    for stage, ms in breakdown(cfg, args.data, shards).items():
        print(f"  {stage:<26} {ms:7.3f}")

    import ray

    variants = args.variants.split(",")
    runs: dict[str, object] = {}
    if "dataloader" in variants:
        # Workers forked (and warmed up) before Ray starts threads in this process.
        runs["dataloader"] = setup_dataloader(cfg, args.data, args.cpus)
        # Diagnostic: the same work without shipping the batch tensors back from the workers.
        runs["dataloader (batches not sent)"] = setup_dataloader(
            cfg, args.data, args.cpus, send_batches=False
        )
        for run in runs.values():
            run(0)
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, list[float]] = {name: [] for name in runs}
    try:
        if "ray_collate" in variants:
            for prefetch in (1, args.cpus):
                runs[f"ray collate (prefetch {prefetch})"] = setup_ray_collate(cfg, shards, prefetch)
        if "ray_collate_workers" in variants:
            runs[f"ray collate x{args.cpus} workers"] = setup_ray_consumers(cfg, shards, args.cpus)
        if "ray_map_batches" in variants:
            runs["ray map_batches"] = setup_ray_map_batches(cfg, shards)
        for name, run in runs.items():
            if not name.startswith("dataloader"):
                run(0)  # warm-up: worker processes, imports
        # The machine is shared: interleave the variants so load changes hit all of them alike.
        for epoch in range(1, args.reps + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                images = run(epoch)
                results.setdefault(name, []).append(images / (time.perf_counter() - start))
    finally:
        for fn in _cleanup:
            fn()
        ray.shutdown()

    print(f"\nimages/s, median of {args.reps} epochs of {n_images} images (all runs):")
    for name, rates in results.items():
        print(f"  {name:<30} {statistics.median(rates):7.1f}   ({', '.join(f'{r:.0f}' for r in rates)})")
    if "dataloader" in results:
        base = statistics.median(results["dataloader"])
        best = max(
            (k for k in results if k.startswith("ray")),
            key=lambda k: statistics.median(results[k]),
            default=None,
        )
        for name in results:
            if name.startswith("ray"):
                print(f"  ratio {name} / dataloader: {statistics.median(results[name]) / base:.2f}")
        if best:
            print(f"best Ray variant: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
