"""Pareto fronts of sweeps: which trials are worth their cost.

front.py  the points, the dominance rule, which points may compete, their labels
files.py  the terminal table and the CSV (written and read back)
plot.py   the PNG, and the visual encoding the HTML page shares
html.py   the interactive page (plotly, self-contained)

`write_all` writes the three artifacts a sweep logs to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sdetr.platform.layout import OBJECTIVES
from sdetr.platform.pareto.files import CSV_COLUMNS, format_table, read_csv, write_csv
from sdetr.platform.pareto.front import (
    SOURCES,
    STATUSES,
    ParetoPoint,
    family,
    label_for,
    mark_front,
    pareto_mask,
    short_backbone,
    short_preset,
)
from sdetr.platform.pareto.html import write_html
from sdetr.platform.pareto.plot import plot_png

__all__ = [
    "CSV_COLUMNS",
    "SOURCES",
    "STATUSES",
    "ParetoPoint",
    "family",
    "format_table",
    "label_for",
    "mark_front",
    "pareto_mask",
    "plot_png",
    "read_csv",
    "short_backbone",
    "short_preset",
    "write_all",
    "write_csv",
    "write_html",
]


def write_all(
    points: list[ParetoPoint],
    out_dir: str | Path,
    title: str = "AP vs GFLOPs",
    objectives: Mapping[str, str] = OBJECTIVES,
    stem: str = "pareto",
    xlabel: str = "GFLOPs",
) -> dict[str, Path]:
    """Mark the front, then write ``{stem}.csv``, ``{stem}.png`` and ``{stem}.html`` into ``out_dir``
    (``xlabel``: the GFLOPs axis, saying how they were counted)."""
    mark_front(points, objectives)
    out = Path(out_dir)
    return {
        "csv": write_csv(points, out / f"{stem}.csv"),
        "png": plot_png(points, out / f"{stem}.png", title, xlabel),
        "html": write_html(points, out / f"{stem}.html", title, xlabel),
    }
