"""Sweeps on Ray Tune: one Tune trial per config, each trial a Ray Train run (``sdetr sweep run``).

The sweep driver (``run_sweep``) validates the sweep file against the cluster, shards the data once,
creates the MLflow store, experiment and parent run once, then hands Tune a function trainable.
Each trial's function (``trial_main``, the "trial driver") measures the model's cost, then runs the
Ray Train run of its checked plan (trial.py) with a callback that forwards rank 0's end-of-epoch
reports, plus the cost, to Tune — so schedulers and searchers see AP and GFLOPs together.

A sweep lives in ``<storage>/<name>`` (platform/layout.py): the validated spec and its record,
``trials/<trial_id>/`` (each a Ray Train run), ``pareto/`` and Tune's own experiment state.

Re-running or ``sdetr sweep resume`` restores the Tune experiment: finished trials are kept,
unfinished and errored ones restart under the same trial id, so their Train runs resume from their
checkpoints and keep their MLflow runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.data import DataContext
from ray.tune.schedulers import ASHAScheduler

from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.layout import (
    DEFAULT_STORAGE,
    MOASHA_FILE,
    OBJECTIVES,
    SPEC_FILE,
    SWEEP_RECORD,
    TIME_ATTR,
    read_json,
    sweep_dir_of,
    write_json,
)
from sdetr.platform.resources import TRIAL_DRIVER_CPUS, cluster_resources
from sdetr.platform.shards.dataset import check_shards
from sdetr.platform.storage import RunStorage, is_uri
from sdetr.platform.sweeps.moasha import MOASHA, SoundResultsSearcher
from sdetr.platform.sweeps.results import finalize, record_states
from sdetr.platform.sweeps.spec import Dimension, SweepSpec, max_epochs, plan_trials
from sdetr.platform.sweeps.trial import SweepContext, trial_main
from sdetr.platform.training.run_plan import check_categories, prepare_data


def _same_spec(saved: dict[str, Any], spec: SweepSpec) -> list[str]:
    now = spec.to_dict()
    ignore = {"path", "storage", "max_concurrent", "max_failures"}
    return sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))


def run_sweep(
    spec: SweepSpec,
    storage: str | None = None,
    name: str | None = None,
    address: str | None = None,
    mlflow_uri: str | None = None,
    resume: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run (or continue) the sweep; returns {"sweep_dir", "trials": [...], "front": [...], "mlflow"}."""
    name = name or spec.name
    if not name or "/" in name:
        raise ConfigError(f"--name {name!r}: a sweep name is one non-empty path component")
    storage = storage or spec.storage or DEFAULT_STORAGE
    sweep_dir = sweep_dir_of(storage, name)
    record_path = sweep_dir / SWEEP_RECORD
    record = read_json(record_path) if record_path.is_file() else None
    if record is not None:
        saved = yaml.safe_load((sweep_dir / SPEC_FILE).read_text())
        changed = _same_spec(saved, spec)
        if changed:
            raise ConfigError(
                f"{sweep_dir}: holds a sweep with a different spec ({', '.join(changed[:5])} differ); "
                f"choose another --name, or `sdetr sweep resume {name}` to continue the saved one"
            )
    elif resume:
        raise ConfigError(f"{sweep_dir}: no sweep to resume there (no {SWEEP_RECORD})")

    # Everything a user can get wrong, before a single trial starts.
    address = address or os.environ.get("RAY_ADDRESS") or None
    cluster = cluster_resources(address)
    cpus_per_worker, concurrent = plan_trials(spec, cluster)
    base = spec.trial_config({})
    data_root = spec.data or base.data.root
    if not is_uri(data_root) and not Path(data_root).expanduser().exists():
        raise ConfigError(f"{spec.where('data')}: data: {Path(data_root).expanduser().resolve()} not found")
    run_storage = RunStorage(str(sweep_dir.parent), name)
    data_path = prepare_data(data_root, run_storage, log)

    check_shards(data_path, ["train", "val"])
    for params in spec.grid_points() or [{}]:
        trial = spec.trial_config(params)
        where = f"{spec.where('preset')}: the trial {params or spec.preset}"
        check_categories(data_path, trial.model.num_classes, where=where)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(
        mlflow_uri if mlflow_uri is not None else spec.mlflow_uri, sweep_dir.parent
    )
    tracked = None
    job_id = os.environ.get("SDETR_RAY_JOB_ID", "")
    if uri is not None:
        previous = (record or {}).get("mlflow") or {}
        tracked = tracking.start_run(
            uri,
            name,
            experiment=spec.experiment,
            artifact_location=run_storage.artifact_location(),
            previous_run_id=previous.get("run_id") if previous.get("tracking_uri") == uri else None,
            params=_parent_params(spec, cpus_per_worker, concurrent),
            tags={
                "sdetr.sweep": name,
                "sdetr.sweep_dir": str(sweep_dir),
                "sdetr.sweep_file": spec.path,
                "sdetr.ray_job_id": job_id,
                "sdetr.kind": "sweep",
            },
            match_tags={"sdetr.sweep_dir": str(sweep_dir)},
            log=log,
        )
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    write_json(
        record_path,
        {
            "name": name,
            "spec_file": spec.path,
            "data": data_path,
            "mlflow": tracked.to_dict() if tracked else None,
            "experiment": spec.experiment,
            "created": (record or {}).get("created", time.time()),
            "status": "running",
        },
    )
    how = spec.algorithm if spec.scheduler == "none" else f"{spec.algorithm}, {spec.scheduler.upper()}"
    log(
        f"{'resuming' if record else 'starting'} sweep {sweep_dir}: {spec.num_trials()} trials "
        f"({how}), {concurrent} at a time, "
        f"each {spec.workers} workers x {cpus_per_worker:g} CPU"
        + (f" + {spec.gpus_per_worker:g} GPU" if spec.gpus_per_worker else "")
    )
    if tracked:
        log(f"MLflow: {uri} (experiment {spec.experiment!r}, parent run {tracked.run_id})")

    context = SweepContext(
        spec=spec,
        sweep_dir=str(sweep_dir),
        data=data_path,
        cpus_per_worker=cpus_per_worker,
        mlflow=tracked.to_dict() if tracked else None,
        ray_job_id=job_id,
    )
    if job_id:
        # A submitted job runs in its unpacked working_dir, which Ray's runtime-env agents may garbage-
        # collect mid-run (seen with two nodes on one machine); Tune's last steps need a valid cwd.
        # Every path is absolute by now.
        os.chdir(sweep_dir)
    status = "FAILED"
    try:
        grid = _tune(spec, sweep_dir, context, concurrent, address, restore=record is not None)
        states = record_states(sweep_dir, grid)
        # Tune returns normally after Ctrl+C too, with trials left pending or running.
        status = "KILLED" if "running" in states.values() else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            summary = finalize(sweep_dir, log=log)
        except Exception as exc:
            if status == "FINISHED":
                raise
            # Never hide why the sweep stopped behind a failure to draw what it had.
            log(f"warning: could not write the Pareto front: {exc}")
            summary = {"points": [], "front": []}
        if status == "KILLED":
            log(f"interrupted: `sdetr sweep resume {name}` continues the unfinished trials")
        if tracked is not None:
            tracking.finish_run(tracked.tracking_uri, tracked.run_id, status)
        record = read_json(record_path, default={})
        record["status"] = status.lower()
        write_json(record_path, record)
    return {
        "sweep_dir": str(sweep_dir),
        "status": status.lower(),
        "mlflow": tracked.to_dict() if tracked else None,
        **summary,
    }


