"""Pareto front of a sweep: the dominance rule (ties, duplicates, missing values, any number of
objectives), which trials may compete, and the CSV / PNG / HTML artifacts."""

from __future__ import annotations

import csv
import html
import json
import math
import random
from html.parser import HTMLParser

import pytest

from sdetr.detector.errors import ConfigError, DataError
from sdetr.platform import pareto
from sdetr.platform.layout import OBJECTIVES
from sdetr.platform.pareto import ParetoPoint, label_for, mark_front, pareto_mask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _brute_force_front(points, objectives):
    """The definition, written out independently: undominated among the points with every value."""

    def ok(p):
        return all(p.get(k) is not None and not math.isnan(p[k]) for k in objectives)

    def better_eq(a, b, k):
        return a[k] >= b[k] if objectives[k] == "max" else a[k] <= b[k]

    def strictly(a, b, k):
        return a[k] > b[k] if objectives[k] == "max" else a[k] < b[k]

    out = []
    for p in points:
        if not ok(p):
            out.append(False)
            continue
        dominated = any(
            ok(q)
            and all(better_eq(q, p, k) for k in objectives)
            and any(strictly(q, p, k) for k in objectives)
            for q in points
        )
        out.append(not dominated)
    return out


def test_tie_in_ap_keeps_only_the_cheaper_point():
    pts = [{"AP": 40.0, "gflops": 120.0}, {"AP": 40.0, "gflops": 100.0}, {"AP": 45.0, "gflops": 170.0}]
    assert pareto_mask(pts) == [False, True, True]
    # The same tie in cost: the more accurate one wins.
    assert pareto_mask([{"AP": 41.0, "gflops": 100.0}, {"AP": 40.0, "gflops": 100.0}]) == [True, False]


def test_exact_duplicates_both_stay_unless_dominated():
    pts = [{"AP": 40.0, "gflops": 100.0}, {"AP": 40.0, "gflops": 100.0}, {"AP": 30.0, "gflops": 150.0}]
    assert pareto_mask(pts) == [True, True, False]
    pts.append({"AP": 41.0, "gflops": 90.0})  # now dominates both duplicates
    assert pareto_mask(pts) == [False, False, False, True]


def test_single_point_and_no_points():
    assert pareto_mask([{"AP": 1.0, "gflops": 2.0}]) == [True]
    assert pareto_mask([]) == []
    assert pareto_mask([{"AP": None, "gflops": 2.0}]) == [False]


def test_missing_none_and_nan_never_on_the_front_and_never_dominate():
    pts = [
        {"AP": 50.0, "gflops": float("nan")},  # would dominate everything if NaN counted as a number
        {"AP": float("nan"), "gflops": 1.0},
        {"AP": None, "gflops": 1.0},
        {"gflops": 1.0},  # AP missing altogether
        {"AP": 30.0, "gflops": 100.0},
        {"AP": 20.0, "gflops": 200.0},
    ]
    assert pareto_mask(pts) == [False, False, False, False, True, False]
    with pytest.raises(DataError, match=r"point 1: objective 'AP' = 'high' is not a number"):
        pareto_mask([{"AP": 1.0, "gflops": 1.0}, {"AP": "high", "gflops": 1.0}])


def test_invalid_mode_and_no_objectives_are_config_errors():
    with pytest.raises(ConfigError, match=r"objective 'gflops': mode 'minimize' must be 'max' or 'min'"):
        pareto_mask([{"AP": 1.0, "gflops": 1.0}], {"AP": "max", "gflops": "minimize"})
    with pytest.raises(ConfigError, match="objective 'AP'"):
        pareto_mask([], {"AP": "MAX"})  # checked even without points: a typo must not pass silently
    with pytest.raises(ConfigError, match="no objectives"):
        pareto_mask([{"AP": 1.0}], {})
    with pytest.raises(ConfigError, match="objective 'fps'"):
        mark_front([ParetoPoint("a", 1.0, 1.0)], {"AP": "max", "fps": "up"})


