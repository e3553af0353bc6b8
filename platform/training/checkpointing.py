"""Checkpoints and the RNG: what a run saves to resume exactly, which checkpoint it resumes from, and
which config changes still make it the same run. Shared by the single-process trainer and Ray workers."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdetr.detector.checkpoint import read_checkpoint
from sdetr.detector.config import Config
from sdetr.detector.errors import CheckpointError, ConfigError
from sdetr.platform.layout import CHECKPOINT_GLOB, EVENTS_FILE, STATE_FILE, TMP_MARK, append_jsonl
from sdetr.platform.storage import Location, is_uri

# Fields that may change between attempts of one run without making it a different run.
RESUMABLE_CHANGES = (
    "optim.epochs",
    "train.progress",
    "train.time_limit_s",
    "data.num_workers",
    "train.output_dir",
    "train.channels_last",  # memory order only
)
# On top of those, for Ray runs: how often to checkpoint and log.
RESUMABLE_DISTRIBUTED = (
    *RESUMABLE_CHANGES,
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
)


def config_differences(saved: dict, cfg: Config, resumable=RESUMABLE_CHANGES) -> list[str]:
    """Dotted keys, other than ``resumable`` ones, whose values differ between a saved config and ``cfg``."""
    before = Config.from_dict(saved, source="checkpoint config").flat()
    now = cfg.flat()
    return [k for k in now if k not in resumable and before.get(k) != now[k]]


def check_schedule(cfg: Config) -> None:
    """Refuse counts that would train nothing (``--epochs 0``) or fail later with a raw error."""
    for key, flag, value, low in (
        ("optim.epochs", "--epochs", cfg.optim.epochs, 1),
        ("optim.batch_size", None, cfg.optim.batch_size, 1),
        ("data.num_workers", None, cfg.data.num_workers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            name = f"{key} ({flag})" if flag else key
            raise ConfigError(f"{name} = {value!r}: must be an integer of at least {low}")


def record_event(run_dir: Path | str | None, **fields) -> None:
    """One line of ``events.jsonl`` (starts, checkpoints, resumes, skipped checkpoints), for operators.

    ``run_dir``: the run folder, local or on object storage. Object stores cannot append: the file is
    read and written again (a few lines per checkpoint), and a store that fails only costs the line.
    """
    if run_dir is None:
        return
    line = {"time": time.time(), **fields}
    if not is_uri(run_dir):
        append_jsonl(Path(run_dir) / EVENTS_FILE, line)
        return
    try:
        folder = Location(str(run_dir))
        folder.write_text(EVENTS_FILE, (folder.read_text(EVENTS_FILE) or "") + json.dumps(line) + "\n")
    except (OSError, ConfigError) as exc:
        print(f"warning: could not add to {run_dir}/{EVENTS_FILE}: {exc}")


# -- RNG -------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- single-process checkpoints -------------------------------------------------------------------
def resume_checkpoint(ckpt_dir: Path, restart: bool = False, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None for a fresh run.

    A torn or corrupt newer one is skipped with a warning (the run resumes from the one before). When
    there are checkpoints but none loads, the run is not silently overwritten: a `CheckpointError`,
    unless ``restart`` (``--restart``), which removes them.
    """
    files = sorted(ckpt_dir.glob(CHECKPOINT_GLOB), reverse=True) if ckpt_dir.is_dir() else []
    errors = []
    for path in files:
        try:
            return path, read_checkpoint(path)
        except CheckpointError as exc:
            log(f"warning: skipping unreadable checkpoint (resuming from an earlier one): {exc}")
            errors.append(str(exc))
    if not files:
        return None
    if not restart:
        raise CheckpointError(
            f"{ckpt_dir}: none of its {len(files)} checkpoint(s) can be read ({errors[0]}); pass "
            "--restart to train this run again from scratch (it overwrites the run), or another --output"
        )
    log(f"--restart: removing {len(files)} unreadable checkpoint(s) of {ckpt_dir} and training from scratch")
    for path in files:
        path.unlink(missing_ok=True)
    return None


def remove_interrupted_writes(folder: Path, log=print) -> int:
    """Delete the temporary files of writes killed mid-way (`save_atomic`'s ``.<name>.*.tmp``, the
    atomic writer's ``.<name>.tmp-<pid>``) under ``folder``; returns how many."""
    if not folder.is_dir():
        return 0
    found = [p for pattern in (".*.tmp", f".*{TMP_MARK}*") for p in folder.rglob(pattern) if p.is_file()]
    size = 0
    for path in found:
        try:
            size += path.stat().st_size
            path.unlink()
        except OSError:
            continue  # a concurrent writer's file that it renamed meanwhile
    if found:
        log(f"removed {len(found)} temporary file(s) of interrupted writes ({size / 1e6:.1f} MB) in {folder}")
    return len(found)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in sorted(ckpt_dir.glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink(missing_ok=True)


# -- Ray checkpoints -------------------------------------------------------------------------------
def reported_checkpoints() -> list:
    """Registered checkpoints, newest first. Only these: a report made just before a crash may be on
    disk without ever having been registered, so the newest folder on disk is not trusted."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    latest = ray.train.get_checkpoint()
    try:
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED
        )
        older = [r.checkpoint for r in reversed(reported)]
    except Exception:  # an older Ray without the API: the latest alone
        older = []
    ordered = [latest] if latest is not None else []
    ordered += [c for c in older if latest is None or c.path != latest.path]
    return ordered


def restore_state(
    rank: int, world: int, run_dir: Path | str | None
) -> tuple[dict | None, str | None, set[str]]:
    """The newest readable checkpoint's state (rank 0 picks it, every rank loads it), its path, and
    the folder names of all registered checkpoints (new checkpoints must not reuse them)."""
    import torch.distributed as dist

    chosen = None
    state = None
    taken: set[str] = set()
    if rank == 0:
        candidates = reported_checkpoints()
        taken = {Path(c.path).name for c in candidates}
        for ckpt in candidates:
            try:
                with ckpt.as_directory() as folder:
                    state = read_checkpoint(Path(folder) / STATE_FILE)
                chosen = ckpt
                break
            except CheckpointError as exc:
                print(f"warning: skipping unreadable checkpoint {ckpt.path}: {exc}")
                record_event(run_dir, event="skipped_checkpoint", checkpoint=ckpt.path, reason=str(exc))
        if candidates and chosen is None:
            raise CheckpointError(
                f"none of the {len(candidates)} registered checkpoints can be read "
                f"(newest: {candidates[0].path}); start a new run with another --name"
            )
    if world > 1:
        box = [chosen, taken]
        dist.broadcast_object_list(box, src=0)
        chosen, taken = box
    if chosen is None:
        return None, None, taken
    if state is None:
        with chosen.as_directory() as folder:
            state = read_checkpoint(Path(folder) / STATE_FILE)
    return state, chosen.path, taken
