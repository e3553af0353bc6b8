"""The Tune side of a sweep with a stand-in trial (no training): the search and scheduler configurations
that sweep files produce are accepted by Ray Tune and behave as the Pareto code expects."""

from __future__ import annotations

import textwrap

import pytest

from sdetr.platform.sweeps.load import load_sweep
from sdetr.platform.sweeps.tune import tune_config
from tests.tune_stand_in import EPOCHS, fake_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(tmp_path, text: str, progress: list[str] | None = None):
    """Run the sweep file ``text`` with the stand-in trial; ``progress`` collects SweepProgress' lines."""
    from ray import tune

    from sdetr.platform.sweeps.progress import SweepProgress, quiet_tune_output

    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    spec = load_sweep(path)
    callbacks = [] if progress is None else [SweepProgress(spec, progress.append, interval_s=0.2)]
    config = tune_config(spec, concurrent=2, sweep_dir=tmp_path / "runs" / "t")
    # The stand-in keeps no state between trials: one actor process per slot runs them all.
    config.reuse_actors = True
    tuner = tune.Tuner(
        tune.with_resources(fake_trial, {"CPU": 0.01}),
        param_space=spec.tune_space(),
        tune_config=config,
        run_config=tune.RunConfig(
            name="t", storage_path=str(tmp_path / "runs"), verbose=0, callbacks=callbacks
        ),
    )
    with quiet_tune_output():
        return spec, tuner.fit()


def test_multi_objective_optuna_gets_both_objectives(ray_local, tmp_path):
    spec, grid = run(
        tmp_path,
        """\
        preset: tiny_sparse_detr_rho_0.1
        space:
          model.rho: {uniform: [0.05, 0.5]}
        search: {algorithm: optuna_multi, num_samples: 4, seed: 1}
        epochs: 4
        """,
    )
    assert len(grid) == 4 and not grid.errors
    rhos = [r.config["model.rho"] for r in grid]
    assert all(0.05 <= x <= 0.5 for x in rhos) and len(set(rhos)) == 4
    for r in grid:
        assert r.metrics["epochs_done"] == EPOCHS and r.metrics["gflops"] == pytest.approx(
            100 + 50 * r.config["model.rho"]
        )


def test_asha_stops_weak_trials_and_they_are_marked(ray_local, tmp_path):
    from sdetr.platform.sweeps.results import record_states

    lines: list[str] = []
    spec, grid = run(
        tmp_path,
        """\
        preset: tiny_sparse_detr_rho_0.1
        space:
          model.rho: [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # best first, so weaker trials meet full rungs
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
        epochs: 4
        """,
        progress=lines,
    )
    done = {r.config["model.rho"]: r.metrics["epochs_done"] for r in grid}
    assert len(done) == 8 and not grid.errors
    assert done[0.8] == EPOCHS and min(done.values()) < EPOCHS, done
    states = record_states(tmp_path / "runs" / "t", grid)
    assert set(states.values()) == {
        "stopped_early"
    }  # every TERMINATED trial until its history says otherwise

    # The terminal: a line per trial event, each naming the trial and what it is, none over 100 columns.
    from sdetr.platform.sweeps.progress import WIDTH, trial_label

    assert lines and all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    for r in grid:
        rho, trial_id = r.config["model.rho"], r.metrics["trial_id"]
        mine = [line for line in lines if trial_id in line]
        label = trial_label(spec, r.config)[0]
        assert f"ρ={rho:g}" in label and all(line.endswith(label) for line in mine), mine
        assert "started" in mine[0]
        # AP in percent: the stand-in reports AP = ρ * epochs / 4.
        assert f"epoch 1/4  AP {100 * rho / 4:4.1f} %  AP50      -" in mine[1], mine
        if done[rho] == EPOCHS:
            assert "completed" in mine[-1] and f"AP {100 * rho:4.1f} %" in mine[-1], mine
        else:
            assert f"stopped at epoch {done[rho]}/4:" in mine[-1], mine
        assert f"{100 + 50 * rho:.2f} GFLOPs" in mine[-1], mine
    assert any(" waiting: " in line and " of 8" in line for line in lines), lines


def test_progress_pickles_where_print_is_replaced(tmp_path, monkeypatch, capsys):
    """Tune pickles its run config (and so SweepProgress) into the sweep folder for resuming. In a Ray
    job's driver ``builtins.print`` is Ray's replacement: the ``print`` bound when progress.py was
    imported then no longer pickles by name (a submitted sweep failed before its first trial)."""
    import builtins

    from ray import cloudpickle

    from sdetr.platform.sweeps.progress import SweepProgress

    path = tmp_path / "s.yaml"
    path.write_text("preset: tiny_sparse_detr_rho_0.1\nspace:\n  model.rho: [0.1]\nepochs: 1\n")
    progress = SweepProgress(load_sweep(path))
    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)
    restored = cloudpickle.loads(cloudpickle.dumps(progress))
    monkeypatch.undo()
    restored.say("after a resume")
    assert "after a resume" in capsys.readouterr().out