def test_three_mixed_objectives_match_brute_force_on_random_points():
    rng = random.Random(1234)
    objectives = {"AP": "max", "gflops": "min", "fps": "max"}
    n_front_total = 0
    for trial in range(40):
        n = rng.randint(0, 30)
        # A coarse grid makes ties and exact duplicates common; a few values go missing.
        pts = []
        for _ in range(n):
            p = {
                "AP": rng.randint(0, 5) * 1.0,
                "gflops": rng.randint(0, 5) * 10.0,
                "fps": rng.randint(0, 5) * 1.0,
            }
            if rng.random() < 0.1:
                p[rng.choice(list(objectives))] = rng.choice([None, float("nan")])
            pts.append(p)
        got = pareto_mask(pts, objectives)
        assert got == _brute_force_front(pts, objectives), f"random set {trial}"
        n_front_total += sum(got)
    assert n_front_total > 40  # the check exercised real fronts, not only empty ones
    # And the 2-objective default agrees with the brute force on continuous values.
    pts = [{"AP": rng.random(), "gflops": rng.random() * 200} for _ in range(60)]
    assert pareto_mask(pts) == _brute_force_front(pts, OBJECTIVES)


def test_labels():
    # What the point is (the papers' names), then its backbone.
    assert label_for(0.1, "resnet50") == "Sparse ρ=0.1 R50"
    assert label_for(0.3, "swin_t") == "Sparse ρ=0.3 Swin-T"
    assert label_for(0.30000000000000004, "resnet18", "mini_sparse_detr_rho_0.1") == "Sparse ρ=0.3 R18"
    assert label_for(None, "resnet50", "r50_deformable_detr") == "Deformable R50"
    assert label_for(0.0, "resnet18", "mini_deformable_detr") == "Deformable R18"
    assert label_for(0, "swin_t", "swint_efficient_detr") == "Efficient Swin-T"
    assert (
        label_for(None, "resnet50", "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage")
        == "Deformable+refine+two-stage R50"
    )
    assert label_for(None, "resnet18", "tiny_deformable_detr_plus_iterative_bbox_refinement") == (
        "Deformable+refine R18"
    )
    assert label_for(0, "resnet18", "mini_lite_detr_h3l1_3p1x2") == "Lite H3L1-(3+1)x2 R18"
    assert label_for(0, "resnet50", "r50_detr") == "DETR R50"
    # A preset a sweep changed (trial.effective_preset) keeps the paper's name and shows the change.
    assert label_for(None, "resnet18", "mini_deformable_detr (num_queries=100)") == (
        "Deformable (num_queries=100) R18"
    )
    assert label_for(0, "resnet50", "r50_faster_rcnn_fpn") == "Faster R-CNN R50"
    assert label_for(None, "resnet50") == "dense R50"
    # An empty label is filled in.
    assert ParetoPoint("", 40.0, 100.0, rho=0.2, backbone="resnet50").label == "Sparse ρ=0.2 R50"


def test_point_coerces_numbers_and_rejects_bad_fields():
    p = ParetoPoint("a", "0.41", "120.5", params="40900000", fps=float("nan"))
    assert (p.AP, p.gflops, p.params, p.fps) == (0.41, 120.5, 40_900_000.0, None)
    with pytest.raises(DataError, match=r"'a' \(trial t1\): status 'TERMINATED' is not one of completed"):
        ParetoPoint("a", 1.0, 1.0, trial_id="t1", status="TERMINATED")
    with pytest.raises(DataError, match="source 'sweep'"):
        ParetoPoint("a", 1.0, 1.0, source="sweep")
    with pytest.raises(DataError, match="gflops = 'lots' is not a number"):
        ParetoPoint("a", 1.0, "lots")
    with pytest.raises(DataError, match=r"extra keys \['AP'\] shadow"):
        ParetoPoint("a", 1.0, 1.0, extra={"AP": 2.0})