def _parent_params(spec: SweepSpec, cpus_per_worker: float, concurrent: int) -> dict[str, Any]:
    params = {k: v for k, v in spec.to_dict().items() if k not in ("space", "overrides")}
    params.update({f"set.{k}": v for k, v in spec.overrides.items()})
    for d in spec.space:
        params[f"space.{d.key}"] = (
            d.values if d.kind == "grid" else f"{d.kind}({d.values or [d.low, d.high]})"
        )
    params.update(
        {"cpus_per_worker": cpus_per_worker, "concurrent_trials": concurrent, "num_trials": spec.num_trials()}
    )
    return params


def _search_alg(spec: SweepSpec):
    if spec.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed)
    if spec.algorithm.startswith("optuna"):
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - optuna is a dependency
            raise ConfigError(
                f"{spec.where('search.algorithm')}: {spec.algorithm} needs optuna ({exc})"
            ) from None
        if spec.algorithm == "optuna_multi":
            return OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), seed=spec.seed)
        return OptunaSearch(metric="AP", mode="max", seed=spec.seed)
    return None


def _tune(
    spec: SweepSpec,
    sweep_dir: Path,
    context: SweepContext,
    concurrent: int,
    address: str | None,
    restore: bool,
):
    if not ray.is_initialized():
        ray.init(address=address)
    if not context.ray_job_id:
        # Run directly rather than submitted: the Ray driver's job id identifies it on the dashboard.
        context.ray_job_id = ray.get_runtime_context().get_job_id()
        if context.mlflow:
            mlflow = context.mlflow
            tracking.set_tags(
                tracking.client(mlflow["tracking_uri"]),
                mlflow["run_id"],
                {"sdetr.ray_job_id": context.ray_job_id},
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, context=context),
        {"CPU": TRIAL_DRIVER_CPUS, "GPU": 0},
    )
    path = str(sweep_dir)
    if restore and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space=spec.tune_space(),
        tune_config=tune_config(spec, concurrent, sweep_dir),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=max(spec.max_failures, 0)),
            verbose=1,
        ),
    )
    return tuner.fit()


