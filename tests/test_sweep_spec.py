"""Sweep files: every shipped file validates; mistakes name the file, the line and the key; nothing starts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sdetr.detector.errors import ConfigError
from sdetr.platform.cli.main import main
from sdetr.platform.sweeps.load import load_sweep
from sdetr.platform.sweeps.spec import plan_trials

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

BASE = """\
preset: tiny_sparse_detr_rho_0.1
set:
  optim.lr: 2e-4
space:
  model.rho: [0.1, 0.2]
resources: {workers: 1, cpus_per_worker: 0.5}
epochs: 1
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    spec = load_sweep(path)
    assert spec.num_trials() >= 1
    for params in spec.grid_points()[:4]:
        cfg = spec.trial_config(params)
        for key, value in params.items():
            if key != "preset":
                section, leaf = key.split(".")
                assert getattr(getattr(cfg, section), leaf) == value


def test_base_spec_and_trial_config(tmp_path):
    spec = load_sweep(write(tmp_path, BASE))
    assert spec.num_trials() == 2
    assert spec.grid_points() == [{"model.rho": 0.1}, {"model.rho": 0.2}]
    cfg = spec.trial_config({"model.rho": 0.2})
    assert cfg.model.rho == 0.2 and cfg.optim.lr == 2e-4 and cfg.optim.epochs == 1
    assert cfg.optim.lr_drop <= 1


def test_leaf_names_and_sampled_dimensions(tmp_path):
    spec = load_sweep(
        write(
            tmp_path,
            """\
            preset: tiny_sparse_detr_rho_0.1
            space:
              rho: {uniform: [0.05, 0.5]}
              enc_aux_loss_coef: {loguniform: [0.1, 10]}
              backbone: {choice: [resnet18, resnet34]}
            search: {algorithm: optuna_multi, num_samples: 6}
            """,
        )
    )
    keys = [d.key for d in spec.space]
    assert keys == ["model.rho", "loss.enc_aux_loss_coef", "model.backbone"]
    assert spec.num_trials() == 6
    space = spec.tune_space()
    assert 0.05 <= space["model.rho"].sample() <= 0.5


@pytest.mark.parametrize(
    "text, line, needle",
    [
        (BASE + "resourcs: {workers: 2}\n", 8, "unknown key (did you mean resources?)"),
        (
            BASE.replace("{workers: 1, cpus_per_worker: 0.5}", "{workers: 1, cpu: 1}"),
            6,
            "resources.cpu: unknown key",
        ),
        (BASE.replace("[0.1, 0.2]", "[0.1, 1.5]"), 5, "ρ must be in (0, 1], got 1.5"),
        (BASE.replace("[0.1, 0.2]", "[0.0, 0.2]"), 5, "ρ must be in (0, 1]"),
        (BASE.replace("model.rho: [0.1, 0.2]", "model.rho: {uniform: [0, 0.5]}"), 5, "ρ must be in (0, 1]"),
        (
            BASE.replace("model.rho: [0.1, 0.2]", "model.backbone: [resnet50, vgg16]"),
            5,
            "unknown backbone 'vgg16'",
        ),
        (BASE.replace("tiny_sparse_detr_rho_0.1", "tiny_sparse_detr_rho_0.7"), 1, "unknown preset"),
        (BASE.replace("optim.lr: 2e-4", "optim.lrr: 2e-4"), 3, "set.optim.lrr: unknown config key"),
        (BASE.replace("optim.lr: 2e-4", "optim.epochs: many"), 3, "expected an integer"),
        (
            BASE.replace("model.rho: [0.1, 0.2]", "model.rho: {normal: [0.1, 0.2]}"),
            5,
            "unknown kind 'normal'",
        ),
        (
            BASE.replace("model.rho: [0.1, 0.2]", "model.rho: {uniform: [0.1, 0.2]}"),
            0,
            "grid search enumerates",
        ),
        (
            BASE.replace("[0.1, 0.2]", "{choice: [0.1, 0.2]}")
            + "search: {algorithm: optuna_multi}\nscheduler: {type: asha}\n",
            9,
            "asha cannot be combined",
        ),
        (BASE + "search: {algorithm: optuna}\n", 8, "write grid dimensions as choice"),
        (BASE.replace("tiny_sparse_detr_rho_0.1", "tiny_deformable_detr"), 5, "needs two_stage=true"),
        (BASE.replace("epochs: 1", "epochs: 0"), 7, "epochs: expected an integer >= 1"),
        (BASE.replace("{workers: 1, cpus_per_worker: 0.5}", "{workers: 0}"), 6, "resources.workers"),
        (BASE + "space: [oops\n", 9, "not valid YAML"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, line, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    msg = str(info.value)
    assert needle in msg, msg
    expected = f"{path}:{line}:" if line else f"{path}:"
    assert msg.startswith(expected), msg


def test_resources_the_cluster_cannot_give(tmp_path):
    spec = load_sweep(
        write(
            tmp_path, BASE.replace("{workers: 1, cpus_per_worker: 0.5}", "{workers: 4, cpus_per_worker: 1}")
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"s\.yaml:6: resources: a trial needs 4 workers x 1 CPUs = 4 CPUs, but the Ray cluster has 2 ",
    ):
        plan_trials(spec, {"CPU": 2.0, "GPU": 0.0})
    gpu = load_sweep(write(tmp_path, BASE.replace("cpus_per_worker: 0.5}", "gpus_per_worker: 1}"), "g.yaml"))
    with pytest.raises(
        ConfigError, match="resources: a trial needs 1 workers x 1 GPUs = 1 GPUs, but the Ray cluster has 0"
    ):
        plan_trials(gpu, {"CPU": 16.0, "GPU": 0.0})


def test_concurrency_is_capped_by_trial_resources(tmp_path):
    spec = load_sweep(write(tmp_path, BASE.replace("[0.1, 0.2]", "[0.1, 0.2, 0.3, 0.4, 0.5]")))
    # 16 CPUs, 0.5 kept for Ray Data: 15.5 // (0.5 + 0.01) = 30 would fit, but there are only 5 trials.
    assert plan_trials(spec, {"CPU": 16.0}) == (0.5, 5)
    assert plan_trials(spec, {"CPU": 2.0}) == (0.5, 2)
    spec.workers, spec.cpus_per_worker = 2, None
    per_worker, concurrent = plan_trials(spec, {"CPU": 8.0})
    assert per_worker == 1.0 and concurrent == 3  # 7.5 // 2.01
    spec.gpus_per_worker, spec.cpus_per_worker = 1.0, 1.0
    assert plan_trials(spec, {"CPU": 64.0, "GPU": 4.0})[1] == 2  # GPUs bound it


def test_cli_refuses_before_starting_anything(tmp_path, capsys):
    import ray

    storage = tmp_path / "runs"
    bad = write(tmp_path, BASE.replace("[0.1, 0.2]", "[0.1, 2]"))
    assert main(["sweep", "run", str(bad), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdetr: error: {bad}:5: space.model.rho: ρ must be in (0, 1], got 2"), err
    greedy = write(
        tmp_path, BASE.replace("{workers: 1, cpus_per_worker: 0.5}", "{workers: 64}"), "greedy.yaml"
    )
    assert main(["sweep", "run", str(greedy), "--storage", str(storage)]) == 2
    assert "resources: a trial needs 64 workers" in capsys.readouterr().err
    assert not storage.exists()
    assert not ray.is_initialized()