def test_mark_front_ignores_unfinished_trials_even_when_they_would_dominate():
    pts = [
        ParetoPoint("stopped", 60.0, 50.0, status="stopped_early"),  # dominates every completed point
        ParetoPoint("failed", 70.0, 10.0, status="error"),
        ParetoPoint("running", 80.0, 5.0, status="running"),
        ParetoPoint("cheap", 40.0, 100.0),
        ParetoPoint("accurate", 45.0, 170.0),
        ParetoPoint("worse", 39.0, 120.0),
        ParetoPoint("dyn", 41.0, 100.0, source="dynamic_rho", trial_id="t1"),  # a finished ρ: it competes
    ]
    pts[0].on_front = True  # stale flags are cleared
    assert mark_front(pts) is pts
    assert {p.label for p in pts if p.on_front} == {"accurate", "dyn"}
    # Objectives can name extra fields too.
    for p, mem in zip(pts, [1, 1, 1, 8.0, 9.0, 1.0, 7.0]):
        p.extra["mem_gb"] = mem
    mark_front(pts, {"AP": "max", "mem_gb": "min"})
    assert {p.label for p in pts if p.on_front} == {"accurate", "dyn", "worse"}
    assert mark_front([]) == []


def _sample_points() -> list[ParetoPoint]:
    pts = [
        ParetoPoint(
            "",
            0.412,
            121.0,
            trial_id="t1",
            run_id="r1",
            backbone="resnet50",
            rho=0.1,
            fps=23.1,
            params=40.9e6,
        ),  # fmt: skip
        ParetoPoint("", 0.45, 135.0, trial_id="t2", run_id="r2", backbone="resnet50", rho=0.3, fps=20.0),
        ParetoPoint(
            "",
            0.46,
            172.9,
            trial_id="t3",
            backbone="resnet50",
            preset="r50_deformable_detr",
            params=39.8e6,
            extra={"lr": 0.0002, "epochs": 50},
        ),  # fmt: skip
        ParetoPoint("", 0.44, 177.3, trial_id="t4", backbone="resnet50", preset="r50_efficient_detr"),
        ParetoPoint("", 0.50, 110.0, trial_id="t5", backbone="swin_t", rho=0.2, status="stopped_early"),
        ParetoPoint("", 0.40, 115.0, trial_id="t2", backbone="resnet50", rho=0.1, source="dynamic_rho"),
        ParetoPoint("", 0.43, 125.0, trial_id="t2", backbone="resnet50", rho=0.2, source="dynamic_rho"),
        ParetoPoint('odd <b>"&', 0.3, 100.0, trial_id="t6", status="error"),
        ParetoPoint("no AP yet", None, None, trial_id="t7", status="running"),
    ]
    return mark_front(pts)


def test_format_table_puts_the_front_first_sorted_by_gflops():
    assert "no trials" in pareto.format_table([])
    assert "\n" not in pareto.format_table([])
    pts = _sample_points()
    text = pareto.format_table(pts)
    lines = text.splitlines()
    body = lines[2 : 2 + len(pts)]
    starred = [ln for ln in body if ln.startswith("*")]
    assert len(starred) == sum(p.on_front for p in pts) == 5
    assert body[: len(starred)] == starred  # front members first...
    # Columns after the label (which ends with the backbone): AP, AP50, GFLOPs.
    gflops = [float(ln.split()[ln.split().index("R50") + 3]) for ln in starred]
    assert gflops == sorted(gflops)  # ...by cost
    assert "stopped early" in text and "error" in text
    assert "5 of 9 points on the Pareto front" in lines[2 + len(pts)]
    assert " 41.2 " in text and "0.412" not in text  # AP in percent, one decimal, as the papers print it
    assert "FPS: not measured" not in text  # some points have an FPS
    assert max(len(line) for line in lines) <= pareto.files.TABLE_WIDTH


