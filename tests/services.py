"""Real servers for the cluster-storage tests, started on 127.0.0.1 by the tests themselves: an S3-API
server (``moto_server``, from the dev extra ``moto[server]``), PostgreSQL (Debian's ``postgresql``:
``initdb`` / ``pg_ctl``) and ``mlflow server`` backed by them. Each is skipped, with the reason, where
its program is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "sdetr-test-key",
    "AWS_SECRET_ACCESS_KEY": "sdetr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "sdetr-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_s3(folder: Path, monkeypatch_env: dict) -> tuple[subprocess.Popen, str]:
    """moto_server on a free port, a bucket made, and the environment pointing pyarrow, boto3, Ray and
    MLflow at it (``monkeypatch_env`` is updated with what was set)."""
    exe = BIN / "moto_server"
    if not exe.exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    with open(folder / "moto.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, 120, proc)
    except BaseException:
        stop(proc)
        raise
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    monkeypatch_env.update(env)
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return proc, endpoint


def start_postgres() -> tuple[str, callable]:
    """A PostgreSQL cluster in a fresh temporary folder, on a free port, with a database ``mlflow``;
    returns its URI and a function that stops it. Run as the ``postgres`` user when this process is
    root (initdb refuses root)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL (initdb, pg_ctl) not installed (apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="sdetr-pg-"))  # pytest's folders are private to their owner
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data = folder / "pgdata"
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "pg.log"), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE mlflow")

    def stop_pg() -> None:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/mlflow", stop_pg


def start_mlflow(folder: Path, backend: str, artifacts: str, port: int | None = None, wait: bool = True):
    """``mlflow server`` on ``backend`` with artifacts proxied to ``artifacts``; returns (proc, uri).
    Its output goes to ``folder/mlflow-<port>.log``. With ``wait=False`` the caller calls
    `wait_for_mlflow` later (to overlap the server's start-up with other work)."""
    port = port or free_port()
    with open(folder / f"mlflow-{port}.log", "a") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination"]
            + [artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log,
            stderr=log,
        )
    proc.log_path = folder / f"mlflow-{port}.log"
    uri = f"http://127.0.0.1:{port}"
    if wait:
        wait_for_mlflow(uri, proc)
    return proc, uri


def wait_for_mlflow(uri: str, proc: subprocess.Popen) -> None:
    """Wait for the server's /health; on failure stop it and show the end of its log."""
    try:
        wait_http(f"{uri}/health", 420, proc)  # ~20 s on an idle 2-core machine, minutes under load
    except BaseException as exc:
        stop(proc)
        log = getattr(proc, "log_path", None)
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        if isinstance(exc, AssertionError):
            raise AssertionError(f"{exc}; the end of its log ({log}):\n{tail}") from None
        raise
