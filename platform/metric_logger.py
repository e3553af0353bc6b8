"""Metrics from training processes into an MLflow run: batched, never twice after a resume, and kept
(in memory and in the run folder's spool file) while the tracking server is away.

The run itself is created by the driver (tracking.py); a worker only gets its tracking URI and id.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdetr.detector.errors import ConfigError
from sdetr.platform.storage import split_file
from sdetr.platform.tracking import client, set_tags
from sdetr.platform.uris import redact, scheme_of

_MAX_METRICS_PER_BATCH = 1000


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
