"""`sdetr sweep submit` to a real 2-node Ray cluster on localhost, tracked by a real MLflow server.

`ray start --head` plus a second `ray start --address` make the cluster (token authentication on, as
Ray's default for local clusters); `mlflow server` runs on a SQLite backend. The sweep's one trial
has two Train workers of 1.5 CPUs each, which only fit one per node: the trial spans both nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdetr.platform import tracking

from .services import free_port, start_mlflow, stop, wait_for_mlflow
from .test_sweep import sweep_yaml

# `ray start` clusters are machine-wide: other tests' ray.init() would join this one, and `ray stop`
# ends theirs, so this file runs on its own (README: the second pytest command).
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]
BIN = Path(sys.executable).parent


@pytest.fixture
def env():
    # The job's entry point runs `python` from the PATH of the `ray start` that launched the head.
    # Clients and joining nodes send the cluster's token (~/.ray/auth_token) only in token mode.
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }


@pytest.fixture
def mlflow_server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    # Started before the cluster and waited for after it: its ~20 s of migrations overlap Ray's start-up.
    proc, uri = start_mlflow(folder, f"sqlite:///{folder / 'mlflow.db'}", str(folder / "art"), wait=False)
    try:
        yield uri, proc
    finally:
        stop(proc)


@pytest.fixture
def two_node_cluster(env, tmp_path):
    ray = str(BIN / "ray")
    port, dashboard = free_port(), free_port()
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    subprocess.run(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        subprocess.run(
            [ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
             "--num-cpus", "2", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_to_two_node_cluster(mlflow_server, two_node_cluster, tmp_path, env):
    gcs, dashboard = two_node_cluster
    server, server_proc = mlflow_server
    # In a fresh process: this one may hold another Ray session from earlier tests.
    probe = (
        "import ray, json; ray.init(address='%s'); "
        "print(json.dumps([n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe % gcs], env=env, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2.0, 2.0], out.stderr[-2000:]
    wait_for_mlflow(server, server_proc)

    from sdetr.detector.data.synth import generate_synthetic_coco
    from sdetr.platform.shards.writer import shard_coco

    generate_synthetic_coco(tmp_path / "coco", n_train=16, n_val=4, seed=5, min_size=96, max_size=128)
    shard_coco(tmp_path / "coco", tmp_path / "shards", shard_size=8, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    # One trial of two 1.5-CPU workers: a 2-CPU node holds only one of them.
    text = sweep_yaml(
        tmp_path / "shards", "remote", rhos=[0.2], epochs=1, resources="{workers: 2, cpus_per_worker: 1.5}"
    )
    (work / "remote.yaml").write_text(text)
    storage = tmp_path / "shared-runs"
    proc = subprocess.run(
        [str(BIN / "sdetr"), "sweep", "submit", "remote.yaml", "--address", dashboard,
         "--storage", str(storage), "--mlflow-uri", server, "--wait"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    job_id = next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("submitted job"))
    assert f"job {job_id}: SUCCEEDED" in proc.stdout

    client = tracking.client(server)
    exp = client.get_experiment_by_name("test-sweeps")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sdetr.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 1 and len(runs) == 2
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert child.data.tags["sdetr.ray_job_id"] == parent[0].data.tags["sdetr.ray_job_id"] == job_id
    assert child.data.params["ray.workers"] == "2"
    assert "val/AP" in child.data.metrics and "cost/gflops" in child.data.metrics
    assert child.data.tags["pareto_optimal"] == "true"
    # Two ranks, one on each node.
    trial_dir = next((storage / "remote" / "trials").iterdir())
    ranks = [json.loads((trial_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
