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
    TRIAL_STATES_FILE,
    TRIALS_DIR,
)
from sdetr.platform.ray_logging import init_ray
from sdetr.platform.resources import TRIAL_DRIVER_CPUS, cluster_resources
from sdetr.platform.shards.dataset import check_shards
from sdetr.platform.storage import Location, RunStorage, is_uri
from sdetr.platform.sweeps.heartbeat import Heartbeat
from sdetr.platform.sweeps.moasha import MOASHA, SoundResultsSearcher
from sdetr.platform.sweeps.progress import SweepProgress, quiet_tune_output
from sdetr.platform.sweeps.results import finalize, record_states
from sdetr.platform.sweeps.spec import Dimension, SweepSpec, max_epochs, plan_trials
from sdetr.platform.sweeps.summary import DESCRIPTION_TAG, sweep_description
from sdetr.platform.sweeps.trial import SweepContext, trial_main
from sdetr.platform.training.run_plan import check_categories, prepare_data
from sdetr.platform.uris import MASK, check_tracking_uri, redact


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
    root = Location(storage or spec.storage or DEFAULT_STORAGE).check()  # unknown scheme, unreachable
    sweep = root.child(name)
    record = sweep.read_json(SWEEP_RECORD)
    if record is not None:
        saved = yaml.safe_load(sweep.read_text(SPEC_FILE) or "{}")
        changed = _same_spec(saved, spec)
        if changed:
            raise ConfigError(
                f"{sweep}: holds a sweep with a different spec ({', '.join(changed[:5])} differ); "
                f"choose another --name, or `sdetr sweep resume {name}` to continue the saved one"
            )
    elif resume:
        raise ConfigError(f"{sweep}: no sweep to resume there (no {SWEEP_RECORD})")
    # An unreachable or misspelt tracking URI fails here, in seconds, before Ray starts.
    uri = tracking.resolve_tracking_uri(mlflow_uri if mlflow_uri is not None else spec.mlflow_uri, root.local)
    if uri is not None:
        check_tracking_uri(uri)
    if _nothing_left(sweep, record, spec):
        # Tune would restore the experiment (a Ray cluster, the trial table) only to find every trial
        # done: redraw the front and refresh MLflow's marks instead.
        log(f"sweep {sweep} has finished: every trial completed or was stopped by its scheduler")
        summary = finalize(sweep, log=log, tracking_uri=uri)
        return {"sweep_dir": str(sweep), "status": "finished", "mlflow": record.get("mlflow"), **summary}

    # Everything a user can get wrong, before a single trial starts.
    address = address or os.environ.get("RAY_ADDRESS") or None
    cluster = cluster_resources(address)
    cpus_per_worker, concurrent = plan_trials(spec, cluster)
    base = spec.trial_config({})
    data_root = spec.data or base.data.root
    if not is_uri(data_root) and not Path(data_root).expanduser().exists():
        raise ConfigError(f"{spec.where('data')}: data: {Path(data_root).expanduser().resolve()} not found")
    run_storage = RunStorage(root.uri, name)
    data_path = prepare_data(data_root, run_storage, log)

    check_shards(data_path, ["train", "val"])
    for params in spec.grid_points() or [{}]:
        trial = spec.trial_config(params)
        where = f"{spec.where('preset')}: the trial {params or spec.preset}"
        check_categories(data_path, trial.model.num_classes, where=where)

    sweep.check(create=True)
    tracked = None
    job_id = os.environ.get("SDETR_RAY_JOB_ID", "")
    if uri is not None:
        previous = (record or {}).get("mlflow") or {}
        tracked = tracking.start_run(
            uri,
            name,
            experiment=spec.experiment,
            artifact_location=run_storage.artifact_location(),
            previous_run_id=previous.get("run_id") if previous.get("tracking_uri") == redact(uri) else None,
            params=_parent_params(spec, cpus_per_worker, concurrent),
            tags={
                "sdetr.sweep": name,
                "sdetr.sweep_dir": str(sweep),
                "sdetr.sweep_file": spec.path,
                "sdetr.ray_job_id": job_id,
                "sdetr.kind": "sweep",
                DESCRIPTION_TAG: sweep_description(spec),
            },
            match_tags={"sdetr.sweep_dir": str(sweep)},
            log=log,
        )
    sweep.write_text(SPEC_FILE, yaml.safe_dump(_saved_spec(spec), sort_keys=False))
    # Never a password in the record (a file on shared storage); `resume` asks for the URI again.
    saved_mlflow = {**tracked.to_dict(), "tracking_uri": redact(uri)} if tracked else None
    heartbeat = Heartbeat(
        sweep,
        {
            "name": name,
            "spec_file": spec.path,
            "data": data_path,
            "mlflow": saved_mlflow,
            "experiment": spec.experiment,
            "created": (record or {}).get("created", time.time()),
            "status": "running",
        },
    )
    log(
        f"{'resuming' if record else 'starting'} sweep {sweep}: {spec.num_trials()} trials "
        f"({spec.algorithm}{', ASHA' if spec.scheduler == 'asha' else ''}), {concurrent} at a time, "
        f"each {spec.workers} workers x {cpus_per_worker:g} CPU"
        + (f" + {spec.gpus_per_worker:g} GPU" if spec.gpus_per_worker else "")
    )
    if tracked:
        log(f"MLflow: {redact(uri)} (experiment {spec.experiment!r}, parent run {tracked.run_id})")

    context = SweepContext(
        spec=spec,
        sweep_dir=str(sweep),
        data=data_path,
        cpus_per_worker=cpus_per_worker,
        mlflow=tracked.to_dict() if tracked else None,
        ray_job_id=job_id,
    )
    if job_id and sweep.local is not None:
        # A submitted job runs in its unpacked working_dir, which Ray's runtime-env agents may garbage-
        # collect mid-run (seen with two nodes on one machine); Tune's last steps need a valid cwd.
        # Every path is absolute by now.
        os.chdir(sweep.local)
    status = "FAILED"
    try:
        grid = _tune(spec, sweep, context, concurrent, address, restore=record is not None, log=log)
        states = record_states(sweep, grid)
        # Tune returns normally after Ctrl+C too, with trials left pending or running.
        status = "KILLED" if "running" in states.values() else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        heartbeat.stop()
        try:
            summary = finalize(sweep, log=log, tracking_uri=uri)
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
        heartbeat.finish(status.lower())
    return {
        "sweep_dir": str(sweep),
        "status": status.lower(),
        "mlflow": saved_mlflow,
        **summary,
    }


