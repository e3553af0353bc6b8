"""What a training run reports: the typed report every Ray Train worker passes to ``ray.train.report``
(read back by a sweep's trial driver and its results), and the per-epoch record of ``history.json`` /
``metrics.jsonl``. No torch, no Ray.

An epoch record is a flat dict, as written since the first release::

    {"epoch": 0-based index, "train_time_s", "train_loss", "train_loss_ce", ..., "AP", "AP50", ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdetr.platform.layout import HISTORY_FILE
from sdetr.platform.storage import Location

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class TrainReport:
    """A worker's position after a step or an epoch, with the metrics known there.

    ``epoch`` is the 0-based epoch the position is in and ``batches_done`` the batches of it trained;
    an end-of-epoch report (``epoch_end``) carries the epoch's record in ``metrics`` (train means,
    ``train_time_s``, COCO metrics when it was evaluated), a mid-epoch one only ``loss``.
    """

    epoch: int
    batches_done: int
    global_step: int
    epoch_end: bool
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def epochs_done(self) -> int:
        """Epochs finished, counted from 1 (an end-of-epoch report of epoch 0 means 1 done)."""
        return self.epoch + 1 if self.epoch_end else self.epoch

    def to_ray(self) -> dict[str, Any]:
        """The flat dict Ray Train takes (its reports are plain dicts of numbers)."""
        position = {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "epoch_end": self.epoch_end,
        }
        return {**self.metrics, **position}

    @classmethod
    def from_ray(cls, metrics: dict[str, Any]) -> TrainReport:
        position = ("epoch", "batches_done", "global_step", "epoch_end")
        return cls(
            epoch=int(metrics["epoch"]),
            batches_done=int(metrics["batches_done"]),
            global_step=int(metrics["global_step"]),
            epoch_end=bool(metrics["epoch_end"]),
            metrics={k: v for k, v in metrics.items() if k not in position},
        )


def epoch_record(epoch: int, train_time_s: float, train_means: dict[str, float]) -> dict[str, float]:
    """A new epoch record; evaluation adds the COCO metrics to it."""
    return {"epoch": epoch, "train_time_s": train_time_s, **{f"train_{k}": v for k, v in train_means.items()}}


def format_record(record: dict[str, float]) -> str:
    """The one line a person reads per epoch (epochs counted from 1, AP in percent)."""
    parts = [f"epoch {int(record['epoch']) + 1}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    for key in ("AP", "AP50", "AP75"):
        if key in record:
            parts.append(f"{key} {100.0 * record[key]:.1f} %")
    parts.append(f"{record['train_time_s']:.0f}s")
    return " | ".join(parts)


def mlflow_epoch_metrics(record: dict[str, float]) -> dict[str, float]:
    """An epoch record under MLflow's names: ``epoch/train_*`` and ``val/AP*``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key.startswith("train_"):
            out[f"epoch/{key}"] = value
        elif key.startswith(("AP", "AR")):
            out[f"val/{key}"] = value
        elif key != "epoch":
            out[key] = value
    return out


def read_history(run_dir: str | Path | Location) -> list[dict[str, Any]]:
    """The per-epoch records rank 0 wrote to ``<run_dir>/history.json`` (empty before the first epoch);
    ``run_dir`` a folder or a URI (storage.py)."""
    data = Location.of(run_dir).read_json(HISTORY_FILE, default={})
    return list(data.get("history", [])) if isinstance(data, dict) else []


def write_history(run_dir: str | Path | Location, epochs: int, history: list[dict[str, Any]]) -> None:
    """Atomically (a rename locally, one PUT on object storage), so readers never see half a file."""
    Location.of(run_dir).write_json(HISTORY_FILE, {"epochs": epochs, "history": history})
