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
scheduler: {type: none}                # none | asha
resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent: 2}
epochs: 12
data: /data/coco
```
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdetr.detector.config import Config, resolve_key, set_by_path
from sdetr.detector.errors import ConfigError

ALGORITHMS = ("grid", "random", "optuna", "optuna_multi")
SCHEDULERS = ("none", "asha")
DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
PRESET_KEY = "preset"
# What the multi-objective search optimises and the Pareto front is drawn over.
OBJECTIVES = {"AP": "max", "gflops": "min"}
FIXED_INPUT = (850, 1040)

TOP_KEYS = {
    "name": "the sweep's name (default: the file name)",
    "description": "free text",
    "preset": "the base preset",
    "set": "fixed config overrides {key: value}",
    "space": "the search space {key: values}",
    "search": "{algorithm, num_samples, seed}",
    "scheduler": "{type: none|asha, grace_period, reduction_factor}",
    "resources": "{workers, cpus_per_worker, gpus_per_worker, max_concurrent}",
    "epochs": "training epochs per trial",
    "data": "a COCO 2017 folder or a shard folder",
    "storage": "where the sweep's folder goes (default ./runs)",
    "mlflow": "{uri, experiment}",
    "cost": "{input: [H, W] | val, val_images, fps}",
    "checkpoint_every_steps": "also checkpoint every K steps within an epoch",
    "max_failures": "worker-group restarts per trial",
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
    workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None
    epochs: int | None = None
    data: str | None = None
    storage: str | None = None
    mlflow_uri: str | None = None
    experiment: str = "sdetr-sweeps"
    cost_input: tuple[int, int] | None = FIXED_INPUT  # None: the mean over val images
    cost_val_images: int = 10
    cost_fps: bool = True
    checkpoint_every_steps: int = 0
    max_failures: int = 2
    lines: dict[str, int] = field(default_factory=dict)  # "resources.workers" -> line

    # -- what the trials are ------------------------------------------------------------------
    def where(self, key: str) -> str:
        line = self.lines.get(key) or self.lines.get(key.split(".", 1)[0])
        return f"{self.path}:{line}" if line else self.path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {key}: {message}")

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The full config of the trial with the sampled ``params`` ({key: value})."""
        from sdetr.detector.presets import get_preset

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
        from ray import tune

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


# -- loading ---------------------------------------------------------------------------------------
def _line_map(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """``{"resources.workers": 12, "space.model.rho": 7, ...}``: 1-based lines of every mapping key."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out.setdefault(key, key_node.start_mark.line + 1)
            if isinstance(value_node, yaml.MappingNode) and prefix.count(".") < 1:
                _line_map(value_node, key + ".", out)
    return out


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; every error names the file, the line and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a sweep file is a mapping (preset:, space:, ...), got {type(data).__name__}"
        )
    return parse_sweep(data, str(path), _line_map(node))


def parse_sweep(data: dict[str, Any], path: str, lines: dict[str, int] | None = None) -> SweepSpec:
    spec = SweepSpec(path=path, name=Path(path).stem, preset="", lines=lines or {})

    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(TOP_KEYS)}"
            raise spec.error(str(key), f"unknown key{hint}")
    for section, allowed in SECTION_KEYS.items():
        value = data.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise spec.error(section, f"expected a mapping ({TOP_KEYS[section]}), got {value!r}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(sorted(allowed))}"
                raise spec.error(f"{section}.{key}", f"unknown key{hint}")

    if "name" in data:
        spec.name = _name(spec, data["name"])
    spec.preset = _preset(spec, "preset", data.get("preset"))
    _parse_set(spec, data.get("set") or {})
    _parse_space(spec, data.get("space") or {})
    _parse_search(spec, data.get("search") or {})
    _parse_scheduler(spec, data.get("scheduler") or {})
    _parse_resources(spec, data.get("resources") or {})
    if data.get("epochs") is not None:
        spec.epochs = _int(spec, "epochs", data["epochs"], minimum=1)
    for key in ("data", "storage"):
        if data.get(key) is not None:
            if not isinstance(data[key], str) or not data[key].strip():
                raise spec.error(key, f"expected a path, got {data[key]!r}")
            setattr(spec, key, data[key])
    mlflow = data.get("mlflow") or {}
    if mlflow.get("uri") is not None:
        spec.mlflow_uri = str(mlflow["uri"])
    if mlflow.get("experiment") is not None:
        spec.experiment = _name(spec, mlflow["experiment"], "mlflow.experiment")
    _parse_cost(spec, data.get("cost") or {})
    if data.get("checkpoint_every_steps") is not None:
        spec.checkpoint_every_steps = _int(spec, "checkpoint_every_steps", data["checkpoint_every_steps"], 0)
    if data.get("max_failures") is not None:
        spec.max_failures = _int(spec, "max_failures", data["max_failures"], minimum=-1)
    _check_trials(spec)
    return spec


def _name(spec: SweepSpec, value: Any, key: str = "name") -> str:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise spec.error(key, f"expected a non-empty name without '/', got {value!r}")
    return value.strip()


def _int(spec: SweepSpec, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise spec.error(key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _number(spec: SweepSpec, key: str, value: Any, minimum: float, strict: bool) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (value <= minimum if strict else value < minimum):
        raise spec.error(key, f"expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _preset(spec: SweepSpec, key: str, value: Any) -> str:
    from sdetr.detector.presets import PRESETS

    if value is None:
        raise spec.error(key, "missing: name the base preset (`sdetr model list` shows them)")
    if value not in PRESETS:
        close = difflib.get_close_matches(str(value), PRESETS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else "; `sdetr model list` shows them"
        raise spec.error(key, f"unknown preset {value!r}{hint}")
    return value


def _resolve(spec: SweepSpec, section: str, key: Any) -> str:
    try:
        return resolve_key(str(key), source="key")
    except ConfigError as exc:
        raise spec.error(f"{section}.{key}", str(exc).removeprefix(f"key {str(key)!r}: ")) from None


def _parse_set(spec: SweepSpec, data: Any) -> None:
    if not isinstance(data, dict):
        raise spec.error("set", f"expected a mapping {{key: value}}, got {data!r}")
    for key, value in data.items():
        full = _resolve(spec, "set", key)
        spec.lines.setdefault(f"set.{full}", spec.lines.get(f"set.{key}", 0))
        _check_value(spec, f"set.{key}", full, value)
        spec.overrides[full] = value


def _check_value(spec: SweepSpec, where: str, full: str, value: Any) -> None:
    """Type-check ``value`` for config field ``full`` and apply the domain rules a type cannot say."""
    from sdetr.detector.backbones.backbone import BACKBONES

    try:
        set_by_path(Config(), full, copy.deepcopy(value), "value")
    except ConfigError as exc:
        raise spec.error(where, str(exc).removeprefix(f"value {full}: ")) from None
    if full == "model.rho" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise spec.error(where, f"ρ must be in (0, 1], got {value!r}")
    if full == "model.backbone" and value not in BACKBONES:
        raise spec.error(where, f"unknown backbone {value!r}; valid ones: {', '.join(BACKBONES)}")


def _parse_space(spec: SweepSpec, data: Any) -> None:
    if not isinstance(data, dict):
        raise spec.error("space", f"expected a mapping {{key: values}}, got {data!r}")
    for key, value in data.items():
        where = f"space.{key}"
        full = PRESET_KEY if key == PRESET_KEY else _resolve(spec, "space", key)
        spec.lines.setdefault(f"space.{full}", spec.lines.get(where, 0))
        if isinstance(value, list):
            value = {"grid": value}
        if not isinstance(value, dict) or len(value) != 1:
            raise spec.error(
                where, f"expected a list (a grid) or one of {{{': ..., '.join(DIM_KINDS)}: ...}}"
            )
        ((kind, args),) = value.items()
        if kind not in DIM_KINDS:
            raise spec.error(where, f"unknown kind {kind!r}; use one of {', '.join(DIM_KINDS)}")
        dim = Dimension(key=full, kind=kind, line=spec.lines.get(where, 0))
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise spec.error(where, f"{kind}: expected a non-empty list of values, got {args!r}")
            for v in args:
                if full == PRESET_KEY:
                    _preset(spec, where, v)
                else:
                    _check_value(spec, where, full, v)
            dim.values = list(args)
        else:
            if full == PRESET_KEY:
                raise spec.error(where, "a preset is searched with grid or choice")
            if not isinstance(args, list) or len(args) != 2:
                raise spec.error(where, f"{kind}: expected [low, high], got {args!r}")
            low, high = (_number(spec, where, a, -math.inf, False) for a in args)
            if not low < high or (kind == "loguniform" and low <= 0):
                raise spec.error(
                    where, f"{kind}: need {'0 < ' if kind == 'loguniform' else ''}low < high, got {args}"
                )
            for v in (low, high) if kind != "randint" else (int(low), int(high)):
                _check_value(spec, where, full, v)
            dim.low, dim.high = low, high
        if any(d.key == full for d in spec.space):
            raise spec.error(where, f"{full} is searched twice")
        if full in spec.overrides:
            raise spec.error(where, f"{full} is both fixed in set: and searched in space:")
        spec.space.append(dim)


def _parse_search(spec: SweepSpec, data: dict) -> None:
    algorithm = data.get("algorithm", "grid")
    if algorithm not in ALGORITHMS:
        raise spec.error(
            "search.algorithm", f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    spec.algorithm = algorithm
    if "num_samples" in data:
        spec.num_samples = _int(spec, "search.num_samples", data["num_samples"], minimum=1)
    if "seed" in data:
        spec.seed = _int(spec, "search.seed", data["seed"], minimum=0)
    kinds = {d.kind for d in spec.space}
    if algorithm == "grid" and kinds - {"grid", "choice"}:
        raise spec.error(
            "search.algorithm",
            "grid search enumerates lists; sampled dimensions (uniform, loguniform, randint) need "
            "algorithm random, optuna or optuna_multi",
        )
    if algorithm == "grid":
        for d in spec.space:
            d.kind = "grid"  # a choice in a grid sweep is enumerated too
    if algorithm.startswith("optuna") and "grid" in kinds:
        raise spec.error(
            "search.algorithm", f"{algorithm} samples its own points: write grid dimensions as choice"
        )
    if not spec.space and algorithm != "grid":
        raise spec.error("space", f"algorithm {algorithm} needs at least one searched key")


def _parse_scheduler(spec: SweepSpec, data: dict) -> None:
    kind = data.get("type", "none")
    if kind not in SCHEDULERS:
        raise spec.error("scheduler.type", f"unknown scheduler {kind!r}; use none or asha")
    spec.scheduler = kind
    if "grace_period" in data:
        spec.grace_period = _int(spec, "scheduler.grace_period", data["grace_period"], minimum=1)
    if "reduction_factor" in data:
        spec.reduction_factor = _int(spec, "scheduler.reduction_factor", data["reduction_factor"], minimum=2)
    if kind == "asha" and spec.algorithm == "optuna_multi":
        # Reproduced on Ray 2.60: the searcher records the truncated scores of stopped trials as
        # final, so the "front" it optimises contains half-trained models.
        raise spec.error(
            "scheduler.type",
            "asha cannot be combined with algorithm optuna_multi: trials ASHA stops early reach the "
            "multi-objective searcher with truncated scores; use scheduler none, or a single-objective "
            "search",
        )


def _parse_resources(spec: SweepSpec, data: dict) -> None:
    if "workers" in data:
        spec.workers = _int(spec, "resources.workers", data["workers"], minimum=1)
    if data.get("cpus_per_worker") is not None:
        spec.cpus_per_worker = _number(spec, "resources.cpus_per_worker", data["cpus_per_worker"], 0, True)
    if "gpus_per_worker" in data:
        spec.gpus_per_worker = _number(spec, "resources.gpus_per_worker", data["gpus_per_worker"], 0, False)
    if data.get("max_concurrent") is not None:
        spec.max_concurrent = _int(spec, "resources.max_concurrent", data["max_concurrent"], minimum=1)


def _parse_cost(spec: SweepSpec, data: dict) -> None:
    value = data.get("input", list(FIXED_INPUT))
    if value == "val":
        spec.cost_input = None
    elif (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in value)
    ):
        spec.cost_input = (value[0], value[1])
    else:
        raise spec.error("cost.input", f"expected [height, width] (>= 32 px) or val, got {value!r}")
    if "val_images" in data:
        spec.cost_val_images = _int(spec, "cost.val_images", data["val_images"], minimum=1)
    if "fps" in data:
        if not isinstance(data["fps"], bool):
            raise spec.error("cost.fps", f"expected true or false, got {data['fps']!r}")
        spec.cost_fps = data["fps"]


def _check_trials(spec: SweepSpec) -> None:
    """Every enumerable trial must build a valid model (e.g. ρ > 0 needs a two-stage preset)."""
    from sdetr.detector.build import validate_model_config

    for params in spec.grid_points() or [{}]:
        try:
            validate_model_config(spec.trial_config(params).model)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or f"preset {spec.preset}"
            key = next((f"space.{k}" for k in params), "preset")
            raise spec.error(key, f"the trial {shown} is invalid: {exc}") from None


# -- resources -------------------------------------------------------------------------------------
TRIAL_DRIVER_CPUS = 0.01  # the Tune trial actor only waits on its TorchTrainer


def plan_trials(spec: SweepSpec, cluster: dict[str, float], data_headroom: float) -> tuple[float, int]:
    """CPUs per worker and the number of trials that can run at once on ``cluster``.

    Tune does not see the Train workers' placement groups, so without this cap it would start more
    trials than the cluster holds and they would wait on each other's resources.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    where = "resources"
    if spec.gpus_per_worker > 0 and spec.workers * spec.gpus_per_worker > gpus + 1e-9:
        raise spec.error(
            where,
            f"{spec.workers} workers x {spec.gpus_per_worker:g} GPUs = "
            f"{spec.workers * spec.gpus_per_worker:g} GPUs per trial, but the Ray cluster has {gpus:g}",
        )
    usable = cpus - data_headroom
    per_worker = spec.cpus_per_worker
    if per_worker is None and spec.workers > cpus:
        raise spec.error(
            where,
            f"a trial needs {spec.workers} workers but the Ray cluster has {cpus:g} CPUs; use at most "
            f"{int(cpus)} workers (or pack several onto a CPU with an explicit cpus_per_worker)",
        )
    if per_worker is None:
        per_worker = math.floor(min(1.0, usable / spec.workers) * 100) / 100
    per_trial = spec.workers * per_worker + TRIAL_DRIVER_CPUS
    if per_worker <= 0 or per_trial > usable + 1e-9:
        raise spec.error(
            where,
            f"a trial needs {spec.workers} workers x {per_worker:g} CPUs, but the Ray cluster has {cpus:g} "
            f"CPUs and {data_headroom:g} must stay free for Ray Data's reads; use fewer workers or a "
            f"smaller cpus_per_worker (at most {max(usable - TRIAL_DRIVER_CPUS, 0) / spec.workers:.2f})",
        )
    fit = int((usable + 1e-9) // per_trial)
    if spec.gpus_per_worker > 0:
        fit = min(fit, int((gpus + 1e-9) // (spec.workers * spec.gpus_per_worker)))
    concurrent = max(
        1, min(fit, spec.max_concurrent or fit, spec.num_trials() if spec.algorithm == "grid" else fit)
    )
    return per_worker, concurrent
