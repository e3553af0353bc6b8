"""Finding and loading a trained checkpoint from what a user points at, and the config it was trained with.

A checkpoint path may be::

    model.pth                       a checkpoint file: sdetr's (it stores its ``config``) or an official
                                    Sparse DETR one (it stores the training script's ``args``)
    <run>/checkpoint_epoch0003_step000120/   a Ray checkpoint folder (holding ``state.pth``)
    <run>/                          a run folder: its newest readable checkpoint, i.e. the highest
                                    (epoch, step, retry) of ``checkpoint_epochNNNN_stepNNNNNN[-k]/state.pth``
                                    (Ray runs) or ``checkpoints/checkpoint_epochNNNN.pth`` (single process)

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
