"""Reading and validating sweep files: every mistake is refused before anything starts, naming the file,
the line and the key (unknown keys with a suggestion, values of the wrong type, rho outside (0, 1], an
unknown backbone or preset, trials that would build an invalid model)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from sdetr.detector.backbones.backbone import BACKBONES
from sdetr.detector.build import validate_model_config
from sdetr.detector.config import Config, resolve_key, set_by_path
from sdetr.detector.cost import FIXED_INPUT_HW
from sdetr.detector.errors import ConfigError
from sdetr.detector.presets import PRESETS
from sdetr.platform.sweeps.spec import (
    ALGORITHMS,
    DIM_KINDS,
    PRESET_KEY,
    SCHEDULERS,
    SECTION_KEYS,
    TOP_KEYS,
    Dimension,
    SweepSpec,
    max_epochs,
    parse_init_from,
)


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
    if data.get("init_from") is not None:
        parse_init_from(spec, data["init_from"])
    if data.get("max_failures") is not None:
        spec.max_failures = _int(spec, "max_failures", data["max_failures"], minimum=-1)
    _check_trials(spec)
    _check_scheduler(spec)
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
        raise spec.error("scheduler.type", f"unknown scheduler {kind!r}; use one of {', '.join(SCHEDULERS)}")
    spec.scheduler = kind
    if "grace_period" in data:
        spec.grace_period = _int(spec, "scheduler.grace_period", data["grace_period"], minimum=1)
    if "reduction_factor" in data:
        spec.reduction_factor = _int(spec, "scheduler.reduction_factor", data["reduction_factor"], minimum=2)
    if data.get("max_t") is not None:
        spec.max_t = _int(spec, "scheduler.max_t", data["max_t"], minimum=1)
    if kind == "asha" and spec.algorithm == "optuna_multi":
        # Reproduced on Ray 2.60: ASHA ranks by AP alone and stops the cheap, less accurate trials the
        # front is made of; MOASHA ranks by the front.
        raise spec.error(
            "scheduler.type",
            "asha cannot be combined with algorithm optuna_multi: it ranks trials by AP alone and stops "
            "the cheap trials the AP-GFLOPs front is made of; use scheduler moasha",
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
    value = data.get("input", list(FIXED_INPUT_HW))
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
    for params in spec.grid_points() or [{}]:
        try:
            validate_model_config(spec.trial_config(params).model)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or f"preset {spec.preset}"
            key = next((f"space.{k}" for k in params), "preset")
            raise spec.error(key, f"the trial {shown} is invalid: {exc}") from None


def _check_scheduler(spec: SweepSpec) -> None:
    """Rungs must lie within the trials' epochs (checked once the epochs are known)."""
    if spec.scheduler == "none":
        return
    last = max_epochs(spec)
    if spec.grace_period > last:
        raise spec.error(
            "scheduler.grace_period",
            f"{spec.grace_period} is beyond the {last} epochs a trial trains (no rung to stop at)",
        )
