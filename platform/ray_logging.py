"""What Ray prints to sdetr's terminal: its warnings and errors, not its bookkeeping.

A sweep's terminal carries sdetr's own lines (a line per trial event, a status line while waiting); Ray
forwarded three kinds of INFO lines from every trial's processes as well, dozens per sweep, none of which
a person acts on: Ray Train's controller and worker set-up ("Requesting resources", "Started training
worker group", "Moving model to device"), its record of every `ray.train.report` (the whole metrics
dict, ~1,000 characters an epoch) and Ray Data's "Dataset ... execution finished". They still reach Ray's
log files (`/tmp/ray/session_latest/logs/`, `logs/train/`); warnings and errors still reach the terminal.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.train

# Ray Train's own console level (``ray.train.LoggingConfig``); its log files keep every level.
RAY_TRAIN_CONSOLE_LEVEL = "WARNING"
# Ray Data's level in the processes of a Ray instance sdetr starts (a user's own setting wins).
RAY_DATA_LOG_LEVEL = "WARNING"


def init_ray(address: str | None) -> None:
    """``ray.init(address)`` unless this process has joined Ray already; a local instance started here
    gets Ray Data's quieter level.

    Ray's processes inherit the environment of the driver that starts the instance, so the level set
    here reaches Ray Data in every worker and actor of it; an existing cluster keeps its own.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", RAY_DATA_LOG_LEVEL)
    ray.init(address=address)


def train_logging_config():
    """The ``RunConfig.logging_config`` of sdetr's Ray Train runs."""
    return ray.train.LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LEVEL)


def quiet_report_log() -> None:
    """Called in each Ray Train worker: Ray Train 2.60 logs every report at INFO under a logger named
    by its source file's path, outside the ``ray.train`` tree that ``LoggingConfig`` filters."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray: its own logging
        return
    report_logger = getattr(train_context, "logger", None)
    if isinstance(report_logger, logging.Logger):
        report_logger.setLevel(getattr(logging, RAY_TRAIN_CONSOLE_LEVEL))
