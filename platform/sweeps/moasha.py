"""MOASHA: asynchronous successive halving that promotes by non-dominated sorting (a Ray Tune scheduler).

Ray Tune's ASHA ranks the trials at a rung by one metric. In an AP-versus-GFLOPs sweep that stops
exactly the cheap, less accurate trials the Pareto front is made of. MOASHA (Schmucker et al. 2021,
"Multi-objective multi-fidelity hyperparameter optimization with application to fairness"; syne-tune's
``MOASHA``) keeps ASHA's asynchronous stop-or-continue rule and replaces the ranking:

- Rungs are at ``grace_period * eta**k`` epochs (``time_attr``, sdetr's ``epochs_done``), below
  ``max_t``. A trial reaching a rung is recorded there with its objective values at that epoch, then
  ranked among the n trials recorded at that rung so far: fronts of the non-dominated sort in order,
  ties inside a front broken by crowding distance (larger first).
- It continues iff fewer than ``ceil(n / eta)`` recorded trials rank strictly before it. This is the
  rank form of Ray's ASHA cutoff (continue iff at least the (1 - 1/eta) quantile of the other n - 1;
  Ray interpolates between two ranks where this counts ranks), so the two schedulers stop about
  equally many trials and differ in the ranking. The first trial at a
  rung always continues; an exact tie never stops the newcomer. Decisions are final, as in Ray's ASHA.

Why crowding distance and not hypervolume contribution: it needs no reference point (at an early rung
the AP scale is unknown, and a hypervolume contribution's extremes depend on that arbitrary point), it
always keeps the cheapest and the most accurate trial of a front (their distance is infinite), it is
scale-free per objective and works for any number of objectives. ``diversity="hypervolume"`` is kept
for comparison (``benchmarks/moasha.py`` runs both).

Trials stopped early are listed in ``stopped_at`` (trial id -> rung in epochs) and, with
``record_file``, in a JSON file that also holds every decision and every rung's records; a resumed
sweep reloads it, so its rungs keep their history (Tune does not checkpoint schedulers).
``SoundResultsSearcher`` (below) keeps the truncated scores of stopped trials away from the searcher.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler
from ray.tune.search.searcher import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

from sdetr.detector.errors import ConfigError
from sdetr.platform.layout import OBJECTIVES, TIME_ATTR, write_text_atomic
from sdetr.platform.sweeps.nondominated import DIVERSITY, check_directions, rank_keys

# sdetr's sweep objectives, in the names trials report to Tune.
DEFAULT_OBJECTIVES = tuple(OBJECTIVES.items())
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor", "max_t"}


def rungs_for(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Rung milestones below ``max_t``: grace_period * eta**k (a trial at max_t is done, not ranked)."""
    out, k = [], 0
    while grace_period * reduction_factor**k < max_t:
        out.append(int(round(grace_period * reduction_factor**k)))
        k += 1
    return out


def promote(
    points: Sequence[Sequence[float | None]],
    directions: Sequence[str],
    newcomer: int,
    reduction_factor: float,
    diversity: str = "crowding",
) -> dict[str, Any]:
    """The promotion rule for ``points[newcomer]`` among all ``points`` recorded at one rung.

    Returns {"promoted", "position" (how many rank strictly before it), "quota" (ceil(n / eta)),
    "front" (0 = non-dominated)}.
    """
    keys = rank_keys(points, directions, diversity)
    mine = keys[newcomer]
    position = sum(1 for i, k in enumerate(keys) if i != newcomer and k < mine)
    # round(): n / eta computed in floating point must not turn 2.0 into 2.0000000001.
    quota = max(1, math.ceil(round(len(points) / reduction_factor, 9)))
    return {"promoted": position < quota, "position": position, "quota": quota, "front": mine[0]}


