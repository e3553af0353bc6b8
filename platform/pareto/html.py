"""The Pareto plot as one interactive HTML page, drawn by plotly: hover a point for all its fields, zoom
by dragging, click a legend entry to hide a group; the points are listed in a table below, sortable by
any column.

The page is self-contained: plotly.js is inlined (about 4.8 MB), so it opens offline and inside
MLflow's artifact view (a sandboxed iframe that allows scripts, previews up to 50 MiB). It is written
atomically, as every artifact of a sweep.

Plotly reads the text of labels and hover boxes as a small subset of HTML, so every string a point brings
(a label, a preset, an ``extra`` value) is escaped before it goes into the figure.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from sdetr.platform.layout import write_text_atomic
from sdetr.platform.pareto.files import ap_is_fraction, ap_percent, cells, csv_value
from sdetr.platform.pareto.front import ParetoPoint, dynamic_curves, front_steps, ordered
from sdetr.platform.pareto.plot import (
    BLUE,
    DYNAMIC_RHO_LEGEND,
    GREEN,
    GREY,
    not_shown_note,
    point_style,
    unfinished_legend,
)

PLOT_DIV_ID = "pareto-plot"
# The hover box: one line per field; customdata holds the escaped, formatted values in this order.
_HOVER_FIELDS = ("AP (%)", "GFLOPs", "FPS", "Params (M)", "ρ", "backbone", "preset", "status", "source",
                 "trial", "MLflow run")  # fmt: skip
_HOVER = (
    "<b>%{customdata[0]}</b><br>%{customdata[1]}<br>"
    + "<br>".join(f"{name}: %{{customdata[{i}]}}" for i, name in enumerate(_HOVER_FIELDS, start=2))
    + "%{customdata[13]}<extra></extra>"
)
_TABLE_COLUMNS = ("front", "label", "AP (%)", "GFLOPs", "FPS", "Params (M)", "ρ", "backbone", "preset",
                  "status", "source", "trial", "MLflow run")  # fmt: skip
_TABLE_NUMERIC = {"front", "AP (%)", "GFLOPs", "FPS", "Params (M)", "ρ"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; }
p.note { color: #555; font-size: 13px; }
table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td { font-weight: 600; background: #eef5fb; }
tr.out td { color: #888; }
"""

# Click a header to sort by it (numbers by their data-sort value, missing values last); again to reverse.
_SORT_JS = """
(function () {
  var table = document.getElementById("points");
  if (!table) return;
  var tbody = table.tBodies[0], heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("data-dir") !== "asc";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      var rows = Array.prototype.slice.call(tbody.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
        if (x === "" || y === "") return (x === "") - (y === "");
        var r = th.getAttribute("data-type") === "num" ? parseFloat(x) - parseFloat(y)
          : x < y ? -1 : x > y ? 1 : 0;
        return asc ? r : -r;
      });
      rows.forEach(function (r) { tbody.appendChild(r); });
    });
  });
})();
"""


def _esc(text: str) -> str:
    """For plotly's text: ``<`` and ``&`` as entities, which plotly shows as the characters."""
    return html.escape(text, quote=False)


def _customdata(p: ParetoPoint, ap_fraction: bool) -> list[str]:
    c = cells(p, ap_fraction)
    verdict = "on the Pareto front" if p.on_front else "dominated" if p.eligible else "not finished"
    values = [c["AP"], c["GFLOPs"], c["FPS"], c["Params (M)"], c["ρ"]]
    values += [p.backbone, p.preset, p.status, p.source, p.trial_id, p.run_id]
    extra = "".join(f"<br>{_esc(k)}: {_esc(csv_value(v))}" for k, v in sorted(p.extra.items()))
    return [_esc(p.label), verdict, *(_esc(v or "-") for v in values), extra]


def _points_trace(points: Sequence[ParetoPoint], name: str, ap_fraction: bool, **kwargs) -> go.Scatter:
    """The points as markers in the PNG's encoding (`point_style`), each labelled, with a hover box."""
    styles = [point_style(p) for p in points]
    return go.Scatter(
        x=[p.gflops for p in points],
        y=[ap_percent(p.AP, ap_fraction) for p in points],
        name=name,
        text=[_esc(p.label) for p in points],
        textposition="top right",
        textfont={"size": 10, "color": [GREY if kind == "out" else "#333333" for _, _, kind in styles]},
        customdata=[_customdata(p, ap_fraction) for p in points],
        hovertemplate=_HOVER,
        marker={
            "symbol": ["diamond" if p.source == "dynamic_rho" else "circle" for p in points],
            "size": [10 if kind == "front" else 8 for _, _, kind in styles],
            "color": ["rgba(0,0,0,0)" if fill == "none" else fill for fill, _, _ in styles],
            "line": {"color": [edge for _, edge, _ in styles], "width": 1.2},
            "opacity": 1.0,
        },
        cliponaxis=False,  # labels of points near the edge stay readable
        **kwargs,
    )


