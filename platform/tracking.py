"""MLflow helpers shared by distributed training and sweeps.

The store, the experiment and the run are created once, by one process (the driver), before any
worker starts: a fresh SQLite store opened by several processes at once races on its schema, and
concurrent ``set_experiment`` calls against a server can silently drop runs into the Default
experiment. Workers only ever get a tracking URI and a run id, and log into that run in batches
(a SQLite store manages a few dozen calls per second in total).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform.uris import redact

DEFAULT_EXPERIMENT = "sdetr"
DB_NAME = "mlflow.db"
DISABLED = ("none", "off", "false", "0", "")
# MLflow's own limits per log_batch call and per param value.
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


def sqlite_uri(path: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db``: absolute, because Ray workers run in other directories."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def normalize_uri(uri: str) -> str:
    """Make relative SQLite URIs and bare ``*.db`` paths absolute; other URIs pass through."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return sqlite_uri(uri[len("sqlite:///") :])
    if "://" not in uri:
        if uri.endswith(".db"):
            return sqlite_uri(uri)
        raise ConfigError(
            f"MLflow tracking URI {uri!r}: expected a server (http://host:5000), a database "
            "(sqlite:////abs/path/mlflow.db, postgresql://...) or a path ending in .db"
        )
    return uri


def resolve_tracking_uri(explicit: str | None, default_dir: str | Path | None) -> str | None:
    """The tracking URI to use: ``explicit`` (--mlflow-uri), else $MLFLOW_TRACKING_URI, else a SQLite
    store in ``default_dir``. ``none``/``off`` disables tracking (returns None)."""
    uri = explicit if explicit is not None else os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        return None if uri.strip().lower() in DISABLED else normalize_uri(uri.strip())
    if default_dir is None:
        raise ConfigError(
            "the run's storage is not a local folder, so it cannot hold the default SQLite MLflow "
            "store; give --mlflow-uri (a tracking server every node reaches) or --mlflow-uri none"
        )
    return sqlite_uri(Path(default_dir) / DB_NAME)


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with its artifacts on ``artifact_location``) if missing.

    The artifact location is set explicitly: MLflow's default is relative to the creating process.
    """
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = mlflow_client.get_experiment_by_name(name)  # another driver won the race
    if exp.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


@dataclass
class TrackedRun:
    """What a worker needs to log into a run: plain strings, so it crosses Ray's boundary as a dict."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_run(
    tracking_uri: str,
    run_name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    previous_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    match_tags: Mapping[str, str] | None = None,
    log=print,
) -> TrackedRun:
    """Continue ``previous_run_id`` when the store still has it, else create a new run.

    Without ``previous_run_id``, a live run of the experiment carrying all of ``match_tags`` is
    continued instead of creating a second one (its creator died before recording the id).
    Params are logged only when the run is created: MLflow refuses to change a logged param, and a
    resumed run may legitimately differ in fields such as the number of epochs.
    """
    with _store_lock(tracking_uri):
        if not previous_run_id and match_tags:
            previous_run_id = find_run(tracking_uri, experiment, match_tags)
        return _start_run(
            tracking_uri, run_name, experiment, artifact_location, previous_run_id, params, tags,
            parent_run_id, log,
        )  # fmt: skip


def find_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> str | None:
    """The id of the newest active run of ``experiment`` whose tags include ``tags``, if any."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join(
        f"tags.`{k}` = '{str(v).replace(chr(39), chr(92) + chr(39))}'" for k, v in tags.items()
    )
    runs = c.search_runs(
        [exp.experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """Serialise drivers that share one SQLite file (e.g. a sweep's trials): a fresh store's schema
    creation races, and so does creating its experiment."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(tracking_uri[len("sqlite:///") :]).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_run(
    tracking_uri, run_name, experiment, artifact_location, previous_run_id, params, tags, parent_run_id, log
) -> TrackedRun:
    c = client(tracking_uri)
    if previous_run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = c.get_run(previous_run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage != "deleted":
            c.update_run(previous_run_id, status="RUNNING")
            if tags:
                set_tags(c, previous_run_id, tags)
            return TrackedRun(tracking_uri, run.info.experiment_id, previous_run_id, resumed=True)
        log(f"warning: MLflow run {previous_run_id} is not in {redact(tracking_uri)}; starting a new one")
    experiment_id = ensure_experiment(c, experiment, artifact_location)
    all_tags = dict(tags or {})
    if parent_run_id:
        # The UI nests a run under its parent through this tag (both must share the experiment).
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    if params:
        log_params(c, run.info.run_id, params)
    return TrackedRun(tracking_uri, experiment_id, run.info.run_id, resumed=False)


def log_params(mlflow_client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])


def set_tags(mlflow_client, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    mlflow_client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (a resumed run is set back to RUNNING by start_run)."""
    client(tracking_uri).set_terminated(run_id, status=status)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 1] + "…"