def test_status_line_places_each_running_trial(tmp_path):
    """While waiting, the status line says where each running trial is: its epoch and the share of it
    done, from the status file its rank 0 rewrites after every step."""
    import json
    import types

    from sdetr.platform.layout import WORKERS_DIR, worker_status_file
    from sdetr.platform.sweeps.progress import WIDTH, SweepProgress

    path = tmp_path / "s.yaml"
    path.write_text("preset: tiny_sparse_detr_rho_0.1\nspace:\n  model.rho: [0.1, 0.2, 0.3]\nepochs: 3\n")
    trials_dir = tmp_path / "trials"
    positions = {"ab12c_00000": (1, 40, 100), "ab12c_00002": (0, 7, 28)}
    for trial_id, (epoch, step, steps) in positions.items():
        folder = trials_dir / trial_id / WORKERS_DIR
        folder.mkdir(parents=True)
        status = {"pid": 1, "epoch": epoch, "step": step, "global_step": 0, "steps_per_epoch": steps}
        (folder / worker_status_file(0)).write_text(json.dumps(status))
    # Running without a status file yet (its workers are starting): counted, not placed.
    (trials_dir / "ab12c_00001" / WORKERS_DIR).mkdir(parents=True)
    lines: list[str] = []
    progress = SweepProgress(load_sweep(path), lines.append, interval_s=0.0, trials_dir=str(trials_dir))
    trials = [
        types.SimpleNamespace(trial_id=f"ab12c_0000{i}", status="RUNNING", config={"model.rho": rho})
        for i, rho in enumerate((0.1, 0.2, 0.3))
    ]
    progress.on_step_end(0, trials)
    assert lines[-1].endswith("waiting: 3 running of 3 (00000 epoch 2/3 40 %, 00002 epoch 1/3 25 %)"), lines
    assert len(lines[-1]) <= WIDTH
    # An unreadable status file places nothing and breaks nothing; a sweep on object storage has none.
    (trials_dir / "ab12c_00000" / WORKERS_DIR / worker_status_file(0)).write_text('{"epoch": 1, "st')
    progress.on_step_end(0, trials)
    assert lines[-1].endswith("waiting: 3 running of 3 (00002 epoch 1/3 25 %)"), lines
    SweepProgress(load_sweep(path), lines.append, interval_s=0.0).on_step_end(0, trials)
    assert lines[-1].endswith("waiting: 3 running of 3"), lines


def test_moasha_from_a_sweep_file_keeps_the_ends_of_the_front(ray_local, tmp_path):
    """``scheduler: {type: moasha}``: every stand-in trial is on the AP-GFLOPs front (AP and GFLOPs both
    grow with ρ), so MOASHA keeps the cheapest and the most accurate trial (infinite crowding distance)
    and stops trials in between that meet them at a rung (the ends come first in the grid, so they are
    there when the others arrive); its decisions are recorded in the sweep folder."""
    from sdetr.platform.layout import MOASHA_FILE
    from sdetr.platform.sweeps.moasha import read_record

    spec, grid = run(
        tmp_path,
        """\
        preset: tiny_sparse_detr_rho_0.1
        space:
          model.rho: [0.1, 0.8, 0.5, 0.3, 0.6, 0.2, 0.7, 0.4]
        scheduler: {type: moasha, grace_period: 1, reduction_factor: 2}
        epochs: 4
        """,
    )
    done = {r.config["model.rho"]: r.metrics["epochs_done"] for r in grid}
    assert len(done) == 8 and not grid.errors
    assert done[0.1] == EPOCHS and done[0.8] == EPOCHS, done
    assert min(done.values()) < EPOCHS, done
    record = read_record(tmp_path / "runs" / "t" / MOASHA_FILE)
    stopped = {r.config["model.rho"] for r in grid if r.metrics["epochs_done"] < EPOCHS}
    assert len(record["stopped_at"]) == len(stopped)


def test_a_learning_searcher_under_a_scheduler_sees_only_finished_trials(tmp_path):
    from sdetr.platform.sweeps.moasha import MOASHA, SoundResultsSearcher

    path = tmp_path / "s.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            preset: tiny_sparse_detr_rho_0.1
            space:
              model.rho: {uniform: [0.05, 0.5]}
            search: {algorithm: optuna_multi, num_samples: 4, seed: 1}
            scheduler: {type: moasha, grace_period: 1, reduction_factor: 3, max_t: 3}
            epochs: 4
            """
        )
    )
    spec = load_sweep(path)
    config = tune_config(spec, concurrent=2, sweep_dir=tmp_path)
    assert isinstance(config.scheduler, MOASHA) and config.scheduler.max_t == 3
    assert isinstance(config.search_alg, SoundResultsSearcher)