def test_format_table_fits_100_columns_and_says_how_gflops_were_counted():
    r18 = {"backbone": "resnet18"}
    long = [
        ParetoPoint("", 0.3012, 1.53, trial_id="abcde_00001", preset="mini_lite_detr_h3l1_3p1x2", **r18),
        ParetoPoint("", 0.3344, 2.23, trial_id="abcde_00002", preset="mini_deformable_detr", **r18),
        ParetoPoint("", 0.28, 1.5, trial_id="abcde_00003", rho=0.05, source="dynamic_rho", **r18),
    ]
    mark_front(long)
    note = (
        "mean over 10 val images as evaluated (~160x211) (at the papers' 3x850x1040: MLflow's GFLOPs_fixed)"
    )
    text = pareto.format_table(long, note)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert (
        "33.4" in text and "2.23" in text and "FPS: not measured" in text and "GFLOPs: mean over 10" in text
    )


def test_csv_round_trip(tmp_path):
    pts = _sample_points()
    path = pareto.write_csv(pts, tmp_path / "sub" / "pareto.csv")
    assert path == tmp_path / "sub" / "pareto.csv"
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["pareto.csv"]  # no temporary file left
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames == [*pareto.CSV_COLUMNS, "epochs", "lr"]
    assert len(rows) == len(pts)
    by_key = {(r["trial_id"], r["source"], r["label"]): r for r in rows}
    assert len(by_key) == len(pts)
    for p in pts:
        r = by_key[p.trial_id, p.source, p.label]
        assert r["on_front"] == ("1" if p.on_front else "0")
        for name in ("AP", "gflops", "fps", "params", "rho"):
            value = getattr(p, name)
            assert (r[name] == "") if value is None else (float(r[name]) == value), (p.label, name)
        for name in ("backbone", "preset", "status", "source", "trial_id", "run_id"):
            assert r[name] == getattr(p, name)
    deformable = by_key["t3", "trial", "Deformable R50"]
    assert deformable["params"] == "39800000" and deformable["lr"] == "0.0002"
    assert by_key["t1", "trial", "Sparse ρ=0.1 R50"]["lr"] == ""
    assert [r["on_front"] for r in rows] == sorted((r["on_front"] for r in rows), reverse=True)

    back = pareto.read_csv(path)
    assert sorted((p.label, p.AP, p.gflops, p.on_front, p.status, p.source) for p in back) == sorted(
        (p.label, p.AP, p.gflops, p.on_front, p.status, p.source) for p in pts
    )
    assert next(p for p in back if p.trial_id == "t3").extra == {"lr": "0.0002", "epochs": "50"}

    pareto.write_csv([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().strip() == ",".join(pareto.CSV_COLUMNS)


def test_png_is_a_png(tmp_path):
    path = pareto.plot_png(_sample_points(), tmp_path / "front.png", title="sweep <1>")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert [f.name for f in tmp_path.iterdir()] == ["front.png"]
    # Fractions and percent alike, a single point and no points at all still make an image.
    for i, pts in enumerate([[ParetoPoint("only", 41.0, 120.0)], [], [ParetoPoint("no ap", None, 3.0)]]):
        data = pareto.plot_png(mark_front(pts), tmp_path / f"p{i}.png").read_bytes()
        assert data[:8] == PNG_MAGIC


def test_png_labels_of_close_points_do_not_overlap():
    """A dynamic-ρ curve puts points a few pixels apart (the demo's ρ=0.05 and ρ=0.2 labels were drawn
    over each other); each label goes where it overlaps no other label and no marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sdetr.platform.pareto.plot import place_labels

    fig = Figure(figsize=(8.0, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xy = [(1.00, 30.0), (1.01, 30.1), (1.02, 30.0), (1.015, 29.9), (2.0, 35.0)]
    ax.scatter(*zip(*xy))
    ax.set_xlim(0.9, 2.1)
    ax.set_ylim(25, 40)
    labels = [(f"Sparse ρ={r} (dyn)", x, y, False) for r, (x, y) in zip((0.05, 0.1, 0.2, 0.3, 0.5), xy)]
    annotations = place_labels(ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in annotations]
    assert [a.get_text() for a in annotations] == [t for t, *_ in labels]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    # Far from the cluster, a label keeps the default place: right of and above its point.
    x, y = ax.transData.transform(xy[-1])
    assert boxes[-1].x0 > x and boxes[-1].y0 > y


def test_png_leaves_unlabelled_the_dynamic_point_at_its_trials_own_rho():
    from sdetr.platform.pareto.plot import labelled_points

    trial = ParetoPoint("Sparse ρ=0.1 R18", 9.1, 1.55, trial_id="t3", rho=0.1)
    other = ParetoPoint("Sparse ρ=0.3 R18", 7.0, 1.74, trial_id="t1", rho=0.3)
    dyn = [
        ParetoPoint(f"Sparse ρ={r} R18 (dyn)", ap, g, trial_id="t3", rho=r, source="dynamic_rho")
        for r, ap, g in ((0.05, 9.4, 1.50), (0.1, 9.1, 1.55), (0.3, 7.4, 1.74))
    ]
    labels = [p.label for p in labelled_points([trial, other, *dyn])]
    # ρ = 0.3 of checkpoint t3 is not trial t1's own ρ: both keep their labels.
    assert labels == [
        "Sparse ρ=0.1 R18",
        "Sparse ρ=0.3 R18",
        "Sparse ρ=0.05 R18 (dyn)",
        "Sparse ρ=0.3 R18 (dyn)",
    ]
    # Without its trial (e.g. `sdetr eval` on a checkpoint outside the sweep) every dynamic point is labelled.
    assert len(labelled_points(dyn)) == 3


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def _plotly_figure(page: str) -> tuple[list[dict], dict]:
    """The traces and the layout the page hands to ``Plotly.newPlot(div_id, data, layout, config)``."""
    decoder = json.JSONDecoder()
    calls = page.split("Plotly.newPlot(")
    assert len(calls) == 2, "expected exactly one Plotly.newPlot call"
    args, i = [], 0
    text = calls[1]
    for _ in range(3):
        while text[i] in " \n\t,":
            i += 1
        value, i = decoder.raw_decode(text, i)
        args.append(value)
    div_id, data, layout = args
    assert f'id="{div_id}"' in page
    return data, layout


def _xy(trace) -> list[tuple[float, float]]:
    return list(zip(trace["x"], trace["y"]))


def test_html_is_self_contained_escaped_and_marks_the_front(tmp_path):
    pts = _sample_points()
    path = pareto.write_html(pts, tmp_path / "front.html", title="Sweep <A&B>")
    page = path.read_text(encoding="utf-8")
    assert [f.name for f in tmp_path.iterdir()] == ["front.html"]
    assert page.startswith("<!DOCTYPE html>")
    parsed = _Collect()
    parsed.feed(page)
    tags = [t for t, _ in parsed.tags]
    assert "table" in tags and "script" in tags
    # Self-contained: no external script, style, image or font; plotly.js itself is inlined.
    assert not any(t in ("link", "img", "iframe") or (t == "script" and a.get("src")) for t, a in parsed.tags)
    assert "@import" not in page and len(page) > 1_000_000

    data, layout = _plotly_figure(page)
    assert layout["title"]["text"] == "Sweep &lt;A&amp;B&gt;"  # plotly shows the entities as characters
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == ("GFLOPs", "AP (%)")
    step = [t for t in data if t.get("line", {}).get("shape") == "hv"]
    assert len(step) == 1 and step[0]["mode"] == "lines"
    front = sorted((p.gflops, 100.0 * p.AP) for p in pts if p.on_front)  # AP drawn in percent
    assert _xy(step[0]) == [*front, (177.3, front[-1][1])]  # the corners, then on to the costliest point
    # Every point with AP and GFLOPs is drawn once, with its escaped label and its hover fields.
    points = [t for t in data if "customdata" in t]
    drawn = {}
    for t in points:
        for xy, label, cd, sym in zip(_xy(t), t["text"], t["customdata"], t["marker"]["symbol"]):
            drawn[label, xy] = (t["name"], cd, sym, t["mode"])
    assert len(drawn) == sum(len(t["x"]) for t in points) == sum(p.plottable() for p in pts) == 8
    for p in pts:
        if not p.plottable():
            continue
        name, cd, sym, mode = drawn[html.escape(p.label, quote=False), (p.gflops, 100.0 * p.AP)]
        assert cd[0] == html.escape(p.label, quote=False)
        assert cd[1] == (
            "on the Pareto front" if p.on_front else "dominated" if p.eligible else "not finished"
        )
        assert cd[9:12] == [p.status, p.source, p.trial_id]
        assert sym == ("diamond" if p.source == "dynamic_rho" else "circle")
        if p.source == "dynamic_rho":
            assert name == "dynamic ρ (one checkpoint): trial t2" and mode == "lines+markers+text"
        else:
            expected = (
                "Pareto front" if p.on_front else "dominated" if p.eligible else "error / stopped early"
            )
            assert name == expected and mode == "markers+text"
    assert ('odd &lt;b&gt;"&amp;', (100.0, 30.0)) in drawn
    deformable = drawn["Deformable R50", (172.9, 46.0)][1]
    assert deformable[2:9] == ["46.0", "172.9", "-", "39.8", "-", "resnet50", "r50_deformable_detr"]
    assert deformable[13] == "<br>epochs: 50<br>lr: 0.0002"
    assert all(t["hovertemplate"].count("customdata") == 14 for t in points)
    # Unfinished trials are hollow (transparent fill, grey edge).
    hollow = next(t for t in points if t["name"] == "error / stopped early")
    assert set(hollow["marker"]["color"]) == {"rgba(0,0,0,0)"}

    # The table lists every point (also the one without AP), front members marked, labels escaped.
    rows = [a for t, a in parsed.tags if t == "tr" and "data-front" in a]
    assert len(rows) == len(pts)
    assert [a["data-front"] for a in rows] == ["1"] * 5 + ["0"] * 4  # front first
    assert all(("front" in a["class"].split()) == (a["data-front"] == "1") for a in rows)
    text = "".join(parsed.text)
    for p in pts:
        assert p.label in text, p.label
    assert "<b>" not in page.split("<table", 1)[1] and "odd &lt;b&gt;&quot;&amp;" in page
    assert "<h1>Sweep &lt;A&amp;B&gt;</h1>" in page and "1 point without AP or GFLOPs not shown" in text


def test_html_without_points_and_write_all(tmp_path):
    page = pareto.write_html([], tmp_path / "e.html").read_text(encoding="utf-8")
    assert "No trials" in page and "Plotly" not in page and len(page) < 10_000
    # Points but none with AP and GFLOPs: an empty plot that says so.
    page = pareto.write_html([ParetoPoint("no ap", None, 3.0)], tmp_path / "n.html").read_text("utf-8")
    data, layout = _plotly_figure(page)
    assert data == [] and layout["annotations"][0]["text"] == "no points with AP and GFLOPs"
    pts = _sample_points()
    for p in pts:
        p.on_front = False
    out = pareto.write_all(pts, tmp_path / "arts", title="t")
    assert sorted(out) == ["csv", "html", "png"] and all(p.is_file() for p in out.values())
    assert sorted(f.name for f in (tmp_path / "arts").iterdir()) == [
        "pareto.csv",
        "pareto.html",
        "pareto.png",
    ]
    assert sum(p.on_front for p in pts) == 5  # write_all marks the front itself