class MOASHA(FIFOScheduler):
    """Multi-objective ASHA over ``time_attr``; see the module docstring for the rule.

    Args:
        objectives: (result key, "max" | "min") pairs, e.g. (("AP", "max"), ("gflops", "min")).
        time_attr: the monotonic progress key of the results (sdetr: ``epochs_done``).
        max_t: a trial reaching it is stopped as finished (sdetr: the trials' epochs).
        grace_period: the first rung.
        reduction_factor: eta; the top ceil(n / eta) of a rung continue.
        diversity: "crowding" (default) or "hypervolume" (2 objectives), the tie-break inside a front.
        record_file: optional JSON file with the stop rungs, decisions and rung records (reloaded).
    """

    def __init__(
        self,
        objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
        time_attr: str = TIME_ATTR,
        max_t: int = 100,
        grace_period: int = 1,
        reduction_factor: float = 2,
        diversity: str = "crowding",
        record_file: str | os.PathLike | None = None,
    ):
        super().__init__()
        objectives = [tuple(o) for o in objectives]
        if any(len(o) != 2 for o in objectives):
            raise ConfigError(f"MOASHA objectives: expected (name, 'max'|'min') pairs, got {objectives}")
        check_directions([d for _, d in objectives])
        for name, value, ok in (
            ("max_t", max_t, isinstance(max_t, int) and max_t >= 1),
            ("grace_period", grace_period, isinstance(grace_period, int) and 1 <= grace_period <= max_t),
            (
                "reduction_factor",
                reduction_factor,
                isinstance(reduction_factor, (int, float)) and reduction_factor > 1,
            ),
        ):
            if isinstance(value, bool) or not ok:
                raise ConfigError(
                    f"MOASHA {name}: {value!r} is invalid (need integers 1 <= grace_period <= max_t "
                    "and reduction_factor > 1)"
                )
        if diversity not in DIVERSITY:
            raise ConfigError(f"MOASHA diversity: {diversity!r}; use one of {', '.join(DIVERSITY)}")
        if diversity == "hypervolume" and len(objectives) != 2:
            raise ConfigError("MOASHA diversity 'hypervolume' needs exactly 2 objectives")
        self.objectives = objectives
        self.time_attr = time_attr
        self.max_t = max_t
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor
        self.diversity = diversity
        self.rungs = rungs_for(grace_period, reduction_factor, max_t)
        self.record_file = str(record_file) if record_file else None
        self.recorded: dict[int, dict[str, list[float | None]]] = {r: {} for r in self.rungs}
        self.stopped_at: dict[str, int] = {}
        self.decisions: list[dict[str, Any]] = []
        self._loaded = False

    # -- Tune's scheduler interface ------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        # The objectives are the scheduler's own; a TuneConfig metric/mode would be a second opinion.
        return metric is None and mode is None

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        if self.time_attr not in result or any(name not in result for name, _ in self.objectives):
            return TrialScheduler.CONTINUE  # not an epoch-end report: nothing to rank (as Ray's ASHA)
        now = result[self.time_attr]
        if now >= self.max_t:
            return TrialScheduler.STOP  # finished
        reached = [r for r in self.rungs if r <= now and trial.trial_id not in self.recorded[r]]
        if not reached:
            return TrialScheduler.CONTINUE
        rung = reached[-1]  # a trial that skipped rungs is judged once, at the highest it reached
        return self.judge(trial.trial_id, rung, [result[name] for name, _ in self.objectives])

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        pass  # every decision was taken on results; a finished trial changes no rung

    def on_trial_remove(self, tune_controller, trial) -> None:
        pass

    def on_trial_error(self, tune_controller, trial) -> None:
        pass

    def debug_string(self) -> str:
        rungs = ", ".join(f"{r}: {len(self.recorded[r])}" for r in self.rungs)
        return (
            f"Using MOASHA ({self.diversity}): stopped {len(self.stopped_at)}; recorded per rung {{{rungs}}}"
        )

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # -- the rule ------------------------------------------------------------------------------------
    def judge(self, trial_id: str, rung: int, values: Sequence[float | None]) -> str:
        """Record ``values`` for ``trial_id`` at ``rung`` and decide; CONTINUE or STOP."""
        recorded = self.recorded[rung]
        recorded[trial_id] = [None if v is None else float(v) for v in values]
        ids = list(recorded)
        verdict = promote(
            [recorded[t] for t in ids],
            [d for _, d in self.objectives],
            ids.index(trial_id),
            self.reduction_factor,
            self.diversity,
        )
        if not verdict["promoted"]:
            self.stopped_at[trial_id] = rung
        self.decisions.append(
            {
                "trial_id": trial_id,
                "rung": rung,
                "values": recorded[trial_id],
                "recorded": len(ids),
                **verdict,
            }
        )
        self._write()
        return TrialScheduler.CONTINUE if verdict["promoted"] else TrialScheduler.STOP

    # -- the record file -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "objectives": [list(o) for o in self.objectives],
            "time_attr": self.time_attr,
            "max_t": self.max_t,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
            "diversity": self.diversity,
            "rungs": self.rungs,
            "stopped_at": self.stopped_at,
            "recorded": {str(r): v for r, v in self.recorded.items()},
            "decisions": self.decisions,
        }

    def _write(self) -> None:
        if not self.record_file:
            return
        # NaN is written as NaN (Python's json reads it back).
        write_text_atomic(self.record_file, json.dumps(self.state(), indent=1))

    def _load_once(self) -> None:
        """Reload the rungs of an interrupted sweep (Tune restores trials, not scheduler state)."""
        if self._loaded:
            return
        self._loaded = True
        if not self.record_file or not Path(self.record_file).is_file():
            return
        saved = read_record(self.record_file)
        mine = self.state()
        changed = [k for k in ("objectives", "rungs", "max_t", "reduction_factor") if saved.get(k) != mine[k]]
        if changed:
            raise ConfigError(
                f"{self.record_file}: written by a MOASHA with other settings ({', '.join(changed)} differ); "
                "delete it or use the original scheduler settings"
            )
        self.recorded = {r: dict(saved["recorded"].get(str(r), {})) for r in self.rungs}
        self.stopped_at = dict(saved["stopped_at"])
        self.decisions = list(saved["decisions"])


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A MOASHA record file: {"stopped_at": {trial_id: rung}, "decisions": [...], "recorded": ...}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable MOASHA record ({exc})") from None
    if not isinstance(data, dict) or not {"stopped_at", "recorded", "decisions"} <= set(data):
        raise ConfigError(f"{path}: not a MOASHA record (needs stopped_at, recorded and decisions)")
    return data


