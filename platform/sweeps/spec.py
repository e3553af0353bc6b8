"""Sweep files: ``sweeps/*.yaml`` read, validated and turned into Ray Tune's search space.

A sweep file names a base preset, fixed overrides, a search space over any config field (or over the
preset itself), the search algorithm, an optional ASHA scheduler, per-trial resources and where things
go. Every mistake is reported as ``FILE:LINE: key: what is wrong`` before anything starts.

```yaml
preset: tiny_sparse_detr_rho_0.1
set: {optim.lr: 2e-4}                  # fixed overrides (full or unique leaf names)
space:
  model.rho: [0.1, 0.2, 0.3]           # a list is a grid
  model.backbone: {grid: [resnet50, swin_t]}
  loss.enc_aux_loss_coef: {loguniform: [0.1, 10]}
search: {algorithm: grid}              # grid | random | optuna | optuna_multi
scheduler: {type: none}                # none | asha (on AP) | moasha (on the AP-GFLOPs front)
resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent: 2}
epochs: 12
data: /data/coco
```
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from sdetr.detector.config import Config, set_by_path
from sdetr.detector.cost import FIXED_INPUT_HW
from sdetr.detector.errors import ConfigError
from sdetr.detector.presets import get_preset
from sdetr.platform import resources

ALGORITHMS = ("grid", "random", "optuna", "optuna_multi")
SCHEDULERS = ("none", "asha", "moasha")
DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
PRESET_KEY = "preset"

TOP_KEYS = {
    "name": "the sweep's name (default: the file name)",
    "description": "free text",
    "preset": "the base preset",
    "set": "fixed config overrides {key: value}",
    "space": "the search space {key: values}",
    "search": "{algorithm, num_samples, seed}",
    "scheduler": "{type: none|asha|moasha, grace_period, reduction_factor, max_t}",
    "resources": "{workers, cpus_per_worker, gpus_per_worker, max_concurrent}",
    "epochs": "training epochs per trial",
    "data": "a COCO 2017 folder or a shard folder",
    "storage": "where the sweep's folder goes (default ./runs)",
    "mlflow": "{uri, experiment}",
    "cost": "{input: [H, W] | val, val_images, fps}",
    "checkpoint_every_steps": "also checkpoint every K steps within an epoch",
    "max_failures": "worker-group restarts per trial",
    "init_from": "fine-tune every trial from this checkpoint (official .pth, sdetr checkpoint or run folder)",
}
SECTION_KEYS = {
    "search": {"algorithm", "num_samples", "seed"},
    "scheduler": {"type", "grace_period", "reduction_factor", "max_t"},
    "resources": {"workers", "cpus_per_worker", "gpus_per_worker", "max_concurrent"},
    "mlflow": {"uri", "experiment"},
    "cost": {"input", "val_images", "fps"},
}


@dataclass
class Dimension:
    """One searched field: grid/choice take ``values``; uniform/loguniform/randint ``low`` and ``high``."""

    key: str  # a full config path ("model.rho") or "preset"
    kind: str
    values: list[Any] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    line: int = 0


@dataclass
class SweepSpec:
    path: str
    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)  # full path -> value
    space: list[Dimension] = field(default_factory=list)
    algorithm: str = "grid"
    num_samples: int = 1
    seed: int = 0
    scheduler: str = "none"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int | None = None  # the scheduler's last rung; None: the trials' epochs
    workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None
    epochs: int | None = None
    data: str | None = None
    storage: str | None = None
    mlflow_uri: str | None = None
    experiment: str = "sdetr-sweeps"
    cost_input: tuple[int, int] | None = FIXED_INPUT_HW  # None: the mean over val images
    cost_val_images: int = 10
    cost_fps: bool = True
    checkpoint_every_steps: int = 0
    max_failures: int = 2
    init_from: str | None = None  # train.init_from of every trial (absolute)
    lines: dict[str, int] = field(default_factory=dict)  # "resources.workers" -> line

    # -- what the trials are ------------------------------------------------------------------
    def where(self, key: str) -> str:
        line = self.lines.get(key) or self.lines.get(key.split(".", 1)[0])
        return f"{self.path}:{line}" if line else self.path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {key}: {message}")

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The full config of the trial with the sampled ``params`` ({key: value})."""
        cfg = get_preset(params.get(PRESET_KEY, self.preset))
        for key, value in self.overrides.items():
            set_by_path(cfg, key, copy.deepcopy(value), f"{self.where('set.' + key)}: set")
        for key, value in params.items():
            if key != PRESET_KEY:
                set_by_path(cfg, key, value, f"{self.where('space.' + key)}: space")
        if self.epochs is not None:
            cfg.optim.epochs = self.epochs
            cfg.optim.lr_drop = min(cfg.optim.lr_drop, self.epochs)
        if self.data is not None:
            cfg.data.root = self.data
        if self.init_from is not None:
            cfg.train.init_from = self.init_from
        return cfg

    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return grid * self.num_samples

    def grid_points(self) -> list[dict[str, Any]]:
        dims = [d for d in self.space if d.kind in ("grid", "choice")]
        return [
            dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.values for d in dims))
        ]

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space`` for the searched keys."""
        from ray import tune  # slow to import: sweep files are validated without Ray

        out: dict[str, Any] = {}
        for d in self.space:
            if d.kind == "grid":
                out[d.key] = tune.grid_search(list(d.values))
            elif d.kind == "choice":
                out[d.key] = tune.choice(list(d.values))
            elif d.kind == "uniform":
                out[d.key] = tune.uniform(d.low, d.high)
            elif d.kind == "loguniform":
                out[d.key] = tune.loguniform(d.low, d.high)
            else:
                out[d.key] = tune.randint(int(d.low), int(d.high) + 1)  # inclusive high, as written
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("lines")
        out["cost_input"] = list(self.cost_input) if self.cost_input else None
        return out


def parse_init_from(spec: SweepSpec, value: Any) -> None:
    """The sweep's ``init_from``: a checkpoint every trial is fine-tuned from. A local path must exist
    (made absolute: the trials run in other folders); a URI is checked when a trial reads it."""
    from pathlib import Path

    if not isinstance(value, str) or not value.strip():
        raise spec.error("init_from", f"expected the path of a checkpoint or run folder, got {value!r}")
    if "://" in value:
        spec.init_from = value
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise spec.error(
            "init_from", f"{value}: not found (expected an official .pth, an sdetr checkpoint or run folder)"
        )
    spec.init_from = str(path.resolve())


def plan_trials(spec: SweepSpec, cluster: dict[str, float]) -> tuple[float, int]:
    """CPUs per worker and the number of trials that can run at once on ``cluster`` (see resources.py);
    what does not fit is an error naming the sweep file's ``resources:`` line."""
    grid_trials = spec.num_trials() if spec.algorithm == "grid" else 0
    try:
        return resources.plan_trials(
            spec.workers,
            spec.cpus_per_worker,
            spec.gpus_per_worker,
            cluster,
            max_concurrent=spec.max_concurrent or 0,
            max_trials=grid_trials,
        )
    except resources.ResourceError as exc:
        raise spec.error("resources", f"a trial needs {exc}") from None


def max_epochs(spec: SweepSpec) -> int:
    """The epochs a trial trains when no scheduler stops it: the schedulers' ``max_t``."""
    return spec.max_t or spec.trial_config({}).optim.epochs
