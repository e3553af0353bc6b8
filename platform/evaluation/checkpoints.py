"""Finding and loading a trained checkpoint from what a user points at, and the config it was trained with.

A checkpoint path may be::

    model.pth                       a checkpoint file: sdetr's (it stores its ``config``) or an official
                                    Sparse DETR one (it stores the training script's ``args``)
    <run>/checkpoint_epoch0003_step000120/   a Ray checkpoint folder (holding ``state.pth``)
    <run>/                          a run folder: its newest readable checkpoint, i.e. the highest
                                    (epoch, step, retry) of ``checkpoint_epochNNNN_stepNNNNNN[-k]/state.pth``
                                    (Ray runs) or ``checkpoints/checkpoint_epochNNNN.pth`` (single process)

Any of them may be a URI on object storage (``s3://bucket/runs/demo/trials/<id>``): `fetch_remote`
copies what is needed (the run's records and its newest readable checkpoint) into a local folder of
the same shape, and maps local paths back to URIs.

Used by ``sdetr eval``; nothing here is specific to evaluation (no data, no model building).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdetr.detector.checkpoint import model_config_from_official_args, read_checkpoint
from sdetr.detector.config import Config
from sdetr.detector.errors import CheckpointError
from sdetr.detector.presets import PRESETS, get_preset
from sdetr.platform.layout import (
    CHECKPOINT_GLOB,
    CHECKPOINT_NAME,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    RUN_RECORD,
    STATE_FILE,
    TRIAL_RECORD,
)
from sdetr.platform.storage import Location

RUN_FILES = (RUN_RECORD, TRIAL_RECORD, CONFIG_FILE)  # what marks (and describes) a run folder

# Official backbone name -> the prefix of the sdetr preset with the same architecture.
_OFFICIAL_PRESET_PREFIX = {"resnet50": "r50", "swin_t": "swint"}


@dataclass
class LoadedCheckpoint:
    """A checkpoint read from disk.

    Attributes:
        file: the ``.pth`` file that was read (absolute).
        run_dir: the run folder holding it, or None for a file outside any run folder.
        state: the checkpoint dict (``model`` weights, and ``config`` or ``args``, optimizer state...).
    """

    file: Path
    run_dir: Path | None
    state: dict[str, Any]

    @property
    def official(self) -> bool:
        """An official Sparse DETR checkpoint: it stores the training script's ``args``, no sdetr config
        (so nothing sdetr can read says where its data is)."""
        return "config" not in self.state and "args" in self.state

    @property
    def config(self) -> Config:
        """The `Config` it was trained with (`config_of_checkpoint`)."""
        return config_of_checkpoint(self.state, self.file)


def _checkpoint_order(file: Path) -> tuple:
    """Sort key of a checkpoint file: (epoch, step, retry) from its (folder) name, then mtime."""
    name = file.parent.name if file.name == STATE_FILE else file.name
    m = CHECKPOINT_NAME.match(name)
    numbers = tuple(int(g) if g else -1 for g in m.groups()) if m else (-1, -1, -1)
    return (*numbers, file.stat().st_mtime)


def checkpoint_candidates(folder: Path) -> list[Path]:
    """The checkpoint files a folder stands for, newest first: its own ``state.pth`` (a Ray checkpoint
    folder), else Ray's ``checkpoint_epoch*/state.pth`` and ``checkpoint_epoch*.pth`` in it or in its
    ``checkpoints/`` (a run folder). Empty when there is none."""
    if (folder / STATE_FILE).is_file():
        return [folder / STATE_FILE]
    found = [
        d / STATE_FILE
        for d in folder.iterdir()
        if CHECKPOINT_NAME.match(d.name) and (d / STATE_FILE).is_file()
    ]
    for sub in (folder, folder / CHECKPOINTS_DIR):
        found += [p for p in sub.glob(CHECKPOINT_GLOB) if p.is_file()]
    return sorted(found, key=_checkpoint_order, reverse=True)


def run_folder_of(file: Path) -> Path | None:
    """The run folder holding a checkpoint file, or None. Ray's ``<run>/checkpoint_*/state.pth`` and the
    single-process ``<run>/checkpoints/*.pth`` are both two levels down; a run folder has a run record,
    a trial record or a config.yaml."""
    for folder in (file.parent, file.parent.parent):
        if any((folder / name).is_file() for name in (RUN_RECORD, TRIAL_RECORD, CONFIG_FILE)):
            return folder
    return None


def _files_of(path: Path) -> list[Path]:
    """``[path]`` for a file, the candidates (newest first) for a folder; a `CheckpointError` for none."""
    if not path.exists():
        raise CheckpointError(
            f"{path}: checkpoint not found (expected a .pth file, a checkpoint or run folder)"
        )
    if path.is_file():
        return [path]
    candidates = checkpoint_candidates(path)
    if not candidates:
        raise CheckpointError(
            f"{path}: no checkpoint in this folder (looked for {STATE_FILE}, "
            f"checkpoint_epoch*/{STATE_FILE} and {CHECKPOINTS_DIR}/{CHECKPOINT_GLOB})"
        )
    return candidates


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint file, its run folder or None)`` for a file or a folder, without reading anything:
    a folder's newest checkpoint by name (`load_checkpoint` also skips a torn one)."""
    file = _files_of(Path(path).expanduser())[0].resolve()
    return file, run_folder_of(file)


