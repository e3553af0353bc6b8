"""MLflow helpers shared by distributed training and sweeps.

The store, the experiment and the run are created once, by one process (the driver), before any
worker starts: a fresh SQLite store opened by several processes at once races on its schema, and
concurrent ``set_experiment`` calls against a server can silently drop runs into the Default
experiment. Workers only ever get a tracking URI and a run id, and log into that run in batches
(a SQLite store manages a few dozen calls per second in total).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform.storage import split_file
from sdetr.platform.uris import redact, scheme_of

DEFAULT_EXPERIMENT = "sdetr"
DB_NAME = "mlflow.db"
DISABLED = ("none", "off", "false", "0", "")
# MLflow's own limits per log_batch call and per param value.
_MAX_METRICS_PER_BATCH = 1000
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


class MetricLogger:
    """Buffers metrics and writes them with one ``log_batch`` per flush.

    A call ``log(metrics, step, marker=key)`` is dropped whole when ``step`` is at or below the last
    step logged for ``key`` (read from the store by ``restore_floor``): after a resume, the steps or
    epochs replayed since the last checkpoint were already logged once and must not appear twice.

    A tracking server that goes away does not stop training: a flush that fails keeps its metrics (in
    memory, and in ``spool``, a JSON-lines file in the run folder — a path or a URI such as
    ``s3://bucket/runs/r/mlflow_pending.jsonl``, layout.METRICS_SPOOL — when given) and warns once; the
    next flush that reaches the server sends them first, in order, and removes the file. Nothing is lost
    while the process lives, and with a spool file a restarted process sends what its predecessor
    could not (`send_spool` does it without training, e.g. after the run ended with the server away).
    A process that starts while the server is away cannot read its floors: it logs on, and the first
    flush that reaches the server drops what the server already holds (a replayed epoch).
    """

    def __init__(self, tracking_uri: str, run_id: str, spool: str | Path | None = None, log=print):
        if scheme_of(tracking_uri) in ("http", "https"):
            # MLflow's default (7 retries, backoff 2) blocks each call for minutes when the server is
            # gone; a training step must not. What fails is kept and sent by a later flush.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = client(tracking_uri)
        self._buffer: list = []
        self._floors: dict[str, int] = {}
        self._log = log
        self._spool = split_file(spool) if spool is not None else None
        self._spooled = False  # a spool file exists (removed once all of it is sent)
        self._pending: list = self._read_spool()
        self._warned = False
        # Markers whose floor the store could not tell (it was away when `restore_floor` asked), and the
        # metrics logged under them since: the first flush that reaches the store drops those at or
        # below the store's floor, so a replayed epoch is not sent twice.
        self._unresolved: set[str] = set()
        self._held: list[tuple[str, Any]] = []

    def logged_steps(self, key: str) -> list[int]:
        return sorted(m.step for m in self._client.get_metric_history(self.run_id, key))

    def restore_floor(self, key: str) -> int | None:
        """Read the last step logged for ``key`` from the store (and the spool); later calls skip up
        to it."""
        steps = [m.step for m in self._pending if m.key == key]
        try:
            steps += self.logged_steps(key)
        except Exception as exc:  # the store is away: decided at the first flush that reaches it
            self._unreachable(exc)
            self._unresolved.add(key)
        if steps:
            last = max(steps)
            self._floors[key] = max(self._floors.get(key, last), last)
        return self._floors.get(key)

    def floor(self, key: str) -> int | None:
        return self._floors.get(key)

    def log(self, metrics: Mapping[str, float], step: int, marker: str | None = None) -> bool:
        """Queue ``metrics`` at ``step``; returns False when skipped as already logged."""
        from mlflow.entities import Metric

        floor = self._floors.get(marker) if marker else None
        if floor is not None and step <= floor:
            return False
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            if math.isnan(value):
                continue  # MLflow stores NaN, but it breaks the charts
            metric = Metric(key, value, now, int(step))
            self._buffer.append(metric)
            if marker in self._unresolved:
                self._held.append((marker, metric))
        if marker:
            self._floors[marker] = int(step)
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        try:
            set_tags(self._client, self.run_id, tags)
        except Exception as exc:  # a tag is the latest value: the next call sets it again
            self._unreachable(exc)

    @property
    def pending(self) -> int:
        """Metrics kept because the store could not be reached."""
        return len(self._pending)

    def flush(self) -> bool:
        """Send the kept and the new metrics; False (and they are kept) when the store is unreachable."""
        batch, self._buffer = self._pending + self._buffer, []
        sent = 0
        try:
            batch = self._drop_replayed(batch)
            for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=batch[i : i + _MAX_METRICS_PER_BATCH])
                sent = i + _MAX_METRICS_PER_BATCH
        except Exception as exc:  # MlflowException, requests' ConnectionError...: keep, warn, go on
            self._pending = batch[sent:]
            self._write_spool()
            self._unreachable(exc)
            return False
        if self._pending and self._warned:
            self._log(f"MLflow {redact(self.tracking_uri)} is back: sent {len(self._pending)} kept metrics")
        self._pending, self._warned = [], False
        self._write_spool()
        return True

    def _drop_replayed(self, batch: list) -> list:
        """Resolve the floors `restore_floor` could not read: drop the held metrics at or below what the
        store holds for their marker. Raises (and changes nothing) while the store is away."""
        if not self._unresolved:
            return batch
        floors = {key: max(self.logged_steps(key), default=None) for key in self._unresolved}
        replayed = {
            id(metric)
            for marker, metric in self._held
            if floors[marker] is not None and metric.step <= floors[marker]
        }
        for key, floor in floors.items():
            if floor is not None:
                self._floors[key] = max(self._floors.get(key, floor), floor)
        self._unresolved.clear()
        self._held = []
        return [m for m in batch if id(m) not in replayed]

    def _unreachable(self, exc: Exception) -> None:
        if self._warned:
            return
        self._warned = True
        where = f"in {self.spool_uri}" if self._spool is not None else "in memory"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self._log(
            f"warning: MLflow {redact(self.tracking_uri)} unreachable ({first}); training goes on, "
            f"metrics are kept {where} and sent when it is back"
        )

    @property
    def spool_uri(self) -> str | None:
        return f"{self._spool[0]}/{self._spool[1]}" if self._spool is not None else None

    def _read_spool(self) -> list:
        from mlflow.entities import Metric

        text = self._spool[0].read_text(self._spool[1]) if self._spool is not None else None
        self._spooled = text is not None
        if text is None:
            return []
        rows = []
        for line in text.splitlines():
            try:
                d = json.loads(line)
                rows.append(Metric(d["key"], float(d["value"]), int(d["timestamp"]), int(d["step"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        return rows

    def _write_spool(self) -> None:
        if self._spool is None:
            return
        folder, name = self._spool
        try:
            if not self._pending:
                if self._spooled:
                    folder.remove(name)
                    self._spooled = False
                return
            rows = [
                {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                for m in self._pending
            ]
            # Atomic (a rename locally, one PUT on object storage): a reader never sees half of it.
            folder.write_text(name, "".join(json.dumps(r) + "\n" for r in rows))
            self._spooled = True
        except OSError as exc:  # the run folder's store is away too: the metrics stay in memory
            self._log(f"warning: MLflow spool {self.spool_uri} not written ({exc}); metrics kept in memory")


def send_spool(tracking_uri: str, run_id: str, spool: str | Path, log=print) -> int:
    """Send the metrics a run's spool file holds (what its worker could not send before it ended) and
    remove the file; returns how many were sent (0 when there is no spool). Raises when the store is
    still unreachable, leaving the file as it was."""
    logger = MetricLogger(tracking_uri, run_id, spool=spool, log=log)
    count = logger.pending
    if count == 0:
        return 0
    if not logger.flush():
        raise ConfigError(
            f"MLflow {redact(tracking_uri)} still unreachable; {count} metrics stay in {logger.spool_uri}"
        )
    return count