def build_moasha(
    config: dict[str, Any],
    objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
    max_t: int | None = None,
    record_file: str | os.PathLike | None = None,
    where: str = "scheduler",
) -> MOASHA:
    """MOASHA from a sweep file's ``scheduler:`` mapping {type: moasha, grace_period, reduction_factor,
    max_t}. ``max_t`` from the mapping wins over the argument (the trials' epochs); errors name ``where``
    (e.g. "sweeps/pareto_optuna.yaml:12: scheduler")."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping {{type: moasha, ...}}, got {config!r}")
    unknown = sorted(set(config) - SCHEDULER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(SCHEDULER_KEYS))}")
    if config.get("type", "moasha") != "moasha":
        raise ConfigError(f"{where}.type: {config.get('type')!r} is not moasha")
    values = {"grace_period": 1, "reduction_factor": 2, "max_t": max_t}
    for key in values:
        value = config.get(key, values[key])
        if value is None:
            raise ConfigError(f"{where}.{key}: missing (the number of epochs a finished trial trains)")
        minimum = 2 if key == "reduction_factor" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
        values[key] = value
    if values["grace_period"] > values["max_t"]:
        raise ConfigError(
            f"{where}.grace_period: {values['grace_period']} is beyond max_t {values['max_t']} "
            "(no rung to stop at)"
        )
    return MOASHA(objectives=objectives, record_file=record_file, **values)


class SoundResultsSearcher(Searcher):
    """Wraps a Tune ``Searcher`` so that it learns only from trials trained to ``max_t``.

    Tune hands a searcher ``on_trial_complete(trial_id, result=<last result>)`` for every trial that
    ends, including one a scheduler stopped at a rung; Ray 2.60's ``OptunaSearch`` then tells Optuna
    COMPLETE with the truncated AP, which puts half-trained models on the study's Pareto front and in
    TPE's "good" group. Here a trial is sound iff its last result has ``time_attr >= max_t``:

    - sound: forwarded unchanged (Optuna: COMPLETE with the final values);
    - errored: forwarded with ``error=True`` (Optuna: FAIL);
    - stopped early (or cut short otherwise): forwarded with no result and ``error=False``, which
      ``OptunaSearch`` records as PRUNED, Optuna's own state for a multi-fidelity stop. PRUNED trials
      never enter ``study.best_trials``; TPE counts them in its "bad" group once enough trials
      completed. Their ids are kept in ``pruned``.

    Intermediate results go through unchanged (multi-objective OptunaSearch ignores them). Use it
    around the searcher, under Tune's own ConcurrencyLimiter: ``SoundResultsSearcher(OptunaSearch(...),
    "epochs_done", max_t)``. Grid and random search (BasicVariantGenerator) learn nothing: no wrapper.
    """

    def __init__(self, searcher: Searcher, time_attr: str = TIME_ATTR, max_t: int = 1):
        if not isinstance(searcher, Searcher):
            raise ConfigError(
                f"SoundResultsSearcher wraps a ray.tune Searcher, got {type(searcher).__name__}"
            )
        self.searcher = searcher
        self.time_attr = time_attr
        self.max_t = max_t
        self.pruned: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def metric(self):
        return self.searcher.metric

    @property
    def mode(self):
        return self.searcher.mode

    def is_sound(self, result: dict | None) -> bool:
        return bool(result) and (result.get(self.time_attr) or 0) >= self.max_t

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or self.is_sound(result):
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        self.pruned.add(trial_id)
        self.searcher.on_trial_complete(trial_id, result=None, error=False)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return _set_search_properties_backwards_compatible(
            self.searcher.set_search_properties, metric, mode, config, **spec
        )

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def add_evaluated_point(self, parameters, value, error=False, pruned=False, intermediate_values=None):
        return self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)

    # Tune checkpoints a wrapper's own state with get_state and the wrapped searcher separately.
    def get_state(self) -> dict:
        return {"time_attr": self.time_attr, "max_t": self.max_t, "pruned": sorted(self.pruned)}

    def set_state(self, state: dict) -> None:
        self.time_attr, self.max_t, self.pruned = state["time_attr"], state["max_t"], set(state["pruned"])

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)