def load_checkpoint(path: str | Path, log=print) -> LoadedCheckpoint:
    """Read the checkpoint a file or folder stands for; in a folder, the newest one that reads (torn or
    corrupt ones, e.g. of a killed run, are skipped with a warning through ``log``)."""
    path = Path(path).expanduser()
    candidates = _files_of(path)
    errors = []
    for file in candidates:
        try:
            state = read_checkpoint(file)
        except CheckpointError as exc:
            if path.is_file():
                raise
            log(f"warning: skipping unreadable checkpoint: {exc}")
            errors.append(str(exc))
            continue
        file = file.resolve()
        return LoadedCheckpoint(file=file, run_dir=run_folder_of(file), state=state)
    raise CheckpointError(f"{path}: none of its {len(candidates)} checkpoints is readable ({errors[0]})")


def config_of_checkpoint(state: dict[str, Any], file: Path) -> Config:
    """The `Config` a checkpoint was trained with: its ``config`` (sdetr) or, for an official Sparse DETR
    checkpoint, its ``args`` mapped onto the model of the matching r50 / swint preset (the rest of the
    config, data.root included, is that preset's)."""
    if isinstance(state.get("config"), dict):
        return Config.from_dict(state["config"], source=f"{file} (its saved config)")
    if "args" in state:
        model = model_config_from_official_args(state["args"])
        prefix = _OFFICIAL_PRESET_PREFIX.get(model.backbone, model.backbone)
        name = f"{prefix}_sparse_detr_rho_{model.rho:g}"
        cfg = get_preset(name) if name in PRESETS else Config(preset="official")
        cfg.model = model
        return cfg
    raise CheckpointError(
        f"{file}: not an sdetr or official Sparse DETR checkpoint (it has neither 'config' nor 'args'; "
        f"keys: {', '.join(sorted(map(str, state))[:8])})"
    )


# -- checkpoints on object storage -----------------------------------------------------------------
@dataclass
class RemoteCheckpoint:
    """A local copy of a checkpoint that lives at a URI.

    Attributes:
        local: the local path standing for what the user pointed at (file or folder), for
            `load_checkpoint`.
        run: the run folder on storage, or None (a checkpoint outside any run folder).
        local_root: the local folder mirroring ``run`` (or the checkpoint's folder).
        remote_root: the URI ``local_root`` mirrors.
    """

    local: Path
    run: Location | None
    local_root: Path
    remote_root: str

    def uri_of(self, local: str | Path) -> str:
        """The URI a path inside the local copy stands for."""
        rel = Path(local).resolve().relative_to(self.local_root.resolve()).as_posix()
        return self.remote_root if rel == "." else f"{self.remote_root}/{rel}"


def _ray_checkpoint_dirs(folder: Location) -> list[str]:
    """Names of the ``checkpoint_epoch*`` folders of a run folder, newest first (epoch, step, retry)."""

    def order(name: str) -> tuple:
        return tuple(int(g) if g else -1 for g in CHECKPOINT_NAME.match(name).groups())

    names = [d for d in folder.list_dirs() if CHECKPOINT_NAME.match(d)]
    return sorted(names, key=order, reverse=True)


def fetch_remote(uri: str, dest: Path, log=print) -> RemoteCheckpoint:
    """Copy the checkpoint ``uri`` stands for (a file, a Ray checkpoint folder or a run folder) into
    ``dest``: the run folder's records and, for a folder, its newest readable checkpoint (a torn newer
    one is skipped with a warning, as `load_checkpoint` does locally)."""
    target = Location(uri).check()
    if not target.exists():
        raise CheckpointError(
            f"{uri}: checkpoint not found (expected a .pth file, a checkpoint or run folder)"
        )
    is_file = target.is_file("")
    parent = target.parent()
    # The run folder: the target itself (a run folder), or one or two levels up, as `run_folder_of`.
    ups = [parent, parent.parent()] if is_file else [target, parent]
    run = next((f for f in ups if any(f.is_file(n) for n in RUN_FILES)), None)
    root = run or (parent if is_file else target)
    local_root = dest / (root.name or "checkpoint")
    mirror = RemoteCheckpoint(local=local_root, run=run, local_root=local_root, remote_root=root.uri)

    def local_of(loc: Location, rel: str = "") -> Path:
        tail = f"{loc.uri}/{rel}".rstrip("/")[len(root.uri) :].strip("/")
        return local_root / tail if tail else local_root

    def copy(loc: Location, rel: str) -> Path:
        return loc.download(rel, local_of(loc, rel))

    for name in RUN_FILES if run is not None else ():
        if run.is_file(name):
            copy(run, name)
    if is_file:
        mirror.local = copy(parent, target.name)
        return mirror
    if target.is_file(STATE_FILE):  # a Ray checkpoint folder
        copy(target, STATE_FILE)
        mirror.local = local_of(target)
        return mirror
    # A run folder: its newest checkpoint that reads.
    candidates = [(target.child(d), STATE_FILE) for d in _ray_checkpoint_dirs(target)]
    singles = sorted(
        (n for n in target.list_files(CHECKPOINTS_DIR) if CHECKPOINT_NAME.match(n)), reverse=True
    )
    candidates += [(target.child(CHECKPOINTS_DIR), n) for n in singles]
    candidates = [(loc, rel) for loc, rel in candidates if loc.is_file(rel)]
    if not candidates:
        raise CheckpointError(
            f"{uri}: no checkpoint in this folder (looked for {STATE_FILE}, "
            f"checkpoint_epoch*/{STATE_FILE} and {CHECKPOINTS_DIR}/{CHECKPOINT_GLOB})"
        )
    errors = []
    for loc, rel in candidates:
        local = copy(loc, rel)
        try:
            read_checkpoint(local)
            return mirror
        except CheckpointError as exc:
            log(f"warning: skipping unreadable checkpoint {loc.uri}/{rel}: {exc}")
            errors.append(str(exc))
            local.unlink()
    raise CheckpointError(f"{uri}: none of its {len(candidates)} checkpoints is readable ({errors[0]})")