def figure(points: Sequence[ParetoPoint], title: str = "AP vs GFLOPs", xlabel: str = "GFLOPs") -> go.Figure:
    """The plotly figure: the front as a step line with its members, the dominated and the unfinished
    trials (hollow), and one line per dynamically sparsified checkpoint. Each group is a legend entry."""
    shown = [p for p in points if p.plottable()]
    ap_fraction = ap_is_fraction(points)
    fig = go.Figure()
    steps = front_steps(shown)
    if steps:
        fig.add_trace(
            go.Scatter(
                x=[p.gflops for p in steps] + [max(p.gflops for p in shown)],  # type: ignore[type-var]
                y=[ap_percent(p.AP, ap_fraction) for p in steps] + [ap_percent(steps[-1].AP, ap_fraction)],
                mode="lines",
                line={"shape": "hv", "color": BLUE, "width": 1.5},
                opacity=0.8,
                name="Pareto front",
                legendgroup="front",
                showlegend=False,
                hoverinfo="skip",
            )
        )
    trials = [p for p in shown if p.source == "trial"]
    groups = (
        ("Pareto front", [p for p in trials if p.on_front], "front"),
        ("dominated", [p for p in trials if p.eligible and not p.on_front], "dominated"),
        (unfinished_legend(trials), [p for p in trials if not p.eligible], "unfinished"),
    )
    for name, group, legendgroup in groups:
        if group:
            fig.add_trace(
                _points_trace(group, name, ap_fraction, mode="markers+text", legendgroup=legendgroup)
            )
    for trial_id, curve in dynamic_curves(shown).items():
        name = f"{DYNAMIC_RHO_LEGEND}: trial {trial_id}" if trial_id else DYNAMIC_RHO_LEGEND
        fig.add_trace(
            _points_trace(
                curve, _esc(name), ap_fraction, mode="lines+markers+text", line={"color": GREEN, "width": 1}
            )
        )
    if not shown:
        fig.add_annotation(text="no points with AP and GFLOPs", showarrow=False, xref="paper", yref="paper")
    fig.update_layout(
        title={"text": _esc(title)},
        xaxis_title=_esc(xlabel),
        yaxis_title="AP (%)",
        template="plotly_white",
        hovermode="closest",
        height=560,
        legend={"itemclick": "toggle", "itemdoubleclick": "toggleothers"},
    )
    return fig


def _table(points: Sequence[ParetoPoint]) -> str:
    ap_fraction = ap_is_fraction(points)
    head = "".join(
        f"<th{' data-type=num' if c in _TABLE_NUMERIC else ''}>{html.escape(c)}</th>" for c in _TABLE_COLUMNS
    )
    rows = []
    for p in ordered(points):
        c = cells(p, ap_fraction)
        shown = ["★" if p.on_front else "", p.label, c["AP"], c["GFLOPs"], c["FPS"], c["Params (M)"], c["ρ"]]
        shown += [p.backbone, p.preset, p.status, p.source, p.trial_id, p.run_id]
        keys = ["1" if p.on_front else "0", p.label] + [
            csv_value(v) for v in (p.AP, p.gflops, p.fps, p.params)
        ]
        keys += [csv_value(p.rho if p.rho else None)] + shown[7:]
        tds = "".join(
            f'<td{" class=num" if col in _TABLE_NUMERIC else ""} data-sort="{html.escape(key)}">'
            f"{html.escape(text)}</td>"
            for col, text, key in zip(_TABLE_COLUMNS, shown, keys)
        )
        rows.append(f'<tr class="{point_style(p)[2]}" data-front="{int(p.on_front)}">{tds}</tr>')
    return (
        '<table id="points"><thead><tr>'
        + head
        + "</tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def write_html(
    points: Sequence[ParetoPoint], path: str | Path, title: str = "AP vs GFLOPs", xlabel: str = "GFLOPs"
) -> Path:
    """One self-contained page: the plotly figure (`figure`) with plotly.js inlined, and the table of the
    points below it. Without points, a short page saying so (no plotly.js)."""
    n_front = sum(p.on_front for p in points)
    summary = (
        f"{len(points)} points, {n_front} on the Pareto front (★: no other finished point has AP ≥ and "
        "GFLOPs ≤ with one strictly better). Stopped-early, failed and running trials are hollow and never "
        "compete. Hover a point for its fields, drag to zoom (double-click resets), click a legend entry "
        "to hide it; click a column header to sort the table."
    )
    note = not_shown_note(points)
    summary += f" {note}." if note else ""
    if points:
        plot = pio.to_html(
            figure(points, title, xlabel),
            include_plotlyjs=True,  # inlined: the page must work offline and inside MLflow
            full_html=False,
            div_id=PLOT_DIV_ID,
            config={"displaylogo": False, "responsive": True},
        )
        body = f"{plot}\n{_table(points)}\n<script>{_SORT_JS}</script>"
    else:
        body = "<p>No trials with results yet.</p>"
    e = html.escape
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{e(title)}</h1>\n<p class="note">{e(summary)}</p>\n{body}\n</body>\n</html>\n'
    )
    return write_text_atomic(path, page)
