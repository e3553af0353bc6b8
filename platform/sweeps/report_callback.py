"""The Train callback of a sweep trial: end-of-epoch reports forwarded from Ray Train to Tune.

It runs in the trial's Train controller, a process of its own per trial attempt. The controller
imports this module to unpickle the callback, so it imports only Ray Tune and sdetr's run records: not
the model stack (torchvision, which pulls in ``torch._dynamo``) that the trial and its workers need.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from sdetr.platform import tracking
from sdetr.platform.layout import RUN_RECORD
from sdetr.platform.storage import Location
from sdetr.platform.training.report import TrainReport


class EpochReportCallback(TuneReportCallback):
    """Forwards end-of-epoch reports to Tune, each with ``extra`` (the trial's cost and label).

    Mid-epoch checkpoint reports carry no AP: forwarding them would hand schedulers and searchers
    results without their metric. ``epochs_done`` counts across attempts (Tune's own
    ``training_iteration`` restarts when a trial is resumed), so schedulers use it as their time. The
    first report also names the trial's MLflow run after ``label`` (the run exists by then).
    ``folder`` is the trial's folder as a string (a path or a URI), opened in the controller.
    """

    def __init__(
        self,
        extra: dict[str, Any],
        epochs: int,
        folder: str | None = None,
        label: str = "",
        tracking_uri: str | None = None,
    ):
        super().__init__()
        self.extra, self.epochs = dict(extra), epochs
        self.folder, self.label, self.tracking_uri = folder, label, tracking_uri
        self.named = False

    def after_report(self, run_context, metrics, checkpoint):
        if self.folder is not None and self.label and not self.named:
            name_mlflow_run(self.folder, self.label, self.tracking_uri)
            self.named = True
        report = TrainReport.from_ray(metrics[0])
        if not report.epoch_end:
            return
        done = report.epochs_done
        merged = {**report.to_ray(), **self.extra, "epochs_done": done, "completed": done >= self.epochs}
        super().after_report(run_context, [merged], checkpoint)


def name_mlflow_run(folder: Location | str, label: str, tracking_uri: str | None = None) -> None:
    """Name the trial's MLflow run after its label (the driver creates it named after the trial id).
    Idempotent; a store that cannot be reached only costs the name. ``tracking_uri``: the sweep's (the
    run record's is masked when it had a password)."""
    tracked = (Location.of(folder).read_json(RUN_RECORD) or {}).get("mlflow") or {}
    if not tracked.get("run_id"):
        return
    try:
        client = tracking.client(tracking_uri or tracked["tracking_uri"])
        tracking.set_tags(client, tracked["run_id"], {"mlflow.runName": label})
    except Exception as exc:  # noqa: BLE001 - naming is cosmetic; training must go on
        print(f"warning: could not name MLflow run {tracked['run_id']} {label!r}: {exc}")
