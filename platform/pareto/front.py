"""Pareto front of a sweep: which trials are worth their cost (AP up, GFLOPs down).

A sweep trains several detectors; each ends as a `ParetoPoint`. `mark_front` decides which points are on
the front under the sweep objectives (`sdetr.platform.layout.OBJECTIVES`); files.py, plot.py and html.py
turn the points into a terminal table, a CSV, a PNG and an interactive page.

Only trials that finished compete for the front: a trial stopped early by the scheduler, one that
failed or one still running has numbers from a partial schedule, and letting it dominate would hide
a finished trial that is genuinely better per GFLOP. Those points are still written, marked by status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sdetr.detector.errors import ConfigError, DataError
from sdetr.detector.presets import LITE_LAYOUTS
from sdetr.platform.layout import OBJECTIVES

STATUSES = ("completed", "stopped_early", "error", "running")
SOURCES = ("trial", "dynamic_rho")
_NUMERIC = ("AP", "gflops", "rho", "fps", "params")
_MODES = ("max", "min")


def _objective_value(point: Mapping[str, Any], index: int, name: str) -> float | None:
    """The value as a float, or None when it is missing / None / NaN (such a point cannot compete)."""
    value = point.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"Pareto point {index}: objective {name!r} = {value!r} is not a number") from None
    return None if math.isnan(number) else number


def _check_objectives(objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ConfigError("Pareto front: no objectives given (e.g. {'AP': 'max', 'gflops': 'min'})")
    for name, mode in objectives.items():
        if mode not in _MODES:
            raise ConfigError(f"Pareto objective {name!r}: mode {mode!r} must be 'max' or 'min'")


def pareto_mask(
    points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str] = OBJECTIVES
) -> list[bool]:
    """True for the points on the front. A point is dominated if another is at least as good in every
    objective and strictly better in one. Exact duplicates do not dominate each other (both stay on the
    front if undominated). Points with a missing/None/NaN objective value are never on the front and do
    not dominate. ``mode`` must be 'max' or 'min' (else ConfigError naming the objective). Works for any
    number of objectives (mixed max/min), one point, zero points.

    Quadratic in the number of points, which is fine for sweeps (tens to a few thousand trials) and
    keeps the dominance rule obvious.
    """
    _check_objectives(objectives)
    signs = [1.0 if mode == "max" else -1.0 for mode in objectives.values()]
    # Every objective turned into "larger is better"; None marks a point that cannot compete.
    vectors: list[tuple[float, ...] | None] = []
    for i, point in enumerate(points):
        values = [_objective_value(point, i, name) for name in objectives]
        ok = all(v is not None for v in values)
        vectors.append(tuple(s * v for s, v in zip(signs, values)) if ok else None)  # type: ignore[operator]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    valid = [v for v in vectors if v is not None]
    return [v is not None and not any(dominates(w, v) for w in valid) for v in vectors]


_BACKBONE_SHORT = {"swin_t": "Swin-T", "swin_s": "Swin-S", "swin_b": "Swin-B"}
# Official-style preset names, shortened for a plot label (longest first: they share prefixes).
_PRESET_PREFIX = re.compile(r"^(r\d+|swint|swin_t|tiny|mini)_")
_PRESET_PARTS = (
    ("_plus_iterative_bbox_refinement", "+refine"),
    ("_plus_plus_two_stage", "+two-stage"),
    ("_detr", ""),
)
# What a person calls each detector family (the paper's names), by the preset name without its prefix.
_FAMILIES = (
    ("deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage", "Deformable+refine+two-stage"),
    ("deformable_detr_plus_iterative_bbox_refinement", "Deformable+refine"),
    ("deformable_detr", "Deformable"),
    ("efficient_detr", "Efficient"),
    ("faster_rcnn_fpn", "Faster R-CNN"),
    ("detr", "DETR"),
)


def short_backbone(backbone: str) -> str:
    """``resnet50`` -> ``R50``, ``swin_t`` -> ``Swin-T``; anything else unchanged."""
    m = re.fullmatch(r"resnet(\d+)", backbone)
    if m:
        return f"R{m.group(1)}"
    return _BACKBONE_SHORT.get(backbone, backbone)


def short_preset(preset: str) -> str:
    """``r50_deformable_detr_plus_iterative_bbox_refinement`` -> ``deformable+refine``: the backbone is
    shown separately, and the full name does not fit next to a point."""
    name = _PRESET_PREFIX.sub("", preset)
    for long, short in _PRESET_PARTS:
        name = name.replace(long, short)
    return name.replace("_", " ").strip()


def family(preset: str, rho: float | None = None) -> str:
    """The detector as the papers name it: ``Sparse ρ=0.1``, ``Deformable``, ``Lite H3L1-(3+1)x2``,
    ``Efficient``; a sparsified model (ρ > 0) is Sparse whatever its preset; otherwise the shortened
    preset name (``dense`` without one). A preset that a sweep changed keeps its changed fields:
    ``mini_deformable_detr (num_queries=100)`` -> ``Deformable (num_queries=100)``."""
    if rho:
        return f"Sparse ρ={rho:g}"
    base, bracket, changed = preset.partition(" (")
    if bracket:
        return f"{family(base)} ({changed}"
    name = _PRESET_PREFIX.sub("", preset)
    lite = re.fullmatch(r"lite_detr_(\w+)", name)
    if lite:
        return f"Lite {LITE_LAYOUTS.get(lite.group(1), lite.group(1))}"
    for key, text in _FAMILIES:
        if name == key:
            return text
    return short_preset(preset) or "dense"


def label_for(rho: float | None, backbone: str, preset: str = "") -> str:
    """``Sparse ρ=0.1 R50``, ``Deformable R18``, ``Lite H3L1-(3+1)x2 Swin-T``: what the point is, then its
    backbone."""
    return f"{family(preset, rho)} {short_backbone(backbone)}".strip()


@dataclass
class ParetoPoint:
    """One trial (or one ρ of a dynamically sparsified checkpoint) with its accuracy and cost.

    Numbers are coerced to float on construction (MLflow params and CSV cells arrive as strings) and NaN
    becomes None, so every writer deals with one "missing" value. An empty label is filled in from
    `label_for`.
    """

    label: str
    AP: float | None
    gflops: float | None
    trial_id: str = ""
    run_id: str = ""
    preset: str = ""
    backbone: str = ""
    rho: float | None = None
    fps: float | None = None
    params: float | None = None
    status: str = "completed"
    source: str = "trial"
    extra: dict[str, Any] = field(default_factory=dict)
    on_front: bool = False

    def __post_init__(self) -> None:
        for name in _NUMERIC:
            value = getattr(self, name)
            if value is None or value == "":
                setattr(self, name, None)
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise DataError(f"Pareto point {self._name()}: {name} = {value!r} is not a number") from None
            setattr(self, name, None if math.isnan(number) else number)
        if self.status not in STATUSES:
            raise DataError(
                f"Pareto point {self._name()}: status {self.status!r} is not one of {', '.join(STATUSES)}"
            )
        if self.source not in SOURCES:
            raise DataError(
                f"Pareto point {self._name()}: source {self.source!r} is not one of {', '.join(SOURCES)}"
            )
        clash = sorted(set(self.extra) & {f.name for f in fields(self)})
        if clash:
            raise DataError(f"Pareto point {self._name()}: extra keys {clash} shadow the point's own fields")
        if not self.label:
            self.label = label_for(self.rho, self.backbone, self.preset)

    def _name(self) -> str:
        name = repr(self.label) if self.label else "(no label)"
        return f"{name} (trial {self.trial_id})" if self.trial_id else name

    @property
    def eligible(self) -> bool:
        """Whether this point competes for the front (only finished trials do)."""
        return self.status == "completed"

    def values(self) -> dict[str, Any]:
        """The fields objectives can name: the numbers and everything in ``extra``."""
        return {**self.extra, **{name: getattr(self, name) for name in _NUMERIC}}

    def plottable(self) -> bool:
        return finite(self.AP) and finite(self.gflops)


def mark_front(points: list[ParetoPoint], objectives: Mapping[str, str] = OBJECTIVES) -> list[ParetoPoint]:
    """Sets ``on_front``. Only eligible points compete: status == 'completed' (trials stopped early by a
    scheduler, errored or running are kept in outputs but marked, never on the front). An objective not
    among the point's numbers is looked up in ``extra``. Returns the same list."""
    _check_objectives(objectives)
    eligible = [p for p in points if p.eligible]
    mask = pareto_mask([p.values() for p in eligible], objectives)
    for p in points:
        p.on_front = False
    for p, on in zip(eligible, mask):
        p.on_front = on
    return points


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def ordered(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """Front members first, then the other finished points, then the rest; each by GFLOPs (missing last).
    The order of the terminal table, the CSV rows and the HTML table."""

    def key(p: ParetoPoint):
        group = 0 if p.on_front else 1 if p.eligible else 2
        g = p.gflops if finite(p.gflops) else math.inf
        ap = -p.AP if finite(p.AP) else math.inf
        return (group, g, ap, p.label)

    return sorted(points, key=key)


def front_steps(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The front members that raise AP as GFLOPs grow: the corners of the attainable region in the
    AP-GFLOPs plane (all of them for the default objectives; a subset when more objectives were used)."""
    front = sorted(
        (p for p in points if p.on_front and p.plottable()),
        key=lambda p: (p.gflops, -p.AP),  # type: ignore[operator]
    )
    steps: list[ParetoPoint] = []
    for p in front:
        if not steps or p.AP > steps[-1].AP:  # type: ignore[operator]
            steps.append(p)
    return steps


def dynamic_curves(points: Sequence[ParetoPoint]) -> dict[str, list[ParetoPoint]]:
    """Dynamic-ρ points of each checkpoint (by trial_id), by GFLOPs: one curve per trained model."""
    groups: dict[str, list[ParetoPoint]] = {}
    for p in points:
        if p.source == "dynamic_rho" and p.plottable():
            groups.setdefault(p.trial_id, []).append(p)
    return {k: sorted(v, key=lambda p: p.gflops) for k, v in groups.items()}  # type: ignore[arg-type, return-value]
