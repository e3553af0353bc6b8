"""Pareto front of a sweep: which trials are worth their cost (AP up, GFLOPs down).

A sweep trains several detectors; each ends as a `ParetoPoint`. `mark_front` decides which points are
on the front, and the writers turn the points into a terminal table, a CSV, a PNG and one
self-contained HTML page (inline SVG, no network), which the sweep logs to MLflow as artifacts.

Only trials that finished compete for the front: a trial stopped early by the scheduler, one that
failed or one still running has numbers from a partial schedule, and letting it dominate would hide
a finished trial that is genuinely better per GFLOP. Those points are still written, marked by status.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``): the
artifacts are rewritten after each trial, and a reader (MLflow, a browser) must never see half a file.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError, DataError

OBJECTIVES_DEFAULT = {"AP": "max", "gflops": "min"}
STATUSES = ("completed", "stopped_early", "error", "running")
SOURCES = ("trial", "dynamic_rho")
CSV_COLUMNS = (
    "on_front", "label", "AP", "gflops", "fps", "params", "rho", "backbone", "preset", "status", "source",
    "trial_id", "run_id",
)  # fmt: skip
_NUMERIC = ("AP", "gflops", "rho", "fps", "params")
_MODES = ("max", "min")


# --------------------------------------------------------------------------------------------- front


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
    points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str] = OBJECTIVES_DEFAULT
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


# ---------------------------------------------------------------------------------------------- points


_BACKBONE_SHORT = {"swin_t": "Swin-T", "swin_s": "Swin-S", "swin_b": "Swin-B"}
# Official-style preset names, shortened for a plot label (longest first: they share prefixes).
_PRESET_PREFIX = re.compile(r"^(r\d+|swint|swin_t|tiny)_")
_PRESET_PARTS = (
    ("_plus_iterative_bbox_refinement", "+refine"),
    ("_plus_plus_two_stage", "+two-stage"),
    ("_detr", ""),
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


def label_for(rho: float | None, backbone: str, preset: str = "") -> str:
    """``ρ=0.1 R50``, ``ρ=0.3 Swin-T``; dense models (rho None or 0) by their shortened preset name,
    e.g. ``deformable R50`` (``dense R50`` without a preset)."""
    bb = short_backbone(backbone)
    if rho:
        head = f"ρ={rho:g}"
    else:
        head = short_preset(preset) or "dense"
    return f"{head} {bb}".strip()


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
        return _finite(self.AP) and _finite(self.gflops)


def mark_front(
    points: list[ParetoPoint], objectives: Mapping[str, str] = OBJECTIVES_DEFAULT
) -> list[ParetoPoint]:
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


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _ap_is_fraction(points: Sequence[ParetoPoint]) -> bool:
    """COCOeval reports AP in [0, 1], papers in percent: pick the number of decimals accordingly."""
    aps = [p.AP for p in points if _finite(p.AP)]
    return bool(aps) and all(0.0 <= a <= 1.0 for a in aps)


def _ordered(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """Front members first, then the other finished points, then the rest; each by GFLOPs (missing last)."""

    def key(p: ParetoPoint):
        group = 0 if p.on_front else 1 if p.eligible else 2
        g = p.gflops if _finite(p.gflops) else math.inf
        ap = -p.AP if _finite(p.AP) else math.inf
        return (group, g, ap, p.label)

    return sorted(points, key=key)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _cells(p: ParetoPoint, ap_fraction: bool) -> dict[str, str]:
    """Human-readable cells shared by the terminal table and the HTML table."""
    return {
        "AP": _fmt(p.AP, ".3f" if ap_fraction else ".1f"),
        "GFLOPs": _fmt(p.gflops, ".1f"),
        "FPS": _fmt(p.fps, ".1f"),
        "Params (M)": _fmt(None if p.params is None else p.params / 1e6, ".1f"),
        "ρ": _fmt(p.rho, "g") if p.rho else "-",
    }


# ------------------------------------------------------------------------------------------ text / csv


def format_table(points: list[ParetoPoint]) -> str:
    """A terminal table: front members first (by GFLOPs), ``*`` marks them; then everything else."""
    if not points:
        return "Pareto front: no trials with results yet"
    ap_fraction = _ap_is_fraction(points)
    show_source = any(p.source != "trial" for p in points)
    header = ["*", "label", "AP", "GFLOPs", "FPS", "Params (M)", "ρ", "backbone", "status"]
    header += ["source"] if show_source else []
    header += ["trial"]
    rows = []
    for p in _ordered(points):
        c = _cells(p, ap_fraction)
        row = ["*" if p.on_front else "", p.label, c["AP"], c["GFLOPs"], c["FPS"], c["Params (M)"], c["ρ"]]
        row += [p.backbone or "-", p.status]
        row += [p.source] if show_source else []
        row += [p.trial_id or "-"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    numeric = {"AP", "GFLOPs", "FPS", "Params (M)", "ρ"}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    n_front = sum(p.on_front for p in points)
    n_out = sum(not p.eligible for p in points)
    note = f"{n_front} of {len(points)} points on the Pareto front"
    note += " (*: no other finished point has AP >= and GFLOPs <= with one strictly better)"
    if n_out:
        note += f"; {n_out} not finished (stopped early, error or running) do not compete"
    return "\n".join(out + [note])


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))  # parameter counts read better without ".0"
        return repr(value)
    return str(value)


def write_csv(points: Sequence[ParetoPoint], path: str | Path) -> Path:
    """One row per point, front members first. Columns: `CSV_COLUMNS`, then the sorted ``extra`` keys.
    ``on_front`` is 1/0, missing numbers are empty cells."""
    extra_keys = sorted({k for p in points for k in p.extra})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *extra_keys])
    for p in _ordered(points):
        row = [_csv_value(getattr(p, name)) for name in CSV_COLUMNS]
        writer.writerow(row + [_csv_value(p.extra.get(k)) for k in extra_keys])
    return _atomic_write(path, buf.getvalue().encode("utf-8"))


def read_csv(path: str | Path) -> list[ParetoPoint]:
    """The points of a CSV written by `write_csv` (``extra`` values come back as strings)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the Pareto CSV ({exc.strerror})") from None
    points = []
    for line_no, row in enumerate(rows, start=2):
        missing = [c for c in CSV_COLUMNS if c not in row]
        if missing:
            raise DataError(f"{path}: line {line_no} lacks the columns {missing}")
        kwargs: dict[str, Any] = {c: row[c] for c in CSV_COLUMNS if c != "on_front"}
        extra = {k: v for k, v in row.items() if k not in CSV_COLUMNS and v != ""}
        try:
            p = ParetoPoint(**kwargs, extra=extra)
        except DataError as exc:
            raise DataError(f"{path}: line {line_no}: {exc}") from None
        p.on_front = row["on_front"] == "1"
        points.append(p)
    return points


