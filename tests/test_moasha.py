"""MOASHA (issue #16): non-dominated sorting, the promotion rule, the scheduler under real Ray Tune with
stand-in trials (no training), and the searcher wrapper that keeps truncated scores out of Optuna."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sdetr.detector.errors import ConfigError
from sdetr.platform.sweeps.moasha import (
    MOASHA,
    SoundResultsSearcher,
    build_moasha,
    promote,
    read_record,
    rungs_for,
)
from sdetr.platform.sweeps.nondominated import (
    crowding_distance,
    hypervolume_2d,
    hypervolume_contributions_2d,
    nondominated_fronts,
    rank_keys,
)

AP_GFLOPS = ["max", "min"]
NAN = float("nan")


# -- non-dominated sorting ---------------------------------------------------------------------------
def test_fronts_in_order_with_mixed_directions():
    # (AP up, GFLOPs down): a and b trade off, c is dominated by a only, d by everything before it.
    pts = [[46.0, 130.0], [45.0, 105.0], [45.5, 140.0], [44.0, 150.0]]
    assert nondominated_fronts(pts, AP_GFLOPS) == [[0, 1], [2], [3]]
    # AP minimised and GFLOPs maximised: d now dominates everything, and c dominates a.
    assert nondominated_fronts(pts, ["min", "max"]) == [[3], [1, 2], [0]]


def test_three_objectives():
    pts = [[1, 1, 1], [2, 0, 0], [0, 2, 0], [0, 0, 0], [1, 1, 0]]
    assert nondominated_fronts(pts, ["max"] * 3) == [[0, 1, 2], [4], [3]]


def test_duplicates_share_a_front_and_a_crowding_distance():
    pts = [[46.3, 135.6], [45.3, 105.4], [46.3, 135.6], [45.6, 112.9], [45.0, 140.0]]
    fronts = nondominated_fronts(pts, AP_GFLOPS)
    assert fronts[0] == [0, 1, 2, 3] and fronts[1] == [4]
    d = crowding_distance([pts[i] for i in fronts[0]], AP_GFLOPS)
    assert d[0] == d[2] == math.inf and d[1] == math.inf
    # The middle point: (46.3 - 45.3) / 1.0 + (135.6 - 105.4) / 30.2 = 2.
    assert d[3] == pytest.approx(2.0)


def test_nan_and_none_sit_in_a_last_front_and_dominate_nothing():
    pts = [[NAN, 10.0], [40.0, 200.0], [None, 1.0], [41.0, 190.0]]
    assert nondominated_fronts(pts, AP_GFLOPS) == [[3], [1], [0, 2]]
    keys = rank_keys(pts, AP_GFLOPS)
    assert keys[0] == keys[2] == (2, 0.0)


def test_bad_directions_and_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="'up'"):
        nondominated_fronts([[1, 2]], ["max", "up"])
    with pytest.raises(ConfigError, match="point 1 has 1"):
        nondominated_fronts([[1, 2], [1]], AP_GFLOPS)


def test_hypervolume_2d():
    ref = [40.0, 200.0]
    assert hypervolume_2d([], AP_GFLOPS, ref) == 0.0
    assert hypervolume_2d([[46.0, 100.0]], AP_GFLOPS, ref) == pytest.approx(6 * 100)
    # Two trading-off points: 6 x 100 for the accurate one plus the strip 4 x 50 only the cheap one adds.
    two = [[46.0, 100.0], [44.0, 50.0]]
    assert hypervolume_2d(two, AP_GFLOPS, ref) == pytest.approx(6 * 100 + 4 * 50)
    # A dominated point, a NaN and a point outside the reference box add nothing.
    more = two + [[43.0, 120.0], [NAN, 10.0], [39.0, 10.0], [50.0, 250.0]]
    assert hypervolume_2d(more, AP_GFLOPS, ref) == pytest.approx(800.0)
    contrib = hypervolume_contributions_2d(two + [[43.0, 120.0]], AP_GFLOPS, ref)
    assert contrib == pytest.approx([6 * 100 - 4 * 100, 4 * 50, 0.0])


# -- the promotion rule -----------------------------------------------------------------------------
def test_one_trial_is_promoted():
    assert promote([[30.0, 100.0]], AP_GFLOPS, 0, 2)["promoted"]
    assert promote([[NAN, 100.0]], AP_GFLOPS, 0, 3)["promoted"]  # the first at a rung, as in ASHA


def test_a_cheap_less_accurate_trial_on_the_front_is_promoted():
    # Two accurate expensive trials were recorded; the cheap one is worst in AP but on the front.
    pts = [[0.50, 150.0], [0.48, 160.0], [0.30, 100.0]]
    v = promote(pts, AP_GFLOPS, 2, 2)
    assert v == {"promoted": True, "position": 0, "quota": 2, "front": 0}
    assert not promote(pts, AP_GFLOPS, 1, 2)["promoted"]  # dominated by the first


def test_all_dominated_by_one():
    # One trial dominates four others, which form one front; eta = 2 keeps ceil(5/2) = 3.
    pts = [[50.0, 100.0], [40.0, 110.0], [45.0, 130.0], [42.0, 120.0], [43.0, 125.0]]
    assert nondominated_fronts(pts, AP_GFLOPS) == [[0], [1, 2, 3, 4]]
    got = {i: promote(pts, AP_GFLOPS, i, 2) for i in range(5)}
    assert got[0]["promoted"] and got[0]["position"] == 0
    # The extremes of the second front (infinite crowding distance) take the two places left.
    assert got[1]["promoted"] and got[2]["promoted"] and got[1]["position"] == got[2]["position"] == 1
    assert not got[3]["promoted"] and not got[4]["promoted"]
    assert got[3]["position"] >= 3 and got[4]["position"] >= 3


def test_ties_inside_the_last_front_are_broken_by_crowding_distance():
    # Five trade-off points on one front, eta = 2: 3 continue. The extremes have infinite distance;
    # of the three inner points the one with the widest gap to its neighbours is kept.
    pts = [[40.0, 100.0], [41.0, 101.0], [42.0, 110.0], [45.0, 140.0], [46.0, 150.0]]
    d = crowding_distance(pts, AP_GFLOPS)
    assert d[0] == d[4] == math.inf and d[3] > d[2] > d[1]
    promoted = [i for i in range(5) if promote(pts, AP_GFLOPS, i, 2)["promoted"]]
    assert promoted == [0, 3, 4]


def test_exact_duplicates_never_stop_the_newcomer_by_order():
    pts = [[45.0, 120.0], [45.0, 120.0]]
    assert promote(pts, AP_GFLOPS, 0, 2)["promoted"] and promote(pts, AP_GFLOPS, 1, 2)["promoted"]
    # ... but a duplicate of a dominated point is still dominated.
    pts = [[46.0, 110.0], [45.0, 120.0], [45.0, 120.0]]
    assert not promote(pts, AP_GFLOPS, 2, 3)["promoted"]


def test_hypervolume_diversity_breaks_ties_too():
    pts = [[40.0, 100.0], [41.0, 101.0], [42.0, 110.0], [45.0, 140.0], [46.0, 150.0]]
    keys = rank_keys(pts, AP_GFLOPS, "hypervolume")
    assert all(k[0] == 0 for k in keys) and all(k[1] < 0 for k in keys)
    kept = [i for i in range(5) if promote(pts, AP_GFLOPS, i, 2, "hypervolume")["promoted"]]
    assert len(kept) == 3


# -- the scheduler without a cluster ----------------------------------------------------------------
def result(ap, gflops, epochs):
    return {"AP": ap, "gflops": gflops, "epochs_done": epochs}


def test_rungs_and_decisions_and_record_file(tmp_path):
    assert rungs_for(1, 2, 8) == [1, 2, 4] and rungs_for(3, 3, 27) == [3, 9] and rungs_for(4, 2, 4) == []
    record = tmp_path / "moasha.json"
    s = MOASHA(max_t=4, grace_period=1, reduction_factor=2, record_file=record)
    a, b, c = (SimpleNamespace(trial_id=t) for t in "abc")
    for t in (a, b, c):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, a, {"AP": 0.5}) == "CONTINUE"  # no epochs_done: not ranked
    assert s.on_trial_result(None, a, result(0.5, 150, 1)) == "CONTINUE"
    assert s.on_trial_result(None, b, result(0.4, 160, 1)) == "STOP"
    assert s.on_trial_result(None, c, result(0.3, 100, 1)) == "CONTINUE"
    assert s.on_trial_result(None, c, result(0.35, 100, 3)) == "CONTINUE"  # first at rung 2
    assert s.on_trial_result(None, c, result(0.4, 100, 4)) == "STOP"  # max_t: finished, not stopped early
    assert s.stopped_at == {"b": 1}
    saved = read_record(record)
    assert saved["stopped_at"] == {"b": 1} and len(saved["decisions"]) == 4
    assert saved["recorded"]["2"] == {"c": [0.35, 100.0]}

    # A resumed sweep's fresh scheduler reloads the rungs: a trial at rung 1 now meets a, b and c.
    again = MOASHA(max_t=4, grace_period=1, reduction_factor=2, record_file=record)
    d = SimpleNamespace(trial_id="d")
    again.on_trial_add(None, d)
    assert again.on_trial_result(None, d, result(0.2, 170, 1)) == "STOP"
    assert again.stopped_at == {"b": 1, "d": 1}
    with pytest.raises(ConfigError, match="other settings"):
        MOASHA(max_t=8, record_file=record).on_trial_add(None, d)


def test_build_moasha_from_the_sweep_file_mapping():
    s = build_moasha({"type": "moasha", "grace_period": 2, "reduction_factor": 3}, max_t=18)
    assert (s.grace_period, s.reduction_factor, s.max_t, s.rungs) == (2, 3, 18, [2, 6])
    assert build_moasha({"type": "moasha", "max_t": 8}, max_t=50).max_t == 8
    for bad, match in (
        ({"type": "asha"}, "not moasha"),
        ({"grace": 1}, "unknown keys"),
        ({"reduction_factor": 1}, "reduction_factor: expected an integer >= 2"),
        ({"grace_period": 0}, "grace_period: expected"),
        ({"grace_period": 9, "max_t": 4}, "beyond max_t"),
        ({}, "max_t: missing"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_moasha(bad, where="s.yaml:3: scheduler")


# -- real Ray Tune with stand-in trials -------------------------------------------------------------
MAX_T = 4
# Reported each epoch: AP grows to its level; GFLOPs is the trial's fixed cost (known before training).
STAND_INS = {
    "accurate": (0.50, 150.0),
    "accurate_dominated": (0.48, 160.0),
    "cheap_on_front": (0.30, 100.0),
}


def stand_in(config):
    from ray import tune

    level, gflops = STAND_INS[config["name"]]
    for epoch in range(1, MAX_T + 1):
        tune.report({"AP": level * epoch / MAX_T, "gflops": gflops, "epochs_done": epoch})


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def fit(tmp_path, name, trainable, param_space, **tune_config):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.01}),
        param_space=param_space,
        # One trial at a time: the rung each trial meets is fixed, so no decision depends on timing.
        # Reused actors: the stand-ins hold no state, and starting one actor per trial is most of the time.
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "runs"), verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors
    return {r.config.get("name", r.metrics.get("trial_id")): r.metrics["epochs_done"] for r in grid}


@pytest.mark.slow
def test_a_front_trial_survives_moasha_where_asha_stops_it(ray_local, tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = {"name": tune.grid_search(list(STAND_INS))}  # in this order: the cheap trial comes last
    asha = ASHAScheduler(
        time_attr="epochs_done", metric="AP", mode="max", max_t=MAX_T, grace_period=1, reduction_factor=2
    )
    done = fit(tmp_path, "asha", stand_in, space, scheduler=asha)
    assert done == {"accurate": MAX_T, "accurate_dominated": 1, "cheap_on_front": 1}

    moasha = MOASHA(max_t=MAX_T, grace_period=1, reduction_factor=2, record_file=tmp_path / "m.json")
    done = fit(tmp_path, "moasha", stand_in, space, scheduler=moasha)
    assert done == {"accurate": MAX_T, "accurate_dominated": 1, "cheap_on_front": MAX_T}
    stopped = read_record(tmp_path / "m.json")["stopped_at"]
    assert list(stopped.values()) == [1] and stopped == moasha.stopped_at


def final_ap(x: float, y: float) -> float:
    return (0.3 + 0.3 * x) * (1 - 0.8 * y)


def sampled(config):
    """AP rises with x and falls with y; GFLOPs rise with x. High-y trials are dominated at rungs."""
    from ray import tune

    x, y = config["x"], config["y"]
    for epoch in range(1, MAX_T + 1):
        ap = final_ap(x, y) * epoch / MAX_T
        tune.report({"AP": ap, "gflops": 100.0 + 100.0 * x, "epochs_done": epoch})


def optuna_run(tmp_path, name, wrap: bool):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna = OptunaSearch(metric=["AP", "gflops"], mode=["max", "min"], seed=3)
    searcher = SoundResultsSearcher(optuna, "epochs_done", MAX_T) if wrap else optuna
    moasha = MOASHA(max_t=MAX_T, grace_period=1, reduction_factor=2)
    space = {"x": tune.uniform(0, 1), "y": tune.uniform(0, 1)}
    done = fit(tmp_path, name, sampled, space, search_alg=searcher, scheduler=moasha, num_samples=8)
    return optuna._ot_study, moasha, done


@pytest.mark.slow
def test_the_searcher_learns_only_from_trials_trained_to_the_end(ray_local, tmp_path):
    import optuna

    study, moasha, _ = optuna_run(tmp_path, "sound", wrap=True)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8 and moasha.stopped_at, "the scheduler stopped nothing: the test shows nothing"
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(moasha.stopped_at) and len(complete) + len(pruned) == 8
    for t in complete:  # the values Optuna holds are the final epoch's, never a rung's
        x, y = t.params["x"], t.params["y"]
        assert t.values == pytest.approx([final_ap(x, y), 100.0 + 100.0 * x])
    assert {t.number for t in study.best_trials} <= {t.number for t in complete}
    print(f"sound: {len(complete)} complete, {len(pruned)} pruned")


@pytest.mark.slow
def test_unwrapped_the_searcher_records_truncated_scores(ray_local, tmp_path):
    """The control: what the wrapper prevents happens without it (so the test above can fail)."""
    study, moasha, _ = optuna_run(tmp_path, "raw", wrap=False)
    truncated = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.values and t.values[0] < final_ap(t.params["x"], t.params["y"]) - 1e-9
    ]
    assert moasha.stopped_at and len(truncated) == len(moasha.stopped_at)
    print(f"raw: {len(truncated)} trials recorded COMPLETE with a rung's AP")
