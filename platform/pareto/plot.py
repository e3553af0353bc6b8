"""The Pareto plot as a PNG (AP against GFLOPs), and the visual encoding that the HTML page shares with it:
shape = where the point comes from (circle: a trial, diamond: one ρ of a dynamically sparsified
checkpoint), fill = front member (dark), finished but dominated (light), not finished (hollow grey).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from sdetr.platform.pareto.files import ap_is_fraction, ap_percent
from sdetr.platform.pareto.front import ParetoPoint, dynamic_curves, front_steps

BLUE, LIGHT_BLUE, GREEN, LIGHT_GREEN, GREY = "#1f77b4", "#9ecae1", "#2ca02c", "#a1d99b", "#888888"
DYNAMIC_RHO_LEGEND = "dynamic ρ (one checkpoint)"


def point_style(p: ParetoPoint) -> tuple[str, str, str]:
    """(fill, edge, kind) where kind is 'front', 'off' (finished, dominated) or 'out' (not finished)."""
    dark, light = (GREEN, LIGHT_GREEN) if p.source == "dynamic_rho" else (BLUE, LIGHT_BLUE)
    if p.on_front:
        return dark, "#000000", "front"
    if p.eligible:
        return light, dark, "off"
    return "none", GREY, "out"


def unfinished_legend(points: Sequence[ParetoPoint]) -> str:
    """The legend entry of the hollow points, naming the statuses present (``stopped early / error``)."""
    return " / ".join(sorted({p.status.replace("_", " ") for p in points if not p.eligible}))


def not_shown_note(points: Sequence[ParetoPoint]) -> str:
    n = sum(not p.plottable() for p in points)
    return f"{n} point{'s' if n != 1 else ''} without AP or GFLOPs not shown" if n else ""


def plot_png(
    points: Sequence[ParetoPoint], path: str | Path, title: str = "AP vs GFLOPs", xlabel: str = "GFLOPs"
) -> Path:
    """AP (in %) against GFLOPs (``xlabel`` says how they were counted). Front members are filled and
    joined by a step line (below and right of it is attainable); other finished points are light,
    unfinished ones hollow grey; dynamic-ρ points are diamonds joined per checkpoint. Every point carries
    its label.

    Uses matplotlib's Agg canvas directly, not pyplot: no global backend switch in the caller's process
    and no figure registry to leak from a long-running sweep driver.
    """
    # matplotlib takes about a second to import: only the processes that draw pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8.0, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [p for p in points if p.plottable()]
    fraction = ap_is_fraction(points)

    def ap(p: ParetoPoint) -> float:
        return ap_percent(p.AP, fraction)  # type: ignore[return-value]

    handles = []
    for curve in dynamic_curves(shown).values():
        ax.plot([p.gflops for p in curve], [ap(p) for p in curve], color=GREEN, lw=0.8, alpha=0.6, zorder=1)
    steps = front_steps(shown)
    if steps:
        xs = [p.gflops for p in steps] + [max(p.gflops for p in shown)]  # type: ignore[type-var]
        ys = [ap(p) for p in steps] + [ap(steps[-1])]
        ax.step(xs, ys, where="post", color=BLUE, lw=1.2, alpha=0.8, zorder=2)
        handles.append(
            Line2D([], [], color=BLUE, lw=1.2, marker="o", mfc=BLUE, mec="k", label="Pareto front")
        )
    for p in shown:
        fill, edge, kind = point_style(p)
        marker = "D" if p.source == "dynamic_rho" else "o"
        size = 46 if kind == "front" else 30
        # Trials above the diamonds: the trained ρ's diamond lies under its trial's circle, corners showing.
        z = 3 if p.source == "dynamic_rho" else 4
        ax.scatter([p.gflops], [ap(p)], s=size, marker=marker, facecolors=fill, edgecolors=edge, zorder=z)
    if any(p.eligible and not p.on_front for p in shown):
        handles.append(Line2D([], [], ls="", marker="o", mfc=LIGHT_BLUE, mec=BLUE, label="dominated"))
    if unfinished_legend(shown):
        handles.append(
            Line2D([], [], ls="", marker="o", mfc="none", mec=GREY, label=unfinished_legend(shown))
        )
    if any(p.source == "dynamic_rho" for p in shown):
        handles.append(Line2D([], [], color=GREEN, lw=0.8, marker="D", mfc=GREEN, label=DYNAMIC_RHO_LEGEND))
    if not shown:
        ax.text(0.5, 0.5, "no points with AP and GFLOPs", ha="center", va="center", transform=ax.transAxes)
    note = not_shown_note(points)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color=GREY)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    ax.margins(x=0.12, y=0.1)  # room for the labels right of the points
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    labelled = labelled_points(shown)
    place_labels(ax, [(p.label, p.gflops, ap(p), point_style(p)[2] == "out") for p in labelled])
    return _savefig_atomic(fig, Path(path))


def labelled_points(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points that get a label: all but a dynamic-ρ point at the ρ its own trial was trained at. That
    diamond sits on (or next to) the trial's circle, and its label, pushed aside by the trial's, ended up
    beside a neighbouring point of the curve (the demo's ``Sparse ρ=0.1 R18 (dyn)`` by ρ = 0.05)."""
    trained = [(p.trial_id, p.rho) for p in points if p.source == "trial" and p.rho]

    def at_trained_rho(p: ParetoPoint) -> bool:
        return p.rho is not None and any(t == p.trial_id and abs(r - p.rho) < 1e-9 for t, r in trained)

    return [p for p in points if not (p.source == "dynamic_rho" and at_trained_rho(p))]


# Where a label may sit relative to its point, in points: right-above first, then the other corners,
# then further out. Points from one checkpoint's dynamic-ρ curve lie close together.
_LABEL_OFFSETS = (
    (4, 4),
    (4, -11),
    (-4, 4),
    (-4, -11),
    (4, 14),
    (-4, 14),
    (4, -21),
    (-4, -21),
    (12, 0),
    (-12, 0),
)


def place_labels(ax, labels: Sequence[tuple[str, float, float, bool]]) -> list:
    """Annotate each ``(text, x, y, muted)`` at the first offset where its text overlaps neither a label
    placed before nor any point's marker; the first offset when every one collides. Returns the
    annotations. Needs the axes laid out (limits and position final)."""
    renderer = ax.figure.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for _, x, y, _ in labels]
    taken: list = []
    annotations = []
    for text, x, y, muted in labels:
        chosen = None
        for dx, dy in _LABEL_OFFSETS:
            ann = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                ha="left" if dx >= 0 else "right", color=GREY if muted else "#333333",
            )  # fmt: skip
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            clear = not any(box.overlaps(other) for other in taken) and not any(
                box.contains(mx, my) for mx, my in markers
            )
            if clear or chosen is None:
                if chosen is not None:
                    chosen[0].remove()
                chosen = (ann, box)
                if clear:
                    break
            else:
                ann.remove()
        if chosen is not None:
            taken.append(chosen[1])
            annotations.append(chosen[0])
    return annotations


def _savefig_atomic(fig, path: Path) -> Path:
    """Save to a temporary file in the same folder, then rename: a reader (MLflow, a browser) sees the old
    image or the new one, never half of one. The only binary artifact, hence its own small writer
    (`sdetr.platform.layout.write_text_atomic` writes text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # labels near the edge stay in the image
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
