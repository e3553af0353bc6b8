"""Ray Data input pipeline over the Parquet shards written by ``sdetr data shard`` (writer.py).

Per Ray Train worker, one epoch is::

    read                    one Ray task per shard file (READ_TASK_CPUS each): Arrow blocks of encoded
                            image bytes and annotation lists, in file order (``preserve_order``)
    streaming_split         done by Ray Train with `dataset_config()`: deterministic and disjoint
                            ``equal=True`` shards of "train"; "val" goes whole to every worker
    local shuffle           a seeded buffer (``seed + epoch``) inside the worker; batches of
                            ``batch_size`` rows (per worker), drop_last for training
    DetrCollate             in the worker process (Ray's prefetch thread): decode the JPEG, apply
                            DETR's transforms with the RNGs seeded by (seed, epoch, image_id), pad
                            -> ``(images FloatTensor[B, 3, H, W], masks BoolTensor[B, H, W], targets)``

Why decode in the collate: the object store then only carries the compressed bytes (a decoded,
normalised COCO image is ~40x larger than its JPEG), and the decode runs next to the consumer instead
of in read tasks competing for the CPUs the Train workers reserved. benchmarks/data_throughput.py
measures it against a plain DataLoader and against decoding in ``map_batches``.

Determinism: the row order of an epoch depends only on the shard files, the world size, the seed and
the epoch, so the same epoch replays identically after a restart, and ``skip_batches`` resumes exactly
mid-epoch. Each image's augmentation depends only on (seed, epoch, image_id), whichever process or
attempt decodes it. Shuffling is local: a worker's share of "train" is fixed across epochs (blocks
are dealt out in order) and shuffled within a buffer of `DEFAULT_SHUFFLE_BUFFER` rows.

CPU budget (the resource trap): Ray Train reserves its workers' CPUs, and Ray Data's tasks only run
on what is left. If the workers reserve every CPU, the read never starts and training hangs ("Cluster
resources are not enough to run any task"). The only work outside the workers is one read task per
shard file and epoch, `READ_TASK_CPUS` each (bytes off disk, no decode; `read_split` explains why not
``read_parquet``, whose tasks need a whole CPU): platform/resources.py leaves `data_cpu_headroom()`
CPUs unreserved (2 CPUs and 2 workers -> 0.75 each).
The decoding runs inside each Train worker and is paid from that worker's own CPUs.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from sdetr.detector.config import Config
from sdetr.detector.data.batching import collate_fn
from sdetr.detector.data.transforms import Compose, Normalize, ToTensor, make_transforms
from sdetr.detector.errors import DataError
from sdetr.platform.resources import READ_TASK_CPUS

# The pyarrow-only part of reading shards is in dataset.py; `x as x` re-exports it to this module's callers.
from sdetr.platform.shards.dataset import SPLITS, check_shards, decode_sample, shard_files
from sdetr.platform.shards.dataset import coco_ground_truth as coco_ground_truth
from sdetr.platform.shards.dataset import row_annotations as row_annotations
from sdetr.platform.shards.manifest import REQUIRED_COLUMNS, load_manifest

if TYPE_CHECKING:
    import ray.data
    import ray.train

DEFAULT_SHUFFLE_BUFFER = 1000  # rows held per worker; COCO JPEGs average ~160 KB -> ~160 MB

Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]


# -- shards --------------------------------------------------------------------------------------
def _shard_reader():
    """The map_batches UDF of `read_split`: ``path`` rows -> the rows of those Parquet files.

    Built as a closure so cloudpickle ships it by value: the read tasks then import only pyarrow,
    not this module (and with it torch), which keeps their cold start and memory small.
    """
    columns = list(REQUIRED_COLUMNS)

    def read(batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.concat_tables([pq.read_table(str(p), columns=columns) for p in batch["path"]])

    return read


def read_split(path: str | Path, split: str, *, max_images: int = 0) -> ray.data.Dataset:
    """A Ray Dataset of one split's rows (the Parquet columns, see shard.py), in image-id order.

    ``max_images`` > 0 keeps the first images by id (as `CocoDetection`'s ``max_images``). The
    dataset's own context has ``preserve_order`` set so `streaming_split` is deterministic.

    Why not ``ray.data.read_parquet``: both of its Ray 2.60 implementations need a whole free CPU at
    a moment the Train workers may hold them all. The default (datasource V2) runs a 1-CPU ListFiles
    task at the start of every epoch (it hung with 0.5 CPU free, and cost ~1.4 s per epoch before the
    first batch against ~0.1 s here); V1 runs 1-CPU sampling tasks when the dataset is created (it
    hung when the dataset was made while actors held the CPUs). Here the driver only lists the files
    from the manifest (no task), and each epoch one task of `READ_TASK_CPUS` per file reads it.
    """
    import ray.data

    manifest = check_shards(path, [split])
    files = shard_files(path, manifest, split)
    if not files:
        raise DataError(f"{path}: split {split!r} has no images")
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _shard_reader(), batch_size=1, batch_format="numpy", num_cpus=READ_TASK_CPUS
    )
    if max_images > 0:
        ds = ds.limit(max_images)
    ds.context.execution_options.preserve_order = True
    return ds


def dataset_config(datasets_to_split: tuple[str, ...] = ("train",)) -> ray.train.DataConfig:
    """The `ray.train.DataConfig` that splits ``train`` across workers deterministically.

    ``preserve_order`` makes `streaming_split(equal=True)` deal the same rows to the same worker every
    run (Ray Train would otherwise copy the driver's DataContext, where it is off). Shard locality is
    off for the same reason: on several nodes it would assign blocks by where they happen to be.
    "val" is not split (``equal=True`` would drop rows): every worker reads it whole and
    `iter_epoch(..., rank=, world_size=)` decodes only its own slice of each batch.
    """
    import copy

    import ray.train
    from ray.data import DataContext

    # The driver's options with preserve_order on (DataConfig.default_ingest_options() would copy the
    # same fields, through a constructor argument Ray 2.60 deprecates).
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return ray.train.DataConfig(
        datasets_to_split=list(datasets_to_split), execution_options=options, enable_shard_locality=False
    )


def steps_per_epoch(
    manifest: dict[str, Any], split: str, world_size: int, batch_size: int, max_images: int = 0
) -> int:
    """Batches each worker yields per epoch of ``split`` (matching `iter_epoch`).

    train: ``streaming_split(equal=True)`` gives every worker ``floor(rows / world_size)`` rows, and
    the last partial batch is dropped. val: unsplit; a worker's slices cover at most
    ``ceil(rows / world_size)`` rows (the last rank may yield one batch fewer). ``max_images`` as
    given to `read_split`.
    """
    rows = int(manifest["splits"][split]["num_images"])
    if max_images > 0:
        rows = min(rows, max_images)
    if split == "train":
        return (rows // world_size) // batch_size
    return math.ceil(rows / (batch_size * world_size))


def num_categories_max_id(path: str | Path) -> int:
    """The largest category id of a shard folder (``model.num_classes`` must exceed it)."""
    return max((int(c["id"]) for c in load_manifest(path).get("categories", [])), default=0)


# -- decoding ------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, image_id: int) -> int:
    """The augmentation seed of one image in one epoch: a stable 32-bit mix of the three."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, image_id]).generate_state(1)[0])


_RNG_LOCK = threading.Lock()


def split_deterministic_tail(transforms):
    """``(head, tail)`` of a `Compose` whose trailing `ToTensor`/`Normalize` (``tail``) draw no random
    numbers, so they can run outside the RNG lock; ``(transforms, None)`` for anything else."""
    if not isinstance(transforms, Compose):
        return transforms, None
    items = list(transforms.transforms)
    k = len(items)
    while k > 0 and isinstance(items[k - 1], (ToTensor, Normalize)):
        k -= 1
    return Compose(items[:k]), (Compose(items[k:]) if k < len(items) else None)


def apply_seeded(transforms, image: PIL.Image.Image, target: dict, seed: int | None):
    """``transforms(image, target)`` with Python's `random` and torch's CPU RNG seeded by ``seed``.

    DETR's transforms draw from those two global RNGs. The collate runs in a thread of the training
    process, so the random part is seeded, applied and the RNG states restored under a lock (the
    restore leaves the trainer's RNG streams as they were; a training thread drawing CPU random
    numbers at that very moment, e.g. CPU dropout, could still see the seeded state). The trailing
    tensor conversion and normalisation run outside the lock. ``seed=None`` applies the transforms
    unseeded.
    """
    if seed is None:
        return transforms(image, target)
    head, tail = split_deterministic_tail(transforms)
    with _RNG_LOCK:
        py_state, torch_state = random.getstate(), torch.random.get_rng_state()
        random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        try:
            image, target = head(image, target)
        finally:
            random.setstate(py_state)
            torch.random.set_rng_state(torch_state)
    return tail(image, target) if tail is not None else (image, target)


def decode_row(row: dict[str, Any], transforms=None, seed: int | None = None):
    """One shard row -> ``(image, target)`` exactly as `CocoDetection` builds it, then transformed."""
    image, target = decode_sample(row)
    if transforms is None:
        return image, target
    return apply_seeded(transforms, image, target, seed)


class _Undecoded:
    """A batch the collate was told to skip: kept as Arrow rows, decoded only if it is needed after all."""

    def __init__(self, table: pa.Table):
        self.table = table


class DetrCollate(ArrowBatchCollateFn):
    """Arrow batch of shard rows -> ``(images [B, 3, H, W], masks [B, H, W], targets)`` like `collate_fn`.

    Args:
        transforms: DETR's transforms for the split (`make_transforms`).
        seed, epoch: per-image seeding (`sample_seed`); ``seed=None`` leaves the RNGs alone (val).
        skip_batches: the first batches are returned as `_Undecoded` (no JPEG decode) for resuming.
        rank, world_size: with ``world_size > 1`` the incoming batch holds ``world_size`` slices of
            ``slice_size`` rows and only slice ``rank`` is decoded (unsplit val); an empty slice -> None.
    """

    def __init__(
        self,
        transforms,
        seed: int | None = None,
        epoch: int = 0,
        skip_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        slice_size: int = 0,
    ):
        self.transforms = transforms
        self.seed, self.epoch = seed, epoch
        self.skip_batches = skip_batches
        self.rank, self.world_size, self.slice_size = rank, world_size, slice_size
        self._calls = 0
        self._lock = threading.Lock()

    def __call__(self, table: pa.Table) -> Batch | _Undecoded | None:
        # Ray calls this from its prefetch thread(s) in batch order; with several threads the count
        # may be off by one or two, which only moves a decode into `iter_epoch` (see there).
        with self._lock:
            index, self._calls = self._calls, self._calls + 1
        if index < self.skip_batches:
            return _Undecoded(table)
        return self.decode(table)

    def decode(self, table: pa.Table) -> Batch | None:
        if self.world_size > 1:
            table = table.slice(self.rank * self.slice_size, self.slice_size)
        if table.num_rows == 0:
            return None
        samples = []
        for row in table.select(list(REQUIRED_COLUMNS)).to_pylist():
            seed = None if self.seed is None else sample_seed(self.seed, self.epoch, row["image_id"])
            samples.append(decode_row(row, self.transforms, seed))
        return collate_fn(samples)


def iter_epoch(
    shard: ray.data.DataIterator,
    cfg: Config,
    split: str,
    epoch: int,
    batch_size: int,
    skip_batches: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    prefetch_batches: int = 1,
) -> Iterator[Batch]:
    """One epoch of padded batches from a worker's shard: ``(images, masks, targets)`` as `collate_fn`.

    ``split="train"``: rows shuffled in a local buffer seeded with ``cfg.train.seed + epoch``, DETR's
    train transforms seeded per image by (seed, epoch, image_id), the last partial batch dropped.
    ``split="val"``: file order, val transforms, nothing dropped; pass ``rank``/``world_size`` when every
    worker iterates the whole (unsplit) val set, and each decodes only its slice of each batch.
    ``skip_batches=k`` yields exactly the batches after the first ``k`` of this epoch; the skipped
    ones are not decoded. ``batch_size`` is per worker.
    """
    from ray.data import DataContext

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected 'train' or 'val'")
    # The order guarantees come from the dataset's context (set by read_split / dataset_config);
    # the current one matters for iterators made in this process.
    DataContext.get_current().execution_options.preserve_order = True
    train = split == "train"
    slices = 1 if train else max(world_size, 1)
    collate = DetrCollate(
        make_transforms(split, cfg.data),
        seed=cfg.train.seed if train else None,  # val transforms are deterministic: no seeding, no lock
        epoch=epoch,
        skip_batches=skip_batches,
        rank=rank,
        world_size=slices,
        slice_size=batch_size,
    )
    batches = shard.iter_torch_batches(
        batch_size=batch_size * slices,
        collate_fn=collate,
        drop_last=train,
        local_shuffle_buffer_size=shuffle_buffer_size if train else None,
        local_shuffle_seed=cfg.train.seed + epoch if train else None,
        prefetch_batches=prefetch_batches,
        device="cpu",
    )
    for index, batch in enumerate(batches):
        if index < skip_batches:
            continue
        if isinstance(batch, _Undecoded):
            batch = collate.decode(batch.table)
        if batch is not None:
            yield batch
