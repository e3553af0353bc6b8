"""One sweep trial (``trial_main``, run by Tune): the trial's config, its cost, then a Ray Train run.

The sweep driver has checked the data, the cluster and every trial's config once; the trial driver
only builds its `RunPlan` from that (`run_plan.resolve_plan`) and launches it, with a callback that
forwards rank 0's end-of-epoch reports, plus the cost, to Tune — so schedulers and searchers see AP and
GFLOPs together. The Train run is named after the trial id, so a restarted trial resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from ray import tune

from sdetr.detector.cost import FIXED_INPUT_HW, cost_of_preset
from sdetr.detector.presets import get_preset, preset_names
from sdetr.platform.layout import COST_FILE, TRIAL_RECORD, TRIALS_DIR
from sdetr.platform.pareto import label_for
from sdetr.platform.storage import Location, RunStorage
from sdetr.platform.sweeps.report_callback import EpochReportCallback
from sdetr.platform.sweeps.spec import SweepSpec
from sdetr.platform.sweeps.summary import gflops_text
from sdetr.platform.training.driver import launch
from sdetr.platform.training.report import read_history
from sdetr.platform.training.run_plan import MlflowPlacement, resolve_plan


@dataclass
class SweepContext:
    """What the sweep driver decided once for all trials (passed to each trial by Tune)."""

    spec: SweepSpec
    sweep_dir: str  # a folder or a URI (s3://...): read and written through storage.Location only
    data: str  # the shard folder (or URI)
    cpus_per_worker: float
    mlflow: dict[str, str] | None  # the parent run: {"tracking_uri", "run_id", ...}
    ray_job_id: str = ""


def trial_cost(cfg, spec: SweepSpec, folder: Location | str, data: str) -> dict[str, Any]:
    """Parameters and GFLOPs (papers' convention) of the trial's model, computed once per trial: at the
    papers' fixed input (``gflops_fixed``) and, with ``cost: {input: val}``, as the mean over the first
    val images at the resolution the trial is evaluated at (``gflops``, as the official full mode; else
    ``gflops`` is the fixed-input figure). FPS only with ``cost: {fps: true}`` (None: not measured).

    Known before training starts, so a trial's cost is in MLflow and Tune from its first report.
    """
    folder = Location.of(folder)
    cached = folder.read_json(COST_FILE)
    if cached is not None and "gflops_fixed" in cached:
        return cached
    device = "cuda" if spec.gpus_per_worker > 0 else "cpu"
    fixed_hw = spec.cost_input or FIXED_INPUT_HW
    res = cost_of_preset(cfg, input_hw=fixed_hw, val_images=0, device=device, fps=spec.cost_fps)
    cost = {
        "gflops": res["gflops"],
        "gflops_all": res["gflops_all"],
        "gflops_fixed": res["gflops"],
        "fixed_input": res["input"],
        "params": res["params_paper"],
        "params_trainable": res["params_trainable"],
        "fps": res["fps_b1"],
        "fps_b4": res["fps_b4"],
        "latency_ms": res["latency_ms"],
        "cost_input": res["input"],
        "cost_device": res["device"],
    }
    if spec.cost_input is None:
        val = val_gflops(cfg, data, spec.cost_val_images, device)
        cost.update(val)
    folder.write_json(COST_FILE, cost)
    return cost


def val_gflops(cfg, data: str, images: int, device: str = "cpu") -> dict[str, Any]:
    """GFLOPs as the mean over the first ``images`` val images of ``data`` (shards or a COCO folder) after
    the val transform, one unpadded image at a time: the resolution the trial is evaluated at."""
    from sdetr.detector.build import build_model
    from sdetr.detector.cost import FlopReport, count_flops
    from sdetr.platform.evaluation.dynamic_rho import val_dataset

    dataset = val_dataset(data, cfg, images)
    model = build_model(cfg.model).to(device).eval()
    reports, sizes = [], []
    for i in range(min(images, len(dataset))):
        image = dataset[i][0]
        sizes.append(tuple(image.shape[-2:]))
        mask = torch.zeros((1, *image.shape[-2:]), dtype=torch.bool, device=device)
        reports.append(count_flops(model, image[None].to(device), mask))
    flops = FlopReport.mean(reports)
    mean_hw = [sum(s[k] for s in sizes) / len(sizes) for k in (0, 1)]
    return {
        "gflops": flops.gflops,
        "gflops_all": flops.gflops_all,
        "cost_input": f"val[:{len(sizes)}]",
        "mean_input_hw": mean_hw,
    }


def effective_preset(cfg) -> str:
    """The name of the configuration a trial really is: its base preset when the searched values left the
    model as the preset builds it, else the preset that builds this model (a sweep over ``model.rho``
    from ``*_sparse_detr_rho_0.1`` trains ``*_sparse_detr_rho_0.5`` at ρ = 0.5), else the base preset with
    the model fields that differ (``mini_deformable_detr (num_queries=100)``)."""
    base = get_preset(cfg.preset)
    if base.model == cfg.model:
        return cfg.preset
    family = cfg.preset.split("_", 1)[0] + "_"
    for name in preset_names():
        if name.startswith(family) and get_preset(name).model == cfg.model:
            return name
    changed = [
        f"{f.name}={getattr(cfg.model, f.name)}"
        for f in fields(cfg.model)
        if getattr(cfg.model, f.name) != getattr(base.model, f.name)
    ]
    return f"{cfg.preset} ({', '.join(changed)})"


def headline_metrics(cost: dict[str, Any], rho: float) -> dict[str, float]:
    """The numbers a person looks for first, under short top-level MLflow names (the scatter chart's axes):
    GFLOPs as the sweep counts them, at the papers' fixed input, parameters in millions, and ρ."""
    out = {"GFLOPs": cost["gflops"], "GFLOPs_fixed": cost["gflops_fixed"], "params_M": cost["params"] / 1e6}
    out["rho"] = float(rho or 0.0)
    if cost.get("fps") is not None:
        out["FPS"] = cost["fps"]
    return out


def trial_description(label: str, cfg, cost: dict[str, Any]) -> str:
    """The MLflow run's description (Markdown): what the trial is and where its pictures are."""
    fps = f"{cost['fps']:.1f}" if cost.get("fps") is not None else "not measured"
    return (
        f"**{label}** (`{cfg.preset}`), {cfg.optim.epochs} epochs.\n\n"
        f"GFLOPs {cost['gflops']:.2f} ({gflops_text(cost)}); {cost['gflops_fixed']:.1f} on one "
        f"{cost['fixed_input']} image; {cost['params'] / 1e6:.1f} M parameters; FPS {fps}.\n\n"
        "Metrics: `AP_percent` / `AP50_percent` (COCO box AP in %, per epoch, step = epoch from 1), "
        "`GFLOPs`, `params_M`, `rho`; artifacts `pictures/` (predicted boxes and, for Sparse DETR, the "
        "scoring network's scores, the kept tokens and the DAM target of a few val images)."
    )


def trial_main(params: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: cost, then a Ray Train run named after the trial id (so a restart resumes it)."""
    torch.set_num_threads(1)  # this process only waits on its Train workers (and counts FLOPs once)
    spec = context.spec
    trial_id = tune.get_context().get_trial_id()
    cfg = spec.trial_config(params)
    cfg.data.root = context.data
    trials = Location(context.sweep_dir).child(TRIALS_DIR)
    folder = trials.child(trial_id)
    cfg.preset = effective_preset(cfg)
    # A status line: counting the model's FLOPs takes seconds to a minute before Ray Train starts.
    print(f"{trial_id} ({cfg.preset}): counting GFLOPs before training ...", flush=True)
    cost = trial_cost(cfg, spec, folder, context.data)
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
        "gflops_text": gflops_text(cost),
    }
    folder.write_json(TRIAL_RECORD, record)

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
            "sdetr.gflops_counted_on": gflops_text(cost),
            "mlflow.note.content": trial_description(label, cfg, cost),
        },
        params={f"sweep.{k}": v for k, v in params.items()},
        metrics={**headline_metrics(cost, cfg.model.rho), **{f"cost/{k}": v for k, v in numbers.items()}},
    )
    storage = RunStorage(trials.uri, trial_id)
    plan = resolve_plan(
        cfg,
        storage,
        context.data,
        spec.workers,
        context.cpus_per_worker,
        spec.gpus_per_worker,
        mlflow,
        max_failures=spec.max_failures,
        # The folder as a string: the callback is pickled to the Train controller, which opens it there.
        callbacks=[
            EpochReportCallback(extra, cfg.optim.epochs, folder.uri, label, parent.get("tracking_uri"))
        ],
        # The sweep's driver prints a line per trial epoch (sweeps/progress.py); the worker's own would
        # repeat it, prefixed by Ray with the worker's process.
        print_epochs=False,
    )
    launch(plan)
