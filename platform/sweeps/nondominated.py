"""Non-dominated sorting, diversity measures and 2-D hypervolume: the ranking MOASHA promotes by.

Pure Python, no torch / Ray / numpy: the scheduler calls these in Tune's driver loop on a few dozen
points per rung, and the benchmark and the tests call them directly.

Conventions shared by every function:

- ``points`` is a sequence of n points, each a sequence of m objective values (``[AP, GFLOPs]``).
- ``directions`` gives one ``"max"`` or ``"min"`` per objective. Internally every objective is turned
  into "larger is better" by negating the ``"min"`` ones, so dominance is one rule.
- A point with a missing (None) or NaN value cannot be compared with anything: it dominates nothing,
  is dominated by nothing, and is ranked after every comparable point (one last front of its own).
- Exact duplicates do not dominate each other: they share a front and get equal crowding distances,
  so the order in which they were recorded never decides between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sdetr.detector.errors import ConfigError

DIRECTIONS = ("max", "min")
DIVERSITY = ("crowding", "hypervolume")

Vector = tuple[float, ...]


def check_directions(directions: Sequence[str], m: int | None = None) -> list[float]:
    """The sign turning each objective into "larger is better" (+1 for max, -1 for min)."""
    if not directions:
        raise ConfigError("objectives: none given (e.g. [('AP', 'max'), ('gflops', 'min')])")
    for i, d in enumerate(directions):
        if d not in DIRECTIONS:
            raise ConfigError(f"objective {i}: direction {d!r} must be 'max' or 'min'")
    if m is not None and m != len(directions):
        raise ConfigError(f"a point has {m} objective values but {len(directions)} directions were given")
    return [1.0 if d == "max" else -1.0 for d in directions]


def maximised(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[Vector | None]:
    """Every point as a "larger is better" vector, or None when a value is missing or NaN."""
    signs = check_directions(directions)
    out: list[Vector | None] = []
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ConfigError(f"point {i} has {len(p)} objective values, expected {len(signs)}")
        values = [None if v is None else float(v) for v in p]
        if any(v is None or math.isnan(v) for v in values):
            out.append(None)
        else:
            out.append(tuple(s * v for s, v in zip(signs, values)))  # type: ignore[operator]
    return out


def dominates(a: Vector, b: Vector) -> bool:
    """``a`` dominates ``b`` (both maximised): at least as good everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def nondominated_fronts(
    points: Sequence[Sequence[float | None]], directions: Sequence[str]
) -> list[list[int]]:
    """Indices of ``points`` grouped into fronts, best first (Deb et al.'s fast non-dominated sort).

    Front 0 holds the points nothing dominates; front k the points only fronts < k dominate. Points
    with a missing or NaN value form one extra last front. O(m n^2), fine for rungs of a sweep.
    """
    vectors = maximised(points, directions)
    valid = [i for i, v in enumerate(vectors) if v is not None]
    dominated_by = {i: 0 for i in valid}  # how many points dominate i
    dominating: dict[int, list[int]] = {i: [] for i in valid}  # the points i dominates
    for a_pos, i in enumerate(valid):
        for j in valid[a_pos + 1 :]:
            if dominates(vectors[i], vectors[j]):  # type: ignore[arg-type]
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(vectors[j], vectors[i]):  # type: ignore[arg-type]
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in valid if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current = sorted(following)
    invalid = [i for i, v in enumerate(vectors) if v is None]
    if invalid:
        fronts.append(invalid)
    return fronts


