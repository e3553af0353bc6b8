"""``sdetr sweep run|submit|resume|status`` and ``sdetr pareto``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdetr.detector.errors import ConfigError


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
    submit.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="send the cluster's token over plain http to a non-local address (refused by default)",
    )
    submit.set_defaults(func=cmd_sweep_submit)

    resume = sweep.add_parser(
        "resume", help="continue an interrupted sweep: unfinished and errored trials resume"
    )
    resume.add_argument("name")
    resume.add_argument("--storage", help="where the sweep lives (default ./runs)")
    resume.add_argument("--address", help="join this Ray cluster")
    resume.add_argument(
        "--mlflow-uri", help="the tracking URI again (needed when the saved one had a password, never saved)"
    )
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
    from sdetr.platform.sweeps.load import load_sweep
    from sdetr.platform.sweeps.tune import run_sweep

    spec = load_sweep(args.file)
    summary = run_sweep(spec, args.storage, args.name, address=args.address, mlflow_uri=args.mlflow_uri)
    return _report(summary)


def cmd_sweep_resume(args) -> int:
    from sdetr.platform.sweeps.tune import resume_sweep

    return _report(resume_sweep(args.name, args.storage, address=args.address, mlflow_uri=args.mlflow_uri))


def _report(summary: dict) -> int:
    points = summary["points"]
    errored = [p for p in points if p.source == "trial" and p.status == "error"]
    print(f"sweep folder: {summary['sweep_dir']}")
    if summary.get("mlflow"):
        print(f"MLflow: {summary['mlflow']['tracking_uri']} (parent run {summary['mlflow']['run_id']})")
    if summary.get("status") == "killed":
        return 130
    if errored:
        name = summary["sweep_dir"].rstrip("/").rsplit("/", 1)[-1]
        print(f"{len(errored)} trial(s) failed; `sdetr sweep resume {name}` retries them", file=sys.stderr)
        return 1
    return 0


def cmd_sweep_status(args) -> int:
    from sdetr.platform.storage import sweep_location
    from sdetr.platform.sweeps.results import status_table

    print(status_table(sweep_location(args.storage, args.name).check()))
    return 0


def cmd_pareto(args) -> int:
    from sdetr.platform.layout import SWEEP_RECORD
    from sdetr.platform.storage import sweep_location
    from sdetr.platform.sweeps.results import finalize

    sweep = sweep_location(args.storage, args.name).check()
    if not sweep.is_file(SWEEP_RECORD):
        raise ConfigError(f"{sweep}: no sweep there (no {SWEEP_RECORD})")
    finalize(sweep, mlflow=not args.no_mlflow)
    return 0


def cmd_sweep_submit(args) -> int:
    """Ship the working directory and the sweep file to the cluster as a Ray job."""
    from sdetr.platform.sweeps.load import load_sweep
    from sdetr.platform.sweeps.submit import follow_job, submit_sweep

    spec = load_sweep(args.file)  # refuse a broken file before anything is shipped
    check_submit_secrets(
        args.address, args.token_file, args.mlflow_uri or spec.mlflow_uri, args.allow_plain_http
    )
    client, job_id = submit_sweep(
        spec, args.file, args.address, args.storage, args.name, args.mlflow_uri, args.token_file
    )
    print(f"submitted job {job_id} to {args.address}")
    print(f"follow it:  ray job logs --address {args.address} --follow {job_id}")
    print(f"status:     ray job status --address {args.address} {job_id}")
    if not args.wait:
        return 0
    return 0 if follow_job(client, job_id) else 1


def check_submit_secrets(address: str, token_file, mlflow_uri: str | None, allow_plain_http: bool) -> None:
    """Refuse to send the cluster's token in clear text to another machine, and to put a password in
    the job's command line (which the cluster keeps and shows on its dashboard)."""
    import os
    from urllib.parse import urlsplit

    from sdetr.platform.sweeps.submit import DEFAULT_TOKEN
    from sdetr.platform.uris import redact

    if mlflow_uri and redact(mlflow_uri) != mlflow_uri:
        raise ConfigError(
            f"--mlflow-uri {redact(mlflow_uri)}: a password in the URI would be stored in the job's command "
            "line; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD on the cluster instead"
        )
    token = token_file is not None or DEFAULT_TOKEN.is_file()
    token = token or any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    parts = urlsplit(address if "://" in address else f"http://{address}")
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if token and parts.scheme == "http" and not local:
        if not allow_plain_http:
            raise ConfigError(
                f"--address {address}: the cluster's token would travel unencrypted over plain http to "
                f"{parts.hostname}; use https://, an SSH tunnel to localhost, or pass --allow-plain-http"
            )
        print(f"warning: sending the cluster's token over plain http to {parts.hostname}", file=sys.stderr)
