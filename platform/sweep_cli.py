"""``sdetr sweep run|submit|resume|status`` and ``sdetr pareto``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from sdetr.detector.errors import ConfigError

# Never shipped to a cluster with a job: environments, data, outputs, caches.
DEFAULT_TOKEN = Path("~/.ray/auth_token").expanduser()
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


def add_sweep_parsers(sub) -> None:
    sweep = sub.add_parser("sweep", help="hyper-parameter sweeps on Ray Tune").add_subparsers(
        dest="sweep_cmd", required=True
    )
    run = sweep.add_parser("run", help="run a sweep file on a local Ray (or --address)")
    run.add_argument("file", type=Path, help="a sweep file, e.g. sweeps/demo.yaml")
    _common(run)
    run.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else start one)")
    run.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: the file's, $MLFLOW_TRACKING_URI, else <storage>/mlflow.db)",
    )
    run.set_defaults(func=cmd_sweep_run)

    submit = sweep.add_parser(
        "submit",
        help="submit a sweep to a Ray cluster through the Jobs API",
        description="Ships the current directory (which must contain the sweep file) and runs "
        "`python -m sdetr.platform.cli sweep run FILE` on the head node; sdetr must be installed on "
        "every node.",
    )
    submit.add_argument("file", type=Path)
    _common(submit)
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--mlflow-uri", help="MLflow tracking URI every node reaches (e.g. http://host:5000)")
    submit.add_argument(
        "--token-file",
        type=Path,
        help="the cluster's auth token file (default: $RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token)",
    )
    submit.add_argument(
        "--wait", action="store_true", help="stream the job's logs until it ends; exit with its status"
    )
    submit.set_defaults(func=cmd_sweep_submit)

    resume = sweep.add_parser(
        "resume", help="continue an interrupted sweep: unfinished and errored trials resume"
    )
    resume.add_argument("name")
    resume.add_argument("--storage", help="where the sweep lives (default ./runs)")
    resume.add_argument("--address", help="join this Ray cluster")
    resume.set_defaults(func=cmd_sweep_resume)

    status = sweep.add_parser("status", help="the trials of a sweep and their progress")
    status.add_argument("name")
    status.add_argument("--storage", help="where the sweep lives (default ./runs)")
    status.set_defaults(func=cmd_sweep_status)

    pareto = sub.add_parser("pareto", help="a sweep's AP-vs-GFLOPs Pareto front: table, CSV, PNG, HTML")
    pareto.add_argument("name")
    pareto.add_argument("--storage", help="where the sweep lives (default ./runs)")
    pareto.add_argument("--no-mlflow", action="store_true", help="do not update the MLflow runs")
    pareto.set_defaults(func=cmd_pareto)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage", help="where the sweep's folder goes (default: the file's storage:, else ./runs)"
    )
    p.add_argument("--name", help="sweep name (default: the file's name:, else the file name)")


def cmd_sweep_run(args) -> int:
    from sdetr.platform.sweep import run_sweep
    from sdetr.platform.sweep_spec import load_sweep

    spec = load_sweep(args.file)
    summary = run_sweep(spec, args.storage, args.name, address=args.address, mlflow_uri=args.mlflow_uri)
    return _report(summary)


def cmd_sweep_resume(args) -> int:
    from sdetr.platform.sweep import resume_sweep

    return _report(resume_sweep(args.name, args.storage, address=args.address))


def _report(summary: dict) -> int:
    points = summary["points"]
    errored = [p for p in points if p.source == "trial" and p.status == "error"]
    print(f"sweep folder: {summary['sweep_dir']}")
    if summary.get("mlflow"):
        print(f"MLflow: {summary['mlflow']['tracking_uri']} (parent run {summary['mlflow']['run_id']})")
    if summary.get("status") == "killed":
        return 130
    if errored:
        name = Path(summary["sweep_dir"]).name
        print(f"{len(errored)} trial(s) failed; `sdetr sweep resume {name}` retries them", file=sys.stderr)
        return 1
    return 0


def cmd_sweep_status(args) -> int:
    from sdetr.platform.sweep import sweep_dir_of
    from sdetr.platform.sweep_results import status_table

    print(status_table(sweep_dir_of(args.storage, args.name)))
    return 0


def cmd_pareto(args) -> int:
    from sdetr.platform.sweep import SWEEP_RECORD, sweep_dir_of
    from sdetr.platform.sweep_results import finalize

    sweep_dir = sweep_dir_of(args.storage, args.name)
    if not (sweep_dir / SWEEP_RECORD).is_file():
        raise ConfigError(f"{sweep_dir}: no sweep there (no {SWEEP_RECORD})")
    finalize(sweep_dir, mlflow=not args.no_mlflow)
    return 0


def cmd_sweep_submit(args) -> int:
    """Ship the working directory and the sweep file to the cluster as a Ray job."""
    from sdetr.platform.sweep_spec import load_sweep

    spec = load_sweep(args.file)  # refuse a broken file before anything is shipped
    workdir = Path.cwd().resolve()
    sweep_file = args.file.expanduser().resolve()
    try:
        rel = sweep_file.relative_to(workdir)
    except ValueError:
        raise ConfigError(
            f"{sweep_file}: the sweep file must be inside the working directory that is shipped ({workdir}); "
            "run from a folder that contains it"
        ) from None
    storage = args.storage or spec.storage
    if storage is None or not (Path(storage).is_absolute() or "://" in storage):
        raise ConfigError(
            f"{sweep_file}: storage {storage!r}: a submitted sweep needs storage that every node "
            "and you can reach "
            "(an absolute path on shared storage, or s3://...); give --storage"
        )
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise ConfigError(f"--token-file {args.token_file}: not found")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(args.token_file.resolve())
    if any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) or DEFAULT_TOKEN.is_file():
        # Clusters started by `ray start` use token authentication by default, but clients only send
        # the token in token mode.
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except Exception as exc:  # connection refused, auth, bad URL: all a user's to fix
        hint = ""
        if "token" in str(exc).lower():
            hint = " (give the cluster's token with --token-file, or set RAY_AUTH_TOKEN)"
        raise ConfigError(
            f"cannot reach the Ray Jobs API at {args.address}: {str(exc)[:300]}{hint}"
        ) from None
    job_id = f"sdetr-sweep-{args.name or spec.name}-{uuid.uuid4().hex[:8]}"
    entry = ["python", "-m", "sdetr.platform.cli", "sweep", "run", str(rel), "--storage", storage]
    if args.name:
        entry += ["--name", args.name]
    if args.mlflow_uri:
        entry += ["--mlflow-uri", args.mlflow_uri]
    env = {"SDETR_RAY_JOB_ID": job_id}
    if args.mlflow_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    client.submit_job(
        entrypoint=" ".join(entry),
        submission_id=job_id,
        runtime_env={"working_dir": str(workdir), "excludes": SUBMIT_EXCLUDES, "env_vars": env},
        metadata={"sdetr_sweep": spec.name},
    )
    print(f"submitted job {job_id} to {args.address}")
    print(f"follow it:  ray job logs --address {args.address} --follow {job_id}")
    print(f"status:     ray job status --address {args.address} {job_id}")
    if not args.wait:
        return 0
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)