def crowding_distance(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[float]:
    """NSGA-II's crowding distance of each point within the set ``points`` (usually one front).

    Per objective, the points are sorted, the two extremes get infinity and every other point the
    gap between its neighbours divided by the objective's range; the distances are summed. Computed
    over the distinct vectors and copied to duplicates, so duplicates get equal distances (NSGA-II
    as written would give one of them infinity and the other zero, by input order). Objectives whose
    range is zero carry no information and are skipped. Points with a missing value get 0.
    """
    vectors = maximised(points, directions)
    unique = sorted({v for v in vectors if v is not None})
    distance = dict.fromkeys(unique, 0.0)
    if len(unique) <= 2:
        distance = dict.fromkeys(unique, math.inf)
    else:
        for k in range(len(directions)):
            order = sorted(unique, key=lambda v: v[k])
            span = order[-1][k] - order[0][k]
            if span <= 0:
                continue
            distance[order[0]] = distance[order[-1]] = math.inf
            for prev, mid, nxt in zip(order, order[1:], order[2:]):
                distance[mid] += (nxt[k] - prev[k]) / span
    return [0.0 if v is None else distance[v] for v in vectors]


def _hv2(vectors: Sequence[Vector], ref: Vector) -> float:
    """Area dominated by maximised 2-D ``vectors`` and bounded by ``ref`` (points not better than
    ``ref`` in both objectives add nothing)."""
    inside = sorted((v for v in vectors if v[0] > ref[0] and v[1] > ref[1]), key=lambda v: (-v[0], -v[1]))
    area, best_y = 0.0, ref[1]
    for x, y in inside:  # x decreasing: each point adds the strip above the best y so far
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def hypervolume_2d(
    points: Sequence[Sequence[float | None]], directions: Sequence[str], reference: Sequence[float]
) -> float:
    """Hypervolume (area) that ``points`` dominate, bounded by the ``reference`` point.

    ``reference`` is in the objectives' own units and directions (e.g. ``[AP_min, GFLOPs_max]`` for
    ``["max", "min"]``). Dominated, missing/NaN points and points not strictly better than the
    reference in both objectives add nothing, so any set of trials can be passed, not only a front.
    """
    if len(directions) != 2:
        raise ConfigError(f"hypervolume_2d: needs 2 objectives, got {len(directions)}")
    (ref,) = maximised([reference], directions)
    if ref is None:
        raise ConfigError(f"hypervolume_2d: reference point {list(reference)} has a missing or NaN value")
    return _hv2([v for v in maximised(points, directions) if v is not None], ref)


def hypervolume_contributions_2d(
    points: Sequence[Sequence[float | None]], directions: Sequence[str], reference: Sequence[float]
) -> list[float]:
    """Each point's exclusive hypervolume: what the set loses when that point alone is removed.

    Dominated points and points outside the reference box contribute 0, and so does each of a pair
    of duplicates (removing one leaves the other). O(n^2 log n).
    """
    total = hypervolume_2d(points, directions, reference)
    (ref,) = maximised([reference], directions)
    vectors = maximised(points, directions)
    out = []
    for i, v in enumerate(vectors):
        if v is None:
            out.append(0.0)
            continue
        rest = [w for j, w in enumerate(vectors) if j != i and w is not None]
        out.append(max(total - _hv2(rest, ref), 0.0))  # type: ignore[arg-type]
    return out


def rank_keys(
    points: Sequence[Sequence[float | None]], directions: Sequence[str], diversity: str = "crowding"
) -> list[tuple[int, float]]:
    """A sort key per point, smaller is better: (front index, minus its diversity within its front).

    ``diversity`` is ``"crowding"`` (crowding distance) or ``"hypervolume"`` (2 objectives only:
    exclusive hypervolume of its distinct point within the front, against the front's nadir pushed
    out by 10% of each objective's range, so the front's extremes contribute too). Points with
    missing values sit in the last front with diversity 0.
    """
    if diversity not in DIVERSITY:
        raise ConfigError(f"diversity {diversity!r}: use one of {', '.join(DIVERSITY)}")
    fronts = nondominated_fronts(points, directions)
    vectors = maximised(points, directions)
    keys: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for f, front in enumerate(fronts):
        members = [points[i] for i in front]
        if vectors[front[0]] is None:
            values = [0.0] * len(front)
        elif diversity == "crowding":
            values = crowding_distance(members, directions)
        else:
            # Over the distinct points, as for crowding: a duplicated extreme would otherwise own nothing.
            distinct = sorted({tuple(map(float, p)) for p in members})
            ref = _padded_nadir(distinct, directions)
            share = dict(zip(distinct, hypervolume_contributions_2d(distinct, directions, ref)))
            values = [share[tuple(map(float, p))] for p in members]
        for i, value in zip(front, values):
            keys[i] = (f, -value)
    return keys


def _padded_nadir(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[float]:
    """The worst value of each objective among ``points``, moved 10% of the range further out (and a
    little more when the range is zero) so the extreme points own a non-empty strip."""
    ref = []
    for k, d in enumerate(directions):
        column = [float(p[k]) for p in points]
        lo, hi = min(column), max(column)
        pad = 0.1 * (hi - lo) or 1e-6 * max(abs(lo), 1.0)
        ref.append(lo - pad if d == "max" else hi + pad)
    return ref