def _atomic_write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; artifacts are read by other users and servers
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# -------------------------------------------------------------------------------------------- plotting


def _front_steps(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
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


def _dynamic_groups(points: Sequence[ParetoPoint]) -> dict[str, list[ParetoPoint]]:
    """Dynamic-ρ points of each checkpoint (by trial_id), by GFLOPs: one curve per trained model."""
    groups: dict[str, list[ParetoPoint]] = {}
    for p in points:
        if p.source == "dynamic_rho" and p.plottable():
            groups.setdefault(p.trial_id, []).append(p)
    return {k: sorted(v, key=lambda p: p.gflops) for k, v in groups.items()}  # type: ignore[arg-type, return-value]


# Shared visual encoding of the PNG and the SVG: shape = source, fill = front / finished / not finished.
_BLUE, _LIGHT_BLUE, _GREEN, _LIGHT_GREEN, _GREY = "#1f77b4", "#9ecae1", "#2ca02c", "#a1d99b", "#888888"


def _style(p: ParetoPoint) -> tuple[str, str, str]:
    """(fill, edge, kind) where kind is 'front', 'off' (finished, dominated) or 'out' (not finished)."""
    dark, light = (_GREEN, _LIGHT_GREEN) if p.source == "dynamic_rho" else (_BLUE, _LIGHT_BLUE)
    if p.on_front:
        return dark, "#000000", "front"
    if p.eligible:
        return light, dark, "off"
    return "none", _GREY, "out"


def _not_shown_note(points: Sequence[ParetoPoint]) -> str:
    n = sum(not p.plottable() for p in points)
    return f"{n} point{'s' if n != 1 else ''} without AP or GFLOPs not shown" if n else ""


def plot_png(points: Sequence[ParetoPoint], path: str | Path, title: str = "AP vs GFLOPs") -> Path:
    """AP against GFLOPs. Front members are filled and joined by a step line (below and right of it is
    attainable); other finished points are light, unfinished ones hollow grey; dynamic-ρ points are
    diamonds joined per checkpoint. Every point carries its label.

    Uses matplotlib's Agg canvas directly, not pyplot: no global backend switch in the caller's process
    and no figure registry to leak from a long-running sweep driver.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8.0, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [p for p in points if p.plottable()]
    handles = []
    for group in _dynamic_groups(shown).values():
        ax.plot([p.gflops for p in group], [p.AP for p in group], color=_GREEN, lw=0.8, alpha=0.6, zorder=1)
    steps = _front_steps(shown)
    if steps:
        xs = [p.gflops for p in steps] + [max(p.gflops for p in shown)]  # type: ignore[type-var]
        ys = [p.AP for p in steps] + [steps[-1].AP]
        ax.step(xs, ys, where="post", color=_BLUE, lw=1.2, alpha=0.8, zorder=2)
        handles.append(
            Line2D([], [], color=_BLUE, lw=1.2, marker="o", mfc=_BLUE, mec="k", label="Pareto front")
        )
    for p in shown:
        fill, edge, kind = _style(p)
        marker = "D" if p.source == "dynamic_rho" else "o"
        size = 46 if kind == "front" else 30
        ax.scatter([p.gflops], [p.AP], s=size, marker=marker, facecolors=fill, edgecolors=edge, zorder=3)
        ax.annotate(p.label, (p.gflops, p.AP), xytext=(4, 4), textcoords="offset points", fontsize=7,
                    color="#333333" if kind != "out" else _GREY)  # fmt: skip
    if any(p.eligible and not p.on_front for p in shown):
        handles.append(Line2D([], [], ls="", marker="o", mfc=_LIGHT_BLUE, mec=_BLUE, label="dominated"))
    out = sorted({p.status.replace("_", " ") for p in shown if not p.eligible})
    if out:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec=_GREY, label=" / ".join(out)))
    if any(p.source == "dynamic_rho" for p in shown):
        handles.append(
            Line2D([], [], color=_GREEN, lw=0.8, marker="D", mfc=_GREEN, label="dynamic ρ (one checkpoint)")
        )
    if not shown:
        ax.text(0.5, 0.5, "no points with AP and GFLOPs", ha="center", va="center", transform=ax.transAxes)
    note = _not_shown_note(points)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color=_GREY)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    ax.margins(x=0.12, y=0.1)  # room for the labels right of the points
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("AP")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # labels near the edge stay in the image
    return _atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ html


def _nice_ticks(lo: float, hi: float, n: int = 6) -> tuple[list[float], int]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) and the decimals to print them."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    decimals = max(0, -math.floor(math.log10(step)))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, decimals))
        k += 1
    return ticks, decimals


def _domain(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08
    if pad == 0:
        pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _tooltip(p: ParetoPoint) -> str:
    lines = [p.label, "on the Pareto front" if p.on_front else "not on the front"]
    for name in ("AP", "gflops", "fps", "params", "rho", "backbone", "preset", "status", "source",
                 "trial_id", "run_id"):  # fmt: skip
        value = getattr(p, name)
        if value not in (None, ""):
            lines.append(f"{name}: {_csv_value(value)}")
    lines += [f"{k}: {v}" for k, v in sorted(p.extra.items())]
    return "\n".join(lines)


def _svg(points: Sequence[ParetoPoint], title: str) -> str:
    width, height = 960, 500
    left, right, top, bottom = 64, 210, 36, 52  # the legend sits in the right margin, off the points
    shown = [(i, p) for i, p in enumerate(points) if p.plottable()]
    e = html.escape
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{e(title)}">',
        f'<text x="{width / 2}" y="22" text-anchor="middle" class="title">{e(title)}</text>',
    ]
    if not shown:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no points with AP and GFLOPs</text>'
        )
        out.append("</svg>")
        return "\n".join(out)
    x0, x1 = _domain([p.gflops for _, p in shown])  # type: ignore[misc]
    y0, y1 = _domain([p.AP for _, p in shown])  # type: ignore[misc]
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    ticks, dec = _nice_ticks(x0, x1)
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" class="grid"/>')
        out.append(
            f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">{t:.{dec}f}</text>'
        )
    ticks, dec = _nice_ticks(y0, y1)
    for t in ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{t:.{dec}f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle" class="axis">GFLOPs</text>')
    out.append(
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 16 {top + ph / 2})">AP</text>'
    )
    for group in _dynamic_groups([p for _, p in shown]).values():
        coords = " ".join(f"{sx(p.gflops):.1f},{sy(p.AP):.1f}" for p in group)  # type: ignore[arg-type]
        out.append(f'<polyline points="{coords}" class="dyn-line"/>')
    steps = _front_steps([p for _, p in shown])
    if steps:
        d = f"M{sx(steps[0].gflops):.1f},{sy(steps[0].AP):.1f}"  # type: ignore[arg-type]
        for b in steps[1:]:
            d += f" H{sx(b.gflops):.1f} V{sy(b.AP):.1f}"  # type: ignore[arg-type]
        d += f" H{sx(max(p.gflops for _, p in shown)):.1f}"  # type: ignore[type-var]
        out.append(f'<path d="{d}" class="front-line"/>')
    for i, p in shown:
        fill, edge, kind = _style(p)
        x, y = sx(p.gflops), sy(p.AP)  # type: ignore[arg-type]
        r = 6 if kind == "front" else 5
        if p.source == "dynamic_rho":
            corners = ((x, y - r), (x + r, y), (x, y + r), (x - r, y))
            shape = '<polygon points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in corners) + '"'
        else:
            shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}"'
        out.append(
            f'<g class="pt {kind}" id="pt-{i}" data-front="{int(p.on_front)}">'
            f'{shape} fill="{fill}" stroke="{edge}" stroke-width="{1.5 if kind == "front" else 1}"/>'
            f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" class="lbl">{e(p.label)}</text>'
            f"<title>{e(_tooltip(p))}</title></g>"
        )
    out += _svg_legend(points, left + pw + 12, top + 4)
    note = _not_shown_note(points)
    if note:
        out.append(f'<text x="{left}" y="{height - 10}" class="tick">{e(note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _svg_legend(points: Sequence[ParetoPoint], x: float, y: float) -> list[str]:
    shown = [p for p in points if p.plottable()]
    items: list[tuple[str, str]] = []
    if any(p.on_front for p in shown):
        items.append((f'<circle r="5" fill="{_BLUE}" stroke="#000"/>', "Pareto front"))
    if any(p.eligible and not p.on_front for p in shown):
        items.append((f'<circle r="5" fill="{_LIGHT_BLUE}" stroke="{_BLUE}"/>', "dominated"))
    out_status = sorted({p.status.replace("_", " ") for p in shown if not p.eligible})
    if out_status:
        items.append((f'<circle r="5" fill="none" stroke="{_GREY}"/>', " / ".join(out_status)))
    if any(p.source == "dynamic_rho" for p in shown):
        items.append((f'<polygon points="0,-5 5,0 0,5 -5,0" fill="{_GREEN}"/>', "dynamic ρ (one checkpoint)"))
    lines = []
    for k, (shape, text) in enumerate(items):
        cy = y + k * 18
        lines.append(
            f'<g class="legend" transform="translate({x + 6},{cy + 6})">{shape}'
            f'<text x="12" y="4">{html.escape(text)}</text></g>'
        )
    return lines


_HTML_TABLE_COLUMNS = ("front", "label", "AP", "GFLOPs", "FPS", "Params (M)", "ρ", "backbone", "preset",
                       "status", "source", "trial", "MLflow run")  # fmt: skip

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
svg { max-width: 100%; height: auto; }
svg .title { font-size: 15px; font-weight: 600; }
svg .plot { fill: #fff; stroke: #999; }
svg .grid { stroke: #e5e5e5; }
svg .tick, svg .legend text { font-size: 11px; fill: #555; }
svg .axis { font-size: 13px; }
svg .lbl { font-size: 10px; fill: #333; pointer-events: none; }
svg .pt.out .lbl { fill: #888; }
svg .front-line { fill: none; stroke: #1f77b4; stroke-width: 1.5; opacity: 0.8; }
svg .dyn-line { fill: none; stroke: #2ca02c; stroke-width: 1; opacity: 0.6; }
svg .pt { cursor: pointer; }
svg .pt:hover circle, svg .pt:hover polygon, svg .pt.hl circle, svg .pt.hl polygon {
  stroke: #d62728; stroke-width: 3; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td { font-weight: 600; background: #eef5fb; }
tr.out td { color: #888; }
tr.hl td { background: #fde8e8; }
p.note { color: #555; font-size: 13px; }
"""

# Sorting by clicking a header (numbers by data-sort, missing values last) and row <-> point highlighting.
_JS = """
(function () {
  var table = document.getElementById("points");
  if (!table) return;
  var tbody = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("data-dir") !== "asc";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      var rows = Array.prototype.slice.call(tbody.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
        if (x === "" && y === "") return 0;
        if (x === "") return 1;
        if (y === "") return -1;
        var r;
        if (th.getAttribute("data-type") === "num") r = parseFloat(x) - parseFloat(y);
        else r = x < y ? -1 : x > y ? 1 : 0;
        return asc ? r : -r;
      });
      rows.forEach(function (r) { tbody.appendChild(r); });
    });
  });
  Array.prototype.forEach.call(tbody.rows, function (row) {
    var pt = document.getElementById("pt-" + row.getAttribute("data-idx"));
    if (!pt) return;
    var on = function () { row.classList.add("hl"); pt.classList.add("hl"); };
    var off = function () { row.classList.remove("hl"); pt.classList.remove("hl"); };
    row.addEventListener("mouseenter", on); row.addEventListener("mouseleave", off);
    pt.addEventListener("mouseenter", on); pt.addEventListener("mouseleave", off);
  });
})();
"""


def _sort_key(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _table(points: Sequence[ParetoPoint]) -> str:
    e = html.escape
    ap_fraction = _ap_is_fraction(points)
    numeric = {"front", "AP", "GFLOPs", "FPS", "Params (M)", "ρ"}
    head = "".join(
        ('<th data-type="num">' if c in numeric else "<th>") + f"{e(c)}</th>" for c in _HTML_TABLE_COLUMNS
    )
    index = {id(p): i for i, p in enumerate(points)}
    rows = []
    for p in _ordered(points):
        c = _cells(p, ap_fraction)
        kind = _style(p)[2]
        cells = [
            ("★" if p.on_front else "", "1" if p.on_front else "0", False),
            (p.label, p.label, False),
            (c["AP"], _sort_key(p.AP), True),
            (c["GFLOPs"], _sort_key(p.gflops), True),
            (c["FPS"], _sort_key(p.fps), True),
            (c["Params (M)"], _sort_key(p.params), True),
            (c["ρ"], _sort_key(p.rho), True),
            (p.backbone, p.backbone, False),
            (p.preset, p.preset, False),
            (p.status, p.status, False),
            (p.source, p.source, False),
            (p.trial_id, p.trial_id, False),
            (p.run_id, p.run_id, False),
        ]
        tds = "".join(
            f'<td{" class=num" if num else ""} data-sort="{e(key)}">{e(text)}</td>'
            for text, key, num in cells
        )
        title = e(_tooltip(p))
        rows.append(
            f'<tr class="{kind}" data-front="{int(p.on_front)}" data-idx="{index[id(p)]}" title="{title}">'
            f"{tds}</tr>"
        )
    return (
        f'<table id="points"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"
    )


def write_html(points: Sequence[ParetoPoint], path: str | Path, title: str = "AP vs GFLOPs") -> Path:
    """One self-contained page (no external scripts, styles or fonts, so it opens from an MLflow
    artifact view or offline): an SVG scatter encoded like the PNG, with every field in each point's
    hover tooltip, and a table below that sorts by any column when its header is clicked."""
    e = html.escape
    n_front = sum(p.on_front for p in points)
    summary = (
        f"{len(points)} points, {n_front} on the Pareto front (★: no other finished point has AP ≥ and "
        "GFLOPs ≤ with one strictly better). Stopped-early, failed and running trials are shown hollow and "
        "never compete. Hover a point for all its fields; click a column header to sort."
    )
    body = _svg(points, title) + "\n" + _table(points) if points else "<p>No trials with results yet.</p>"
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{e(title)}</h1>\n<p class="note">{e(summary)}</p>\n{body}\n'
        f"<script>{_JS}</script>\n</body>\n</html>\n"
    )
    return _atomic_write(path, page.encode("utf-8"))


def write_all(
    points: list[ParetoPoint],
    out_dir: str | Path,
    title: str = "AP vs GFLOPs",
    objectives: Mapping[str, str] = OBJECTIVES_DEFAULT,
    stem: str = "pareto",
) -> dict[str, Path]:
    """Mark the front, then write ``{stem}.csv``, ``{stem}.png`` and ``{stem}.html`` into ``out_dir``."""
    mark_front(points, objectives)
    out = Path(out_dir)
    return {
        "csv": write_csv(points, out / f"{stem}.csv"),
        "png": plot_png(points, out / f"{stem}.png", title),
        "html": write_html(points, out / f"{stem}.html", title),
    }
