"""``sdetr sweep submit``: the sweep as a Ray job on a cluster, shipping the working directory.

The job runs ``python -m sdetr.platform.cli sweep run FILE`` on the head node, so every node needs sdetr
installed (as any Ray library); the job ships the current directory (the sweep file must be in it)
without `SUBMIT_EXCLUDES`. Clusters started with ``ray start`` use token authentication: the token in
``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN`` or ``token_file`` is sent.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from sdetr.detector.errors import ConfigError
from sdetr.platform.sweeps.spec import SweepSpec

DEFAULT_TOKEN = Path("~/.ray/auth_token").expanduser()
# Never shipped to a cluster with a job: environments, data, outputs, caches.
SUBMIT_EXCLUDES = [
    ".venv",
    "runs",
    "data",
    ".git",
    "**/__pycache__",
    "*.pth",
    "mlruns",
    "mlartifacts",
    "*.db",
]


def submit_sweep(
    spec: SweepSpec,
    sweep_file: Path,
    address: str,
    storage: str | None = None,
    name: str | None = None,
    mlflow_uri: str | None = None,
    token_file: Path | None = None,
):
    """Submit the sweep; returns (the Jobs API client, the job id)."""
    workdir = Path.cwd().resolve()
    sweep_file = sweep_file.expanduser().resolve()
    try:
        rel = sweep_file.relative_to(workdir)
    except ValueError:
        raise ConfigError(
            f"{sweep_file}: the sweep file must be inside the working directory that is shipped ({workdir}); "
            "run from a folder that contains it"
        ) from None
    storage = storage or spec.storage
    if storage is None or not (Path(storage).is_absolute() or "://" in storage):
        raise ConfigError(
            f"{sweep_file}: storage {storage!r}: a submitted sweep needs storage that every node "
            "and you can reach "
            "(an absolute path on shared storage, or s3://...); give --storage"
        )
    if token_file is not None:
        if not token_file.is_file():
            raise ConfigError(f"--token-file {token_file}: not found")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file.resolve())
    if any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) or DEFAULT_TOKEN.is_file():
        # Clusters started by `ray start` use token authentication by default, but clients only send
        # the token in token mode.
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    from ray.job_submission import JobSubmissionClient  # slow to import: only when submitting

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # connection refused, auth, bad URL: all a user's to fix
        hint = ""
        if "token" in str(exc).lower():
            hint = " (give the cluster's token with --token-file, or set RAY_AUTH_TOKEN)"
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {str(exc)[:300]}{hint}") from None
    job_id = f"sdetr-sweep-{name or spec.name}-{uuid.uuid4().hex[:8]}"
    entry = ["python", "-m", "sdetr.platform.cli", "sweep", "run", str(rel), "--storage", storage]
    if name:
        entry += ["--name", name]
    if mlflow_uri:
        entry += ["--mlflow-uri", mlflow_uri]
    env = {"SDETR_RAY_JOB_ID": job_id}
    if mlflow_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    client.submit_job(
        entrypoint=" ".join(entry),
        submission_id=job_id,
        runtime_env={"working_dir": str(workdir), "excludes": SUBMIT_EXCLUDES, "env_vars": env},
        metadata={"sdetr_sweep": spec.name},
    )
    return client, job_id


def follow_job(client, job_id: str) -> bool:
    """Print the job's logs until it ends; True when it succeeded."""
    from ray.job_submission import JobStatus

    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return status == JobStatus.SUCCEEDED
        time.sleep(2)