def tune_config(spec: SweepSpec, concurrent: int, sweep_dir: Path):
    """Search algorithm, scheduler and limits. The metric lives on the searcher and the scheduler, not on
    `TuneConfig` (which takes one metric, where the multi-objective search has two). With a scheduler, a
    learning searcher sees only trials trained to the end (`SoundResultsSearcher`): the truncated scores
    of stopped trials would otherwise be recorded as final."""
    scheduler = None
    last = max_epochs(spec)
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            metric="AP",
            mode="max",
            max_t=last,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    elif spec.scheduler == "moasha":
        scheduler = MOASHA(
            objectives=tuple(OBJECTIVES.items()),
            time_attr=TIME_ATTR,
            max_t=last,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            record_file=sweep_dir / MOASHA_FILE,
        )
    search = _search_alg(spec)
    if search is not None and scheduler is not None:
        search = SoundResultsSearcher(search, TIME_ATTR, last)
    return tune.TuneConfig(
        search_alg=search,
        scheduler=scheduler,
        num_samples=spec.num_samples,
        max_concurrent_trials=concurrent,
    )


def resume_sweep(
    name: str, storage: str | None = None, address: str | None = None, log=print
) -> dict[str, Any]:
    """``sdetr sweep resume NAME``: continue the saved spec of ``<storage>/<name>``."""
    sweep_dir = sweep_dir_of(storage, name)
    spec_path = sweep_dir / SPEC_FILE
    if not spec_path.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep there (no {SPEC_FILE}); `sdetr sweep run FILE` starts one")
    record = read_json(sweep_dir / SWEEP_RECORD, default={})
    spec = load_saved_spec(spec_path)
    uri = ((record.get("mlflow") or {}).get("tracking_uri")) or "none"
    return run_sweep(spec, str(sweep_dir.parent), name, address=address, mlflow_uri=uri, resume=True, log=log)


def load_saved_spec(path: Path) -> SweepSpec:
    data = yaml.safe_load(path.read_text())
    space = [Dimension(**d) for d in data.pop("space", [])]
    cost_input = data.pop("cost_input", None)
    spec = SweepSpec(**data, space=space)
    spec.cost_input = tuple(cost_input) if cost_input else None
    return spec
