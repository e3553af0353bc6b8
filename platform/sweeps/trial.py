"""One sweep trial (``trial_main``, run by Tune): the trial's config, its cost, then a Ray Train run.

The sweep driver has checked the data, the cluster and every trial's config once; the trial driver
only builds its `RunPlan` from that (`run_plan.resolve_plan`) and launches it, with a callback that
forwards rank 0's end-of-epoch reports, plus the cost, to Tune — so schedulers and searchers see AP and
GFLOPs together. The Train run is named after the trial id, so a restarted trial resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sdetr.detector.cost import FIXED_INPUT_HW, cost_of_preset
from sdetr.platform.layout import COST_FILE, TRIAL_RECORD, TRIALS_DIR, read_json, write_json
from sdetr.platform.pareto import label_for
from sdetr.platform.storage import RunStorage
from sdetr.platform.sweeps.spec import SweepSpec
from sdetr.platform.training.driver import launch
from sdetr.platform.training.report import TrainReport, read_history
from sdetr.platform.training.run_plan import MlflowPlacement, resolve_plan


@dataclass
class SweepContext:
    """What the sweep driver decided once for all trials (passed to each trial by Tune)."""

    spec: SweepSpec
    sweep_dir: str
    data: str  # the shard folder
    cpus_per_worker: float
    mlflow: dict[str, str] | None  # the parent run: {"tracking_uri", "run_id", ...}
    ray_job_id: str = ""


def epoch_report_callback(extra: dict[str, Any], epochs: int):
    """A Train callback, run in the Train controller, that forwards end-of-epoch reports to Tune.

    Mid-epoch checkpoint reports carry no AP: forwarding them would hand schedulers and searchers
    results without their metric. ``epochs_done`` counts across attempts (Tune's own
    ``training_iteration`` restarts when a trial is resumed), so schedulers use it as their time.
    """

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report = TrainReport.from_ray(metrics[0])
            if not report.epoch_end:
                return
            done = report.epochs_done
            merged = {**report.to_ray(), **extra, "epochs_done": done, "completed": done >= epochs}
            super().after_report(run_context, [merged], checkpoint)

    return EpochReportCallback()


def trial_cost(cfg, spec: SweepSpec, folder: Path) -> dict[str, Any]:
    """Parameters, GFLOPs (papers' convention) and speed of the trial's model, computed once per trial.

    Known before training starts, so a trial's cost is in MLflow and Tune from its first report.
    """
    cached = read_json(folder / COST_FILE)
    if cached is not None:
        return cached
    res = cost_of_preset(
        cfg,
        input_hw=spec.cost_input or FIXED_INPUT_HW,
        val_images=0 if spec.cost_input else spec.cost_val_images,
        device="cuda" if spec.gpus_per_worker > 0 else "cpu",
        fps=spec.cost_fps,
    )
    cost = {
        "gflops": res["gflops"],
        "gflops_all": res["gflops_all"],
        "params": res["params_paper"],
        "params_trainable": res["params_trainable"],
        "fps": res["fps_b1"],
        "fps_b4": res["fps_b4"],
        "latency_ms": res["latency_ms"],
        "cost_input": res["input"],
        "cost_device": res["device"],
    }
    write_json(folder / COST_FILE, cost)
    return cost


def trial_main(params: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: cost, then a Ray Train run named after the trial id (so a restart resumes it)."""
    torch.set_num_threads(1)  # this process only waits on its Train workers (and counts FLOPs once)
    spec = context.spec
    trial_id = tune.get_context().get_trial_id()
    cfg = spec.trial_config(params)
    cfg.data.root = context.data
    folder = Path(context.sweep_dir) / TRIALS_DIR / trial_id
    cost = trial_cost(cfg, spec, folder)
    label = label_for(cfg.model.rho, cfg.model.backbone, cfg.preset)
    numbers = {k: v for k, v in cost.items() if isinstance(v, (int, float))}
    extra = {**numbers, "trial_label": label}
    record = {
        "trial_id": trial_id,
        "params": params,
        "label": label,
        "preset": cfg.preset,
        "backbone": cfg.model.backbone,
        "rho": cfg.model.rho,
        "epochs": cfg.optim.epochs,
        "cost": cost,
    }
    write_json(folder / TRIAL_RECORD, record)

    history = read_history(folder)
    if history and len(history) >= cfg.optim.epochs:
        # Trained to the end before the sweep driver died: report the final epoch without re-running.
        tune.report({**history[-1], **extra, "epochs_done": len(history), "completed": True})
        return

    parent = context.mlflow or {}
    if spec.checkpoint_every_steps is not None:
        cfg.train.checkpoint_every_steps = spec.checkpoint_every_steps
    mlflow = MlflowPlacement(
        tracking_uri=parent.get("tracking_uri"),
        experiment=spec.experiment,
        parent_run_id=parent.get("run_id"),
        tags={
            "sdetr.sweep": spec.name,
            "sdetr.trial_id": trial_id,
            "sdetr.label": label,
            "sdetr.ray_job_id": context.ray_job_id,
        },
        params={f"sweep.{k}": v for k, v in params.items()},
        metrics={f"cost/{k}": v for k, v in numbers.items()},
    )
    storage = RunStorage(str(Path(context.sweep_dir) / TRIALS_DIR), trial_id)
    plan = resolve_plan(
        cfg,
        storage,
        context.data,
        spec.workers,
        context.cpus_per_worker,
        spec.gpus_per_worker,
        mlflow,
        max_failures=spec.max_failures,
        callbacks=[epoch_report_callback(extra, cfg.optim.epochs)],
    )
    launch(plan)
