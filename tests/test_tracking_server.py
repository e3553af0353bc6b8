"""MLflow as a cluster runs it: ``mlflow server`` backed by PostgreSQL, artifacts on an S3-API server,
all started here on 127.0.0.1. Tracking URIs are checked in seconds; a server that goes away mid-run
loses nothing (metrics kept and sent when it is back)."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from sdetr.detector.errors import ConfigError
from sdetr.platform import tracking
from sdetr.platform.uris import check_tracking_uri

from .services import BUCKET, start_mlflow, start_postgres, start_s3, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    saved = dict(os.environ)
    folder = tmp_path_factory.mktemp("servers")
    with contextlib.ExitStack() as cleanup:  # whatever started is stopped, also when a later start fails
        cleanup.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        s3, _ = start_s3(folder, {})
        cleanup.callback(stop, s3)
        database, stop_pg = start_postgres()
        cleanup.callback(stop_pg)
        mlflow, uri = start_mlflow(folder, database, f"s3://{BUCKET}/mlartifacts")
        state = {"folder": folder, "database": database, "uri": uri, "mlflow": mlflow}
        cleanup.callback(lambda: stop(state["mlflow"]))  # the test restarts it
        yield state


def test_uris_are_checked_in_seconds(servers):
    check_tracking_uri(servers["uri"])
    check_tracking_uri(servers["database"])
    start = time.monotonic()
    wrong_db = servers["database"].replace("postgres@", "postgres:pw@").rsplit("/", 1)[0] + "/nope"
    with pytest.raises(ConfigError, match=r"postgres:\*\*\*@127.0.0.1.*cannot connect.*nope"):
        check_tracking_uri(wrong_db)
    with pytest.raises(ConfigError, match="cannot be reached"):
        check_tracking_uri("http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="not an MLflow server"):
        check_tracking_uri(os.environ["AWS_ENDPOINT_URL"])  # answers http, but is not MLflow
    assert time.monotonic() - start < 30


def test_a_server_that_goes_away_loses_nothing(servers, tmp_path):
    uri = servers["uri"]
    run = tracking.start_run(uri, "away", experiment="away", artifact_location=f"s3://{BUCKET}/art")
    messages: list[str] = []
    spool = tmp_path / "pending.jsonl"
    logger = tracking.MetricLogger(uri, run.run_id, spool=spool, log=messages.append)
    logger.log({"epoch": 0, "AP": 0.1}, 0, marker="epoch")
    assert logger.flush()

    stop(servers["mlflow"])
    start = time.monotonic()
    logger.log({"epoch": 1, "AP": 0.2}, 1, marker="epoch")
    assert not logger.flush()
    assert time.monotonic() - start < 60  # training is not held up for minutes
    assert logger.pending == 2 and spool.is_file()
    assert any("unreachable" in m and "kept in" in m for m in messages), messages

    # A process that restarts meanwhile sends what its predecessor could not.
    port = int(uri.rsplit(":", 1)[1])
    servers["mlflow"], _ = start_mlflow(servers["folder"], servers["database"], f"s3://{BUCKET}/art", port)
    again = tracking.MetricLogger(uri, run.run_id, spool=spool, log=messages.append)
    assert again.pending == 2 and again.restore_floor("epoch") == 1
    assert not again.log({"epoch": 1, "AP": 0.2}, 1, marker="epoch")  # a replayed epoch: not twice
    again.log({"epoch": 2, "AP": 0.3}, 2, marker="epoch")
    assert again.flush() and not spool.exists()
    history = tracking.client(uri).get_metric_history(run.run_id, "AP")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.1), (1, 0.2), (2, 0.3)]
