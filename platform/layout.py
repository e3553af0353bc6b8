"""Every file name of a run folder and a sweep folder, the defaults the platform shares, and the one JSON
reader and atomic writer. No torch, no Ray: the CLI, the drivers and the Ray workers all import it.

A single-process run (``sdetr train --output DIR``)::

    config.yaml  metrics.jsonl  checkpoints/checkpoint_epochNNNN.pth

A Ray Train run (``<storage>/<name>``, also each sweep trial)::

    config.yaml  sdetr_run.json  events.jsonl  history.json  workers/rank<r>.{pid,json}
    checkpoint_epochNNNN_stepNNNNNN[-k]/state.pth  shards/ (when the run sharded a COCO folder itself)
    mlflow_pending.jsonl (only while the tracking server could not be reached: metrics not yet sent)

On object storage (``s3://...``) a Ray run has the same files except ``workers/`` (live status and pids,
of use only on the machine that runs the worker).

A sweep (``<storage>/<name>``)::

    sweep.yaml  sweep.json  trials/<trial_id>/ (a Ray Train run + sdetr_trial.json, cost.json)
    trial_states.json  pareto/pareto.{csv,png,html}  (and Tune's own experiment state)
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

DEFAULT_STORAGE = "runs"

# -- run folders -----------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"  # single-process runs: one line per epoch
CHECKPOINTS_DIR = "checkpoints"  # single-process runs
CHECKPOINT_GLOB = "checkpoint_epoch*.pth"
RUN_RECORD = "sdetr_run.json"  # Ray runs: name, workers, data, the MLflow run to continue
EVENTS_FILE = "events.jsonl"
HISTORY_FILE = "history.json"  # Ray runs: the per-epoch records, readable without Ray or torch
# Ray runs: metrics rank 0 could not send to an unreachable tracking server (JSON lines), sent by the next
# flush that reaches it (also by a restarted worker) and removed then.
METRICS_SPOOL = "mlflow_pending.jsonl"
WORKERS_DIR = "workers"
SHARDS_DIR = "shards"
STATE_FILE = "state.pth"  # inside each Ray checkpoint folder
# checkpoint_epoch0003.pth (single process), checkpoint_epoch0003_step000120[-1] (Ray; -k after a torn one)
CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch(\d+)(?:_step(\d+))?(?:-(\d+))?(?:\.pth)?$")


def single_process_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pth"


def ray_checkpoint_name(epoch: int, batches_done: int) -> str:
    return f"checkpoint_epoch{epoch:04d}_step{batches_done:06d}"


def worker_status_file(rank: int) -> str:
    """In WORKERS_DIR: a Ray worker's position (epoch, step), rewritten after every step."""
    return f"rank{rank}.json"


# -- sweep folders ---------------------------------------------------------------------------------
SPEC_FILE = "sweep.yaml"
SWEEP_RECORD = "sweep.json"
TRIALS_DIR = "trials"
TRIAL_RECORD = "sdetr_trial.json"
COST_FILE = "cost.json"
TRIAL_STATES_FILE = "trial_states.json"  # Tune's verdicts, written when a sweep ends
MOASHA_FILE = "moasha.json"  # the MOASHA scheduler's rung records and decisions (it survives a resume)
PARETO_DIR = "pareto"
DYNAMIC_RHO_FILE = "dynamic_rho.json"  # `sdetr eval --rho` results, in the checkpoint's run folder
DYNAMIC_RHO_ARTIFACT_DIR = "dynamic_rho"

# -- shared defaults -------------------------------------------------------------------------------
# The Pareto objectives of every sweep: AP up, GFLOPs down.
OBJECTIVES = {"AP": "max", "gflops": "min"}
TIME_ATTR = "epochs_done"  # what sweep schedulers count: epochs trained, across a trial's attempts


# -- JSON and atomic writes ----------------------------------------------------------------------
TMP_MARK = ".tmp-"  # temporary files are ".<final name>.tmp-<pid>": a killed writer's are found and removed


def read_json(path: str | Path, default: Any = None) -> Any:
    """The parsed file, or ``default`` when it is missing or torn (a reader never crashes on a file
    that a killed writer left half-written; the atomic writer below never leaves one)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write via a temporary file in the same folder and rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a finished file survives a crash of the machine, not just the process
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line (a log: a torn last line is skipped by `read_jsonl`)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: str | Path) -> list[Any]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
