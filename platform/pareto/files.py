"""The Pareto points as text: the terminal table that ``sdetr pareto`` prints, and the CSV that the sweep
keeps and logs to MLflow (`read_csv` gives the points back).

The CSV is written atomically (`sdetr.platform.layout.write_text_atomic`): ``sdetr pareto`` rewrites it
while MLflow or a spreadsheet may be reading it, and a reader must never see half a file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdetr.detector.errors import DataError
from sdetr.platform.layout import write_text_atomic
from sdetr.platform.pareto.front import ParetoPoint, finite, ordered

CSV_COLUMNS = (
    "on_front", "label", "AP", "gflops", "fps", "params", "rho", "backbone", "preset", "status", "source",
    "trial_id", "run_id",
)  # fmt: skip
# The columns of `cells`, right-aligned in the terminal table.
NUMERIC_CELLS = ("AP", "AP50", "GFLOPs", "FPS", "Params (M)", "ρ")
# The terminal table's columns: narrow enough for 100 columns (the label names the model, ρ and backbone).
TABLE_COLUMNS = ("*", "label", "AP", "AP50", "GFLOPs", "FPS", "Params (M)", "status", "trial")
TABLE_WIDTH = 100


def ap_is_fraction(points: Sequence[ParetoPoint]) -> bool:
    """COCOeval reports AP in [0, 1], papers in percent: tell which one the points hold."""
    aps = [p.AP for p in points if finite(p.AP)]
    return bool(aps) and all(0.0 <= a <= 1.0 for a in aps)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ap_percent(value: Any, ap_fraction: bool) -> float | None:
    """An AP value in percent (COCOeval's fractions times 100), None when missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return 100.0 * number if ap_fraction else number


def cells(p: ParetoPoint, ap_fraction: bool) -> dict[str, str]:
    """The point's numbers as people read them (keys `NUMERIC_CELLS`), missing ones as ``-``: AP in percent
    with one decimal, as the papers print it. Shared by the terminal table and the HTML page."""
    return {
        "AP": _fmt(ap_percent(p.AP, ap_fraction), ".1f"),
        "AP50": _fmt(ap_percent(p.extra.get("AP50"), ap_fraction), ".1f"),
        "GFLOPs": _fmt(p.gflops, ".2f" if finite(p.gflops) and p.gflops < 10 else ".1f"),
        "FPS": _fmt(p.fps, ".1f"),
        "Params (M)": _fmt(None if p.params is None else p.params / 1e6, ".1f"),
        "ρ": _fmt(p.rho, "g") if p.rho else "-",
    }


def _status_text(p: ParetoPoint) -> str:
    return p.status.replace("_", " ")


def format_table(points: list[ParetoPoint], gflops_note: str = "") -> str:
    """A terminal table of at most `TABLE_WIDTH` columns: front members first (by GFLOPs), ``*`` marks
    them; then everything else. ``gflops_note`` says how GFLOPs were counted (printed below)."""
    if not points:
        return "Pareto front: no trials with results yet"
    ap_fraction = ap_is_fraction(points)
    header = list(TABLE_COLUMNS)
    rows = []
    for p in ordered(points):
        c = cells(p, ap_fraction)
        row = ["*" if p.on_front else "", p.label, c["AP"], c["AP50"], c["GFLOPs"], c["FPS"], c["Params (M)"]]
        row += [_status_text(p), p.trial_id or "-"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if h in NUMERIC_CELLS else c.ljust(w) for c, w, h in zip(row, widths, header)]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    n_front = sum(p.on_front for p in points)
    n_out = sum(not p.eligible for p in points)
    notes = [
        f"{n_front} of {len(points)} points on the Pareto front (*: no other finished point has AP >= and "
        "GFLOPs <= with one strictly better)",
        "AP, AP50: COCO box AP in % on the val split"
        + ("" if ap_fraction or not any(finite(p.AP) for p in points) else " (as given)"),
    ]
    if gflops_note:
        notes.append(f"GFLOPs: {gflops_note}")
    if all(p.fps is None for p in points):
        notes.append("FPS: not measured")
    if any(p.source == "dynamic_rho" for p in points):
        notes.append("(dyn): one trained Sparse DETR evaluated at another ρ (dynamic sparsification)")
    if n_out:
        notes.append(f"{n_out} not finished (stopped early, error or running) do not compete")
    return "\n".join(out + [_wrap(n) for n in notes])


def _wrap(text: str, width: int = TABLE_WIDTH) -> str:
    """One note, wrapped at word boundaries to ``width`` columns (continuation lines indented)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False))


def csv_value(value: Any) -> str:
    """A field as the CSV (and the HTML hover) writes it: exact floats, integers without ``.0``."""
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
    for p in ordered(points):
        row = [csv_value(getattr(p, name)) for name in CSV_COLUMNS]
        writer.writerow(row + [csv_value(p.extra.get(k)) for k in extra_keys])
    return write_text_atomic(path, buf.getvalue())


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
