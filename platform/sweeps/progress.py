"""The sweep's progress in the terminal: one short line per trial event, and a status line while waiting.

Tune's own reporter prints a table of every trial every 30 s whose columns are the first four metrics a
trial reports (here the training loss terms) next to Tune's ids and counters: 166 characters wide, and
without AP, GFLOPs or what each trial is. The sweep silences it (``verbose=0``) and prints instead::

    [  1:07] 58f91_00001 started    Sparse ρ=0.3 R18
    [  3:12] 58f91_00001 epoch 1/3  AP  0.3 %  AP50  1.1 %  loss 12.85   Sparse ρ=0.3 R18
    [  8:15] 58f91_00001 completed  AP  7.0 %  AP50 28.9 %  1.74 GFLOPs  Sparse ρ=0.3 R18
    [  9:15] waiting: 2 running, 1 ended, 1 pending of 4 (00002 epoch 1/3 40 %, 00003 epoch 1/3 25 %)

The status line places each running trial of a sweep on local storage (its rank 0's status file).
Every line fits `WIDTH` columns. The callback is part of Tune's run config, which Tune pickles with the
experiment and uses again when the sweep resumes, so it pickles only plain data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

from sdetr.platform.layout import WORKERS_DIR, worker_status_file
from sdetr.platform.pareto.files import ap_percent
from sdetr.platform.sweeps.spec import SweepSpec

WIDTH = 100
STATUS_EVERY_S = 60.0  # a status line after this long without any other line


def trial_label(spec: SweepSpec, params: dict[str, Any]) -> tuple[str, int]:
    """What a trial of ``spec`` with ``params`` is (its label, as on the plot and in MLflow) and its
    epochs; the trial's own report says the same once it has one."""
    from sdetr.platform.pareto import label_for
    from sdetr.platform.sweeps.trial import effective_preset

    cfg = spec.trial_config(params)
    return label_for(cfg.model.rho, cfg.model.backbone, effective_preset(cfg)), cfg.optim.epochs


@contextlib.contextmanager
def quiet_tune_output() -> Iterator[None]:
    """Around ``Tuner.fit``: Ray's newer output engine prints an experiment box and a TensorBoard hint
    (170 columns) even at ``verbose=0``; the older one (``RAY_AIR_NEW_OUTPUT=0``) prints nothing at 0.
    Tune still logs a failed trial's traceback; `SweepProgress` prints the rest."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def percent(value: Any) -> str:
    """A COCO AP fraction as a percentage with one decimal (``" 7.0 %"``), 6 characters wide."""
    number = ap_percent(value, ap_fraction=True)
    return "     -" if number is None else f"{number:4.1f} %"


def clip(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def trial_position(trial_dir: Path, epochs: int) -> str | None:
    """Where a running trial is (``"epoch 2/3 40 %"``), from its rank 0's status file; None before its
    first step or where the file is unreadable (e.g. written by an sdetr without ``steps_per_epoch``)."""
    try:
        status = json.loads((trial_dir / WORKERS_DIR / worker_status_file(0)).read_text())
        epoch, step, steps = int(status["epoch"]) + 1, int(status["step"]), int(status["steps_per_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    of = f"/{epochs}" if epochs else ""
    return f"epoch {epoch}{of} {100 * step // max(steps, 1)} %"


class SweepProgress(Callback):
    """Prints the lines above through ``log``; ``interval_s``: the quiet time before a status line;
    ``trials_dir``: the local folder of the trials' run folders (None on object storage)."""

    def __init__(
        self,
        spec: SweepSpec,
        log: Callable[[str], Any] = print,
        interval_s: float = STATUS_EVERY_S,
        trials_dir: str | None = None,
    ):
        self.spec, self.log, self.interval_s, self.trials_dir = spec, log, interval_s, trials_dir
        self.start = self.last_line = time.monotonic()
        self.known: dict[str, tuple[str, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["known"] = {}  # labels are worked out again from each trial's config
        # Not ``log``: in a Ray job's driver ``builtins.print`` is Ray's replacement, so the ``print``
        # bound as the default cannot be pickled by name; a resumed sweep prints with ``print``.
        state["log"] = None
        return state

    def setup(self, **info) -> None:
        # Also after a resume: the clock counts this driver's time.
        self.start = self.last_line = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        (self.log or print)(clip(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}"))
        self.last_line = time.monotonic()

    def describe(self, trial) -> tuple[str, int]:
        if trial.trial_id not in self.known:
            try:
                self.known[trial.trial_id] = trial_label(self.spec, dict(trial.config or {}))
            except Exception:  # a config the trial itself will reject, with a clear error, when it starts
                self.known[trial.trial_id] = (str((trial.config or {}).get("preset", "")), 0)
        return self.known[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        label, _ = self.describe(trial)
        self.say(f"{trial.trial_id} started    {label}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        label, epochs = self.describe(trial)
        label = result.get("trial_label") or label
        done = int(result.get("epochs_done") or result.get("training_iteration") or 0)
        if result.get("completed"):
            return  # on_trial_complete says it, with the cost
        loss = result.get("train_loss")
        loss_text = f"loss {loss:.2f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
        of = f"/{epochs}" if epochs else ""
        self.say(
            f"{trial.trial_id} epoch {done}{of}  AP {percent(result.get('AP'))}  "
            f"AP50 {percent(result.get('AP50'))}  {loss_text:11s}  {label}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        label, epochs = self.describe(trial)
        result = trial.last_result or {}
        label = result.get("trial_label") or label
        gflops = result.get("gflops")
        cost = f"{gflops:.2f} GFLOPs" if isinstance(gflops, (int, float)) else ""
        done = int(result.get("epochs_done") or 0)
        finished = result.get("completed") or not epochs or done >= epochs
        how = "completed" if finished else f"stopped at epoch {done}/{epochs}:"
        self.say(
            f"{trial.trial_id} {how}  AP {percent(result.get('AP'))}  AP50 {percent(result.get('AP50'))}  "
            f"{cost}  {label}"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        label, _ = self.describe(trial)
        self.say(f"{trial.trial_id} failed     {label}")
        if getattr(trial, "error_file", None):  # a path: never cut to the width
            (self.log or print)(f"{'':9}details: {trial.error_file}")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.last_line < self.interval_s:
            return
        counts = Counter(str(t.status).lower() for t in trials)
        names = {"running": "running", "terminated": "ended", "pending": "pending", "error": "failed"}
        parts = [f"{counts[key]} {name}" for key, name in names.items() if counts.get(key)]
        parts += [f"{n} {status}" for status, n in counts.items() if status not in names]
        total = self.spec.num_trials() or len(trials)
        where = []
        if self.trials_dir:
            for trial in sorted(trials, key=lambda t: t.trial_id):
                if str(trial.status).lower() == "running":
                    position = trial_position(Path(self.trials_dir, trial.trial_id), self.describe(trial)[1])
                    if position:
                        where.append(f"{trial.trial_id.rsplit('_', 1)[-1]} {position}")
        positions = f" ({', '.join(where)})" if where else ""
        self.say(f"waiting: {', '.join(parts) or 'no trials yet'} of {total}{positions}")