def _nothing_left(sweep: Location, record: dict | None, spec: SweepSpec) -> bool:
    """The saved sweep finished with every trial completed or stopped early (none errored or pending)."""
    if not record or record.get("status") != "finished":
        return False
    states = sweep.read_json(TRIAL_STATES_FILE) or {}
    ended = ("completed", "stopped_early")
    return len(states) >= spec.num_trials() and all(state in ended for state in states.values())


def _saved_spec(spec: SweepSpec) -> dict[str, Any]:
    """The spec as ``sweep.yaml`` and the parent run's params hold it: no password in its URI."""
    data = spec.to_dict()
    if data.get("mlflow_uri"):
        data["mlflow_uri"] = redact(data["mlflow_uri"])
    return data


def _parent_params(spec: SweepSpec, cpus_per_worker: float, concurrent: int) -> dict[str, Any]:
    params = {k: v for k, v in _saved_spec(spec).items() if k not in ("space", "overrides")}
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
    sweep: Location,
    context: SweepContext,
    concurrent: int,
    address: str | None,
    restore: bool,
    log=print,
):
    init_ray(address)
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
    path = str(sweep)  # a folder or a URI: Tune reads and writes it through pyarrow as we do
    # MOASHA's record is a local file: with a sweep on object storage it stays on the driver's machine.
    local_dir = sweep.local or Path.home() / ".cache" / "sdetr" / "sweeps" / sweep.name
    # Where the status line finds the running trials' positions (not on object storage).
    trials_dir = str(sweep.local / TRIALS_DIR) if sweep.local is not None else None
    if restore and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        with quiet_tune_output():
            return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space=spec.tune_space(),
        tune_config=tune_config(spec, concurrent, local_dir),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=path.rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=max(spec.max_failures, 0)),
            # Tune's table is 166 columns of loss terms; SweepProgress prints a line per trial event.
            verbose=0,
            callbacks=[SweepProgress(spec, log, trials_dir=trials_dir)],
        ),
    )
    with quiet_tune_output():
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
    name: str,
    storage: str | None = None,
    address: str | None = None,
    mlflow_uri: str | None = None,
    log=print,
) -> dict[str, Any]:
    """``sdetr sweep resume NAME``: continue the saved spec of ``<storage>/<name>``.

    The tracking URI is the saved one; one saved with a masked password must be given again
    (``--mlflow-uri`` or $MLFLOW_TRACKING_URI), since sdetr never saves a password.
    """
    root = Location(storage or DEFAULT_STORAGE).check()
    sweep = root.child(name)
    text = sweep.read_text(SPEC_FILE)
    if text is None:
        raise ConfigError(f"{sweep}: no sweep there (no {SPEC_FILE}); `sdetr sweep run FILE` starts one")
    record = sweep.read_json(SWEEP_RECORD, default={})
    spec = load_saved_spec(text)
    saved = ((record.get("mlflow") or {}).get("tracking_uri")) or "none"
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or saved
    if MASK in uri:
        raise ConfigError(
            f"{sweep}: its MLflow URI {saved} had a password, which sdetr does not save; give it again "
            "with --mlflow-uri or $MLFLOW_TRACKING_URI (or use MLFLOW_TRACKING_USERNAME/_PASSWORD)"
        )
    if redact(uri) != saved and saved != "none":
        log(f"note: the sweep was tracked in {saved}; continuing in {redact(uri)}")
    return run_sweep(spec, root.uri, name, address=address, mlflow_uri=uri, resume=True, log=log)


def load_saved_spec(text: str) -> SweepSpec:
    """The `SweepSpec` of a sweep's saved ``sweep.yaml`` (its text)."""
    data = yaml.safe_load(text)
    space = [Dimension(**d) for d in data.pop("space", [])]
    cost_input = data.pop("cost_input", None)
    spec = SweepSpec(**data, space=space)
    spec.cost_input = tuple(cost_input) if cost_input else None
    return spec
