import os

import pytest
import torch

# Ray's worker processes keep Ray's default nice 15 (RAY_worker_niceness). Under pytest-xdist they then
# wait behind the other test process (a worker's `import torch` took 12 s instead of 1.6 s at load 4),
# but at nice 0 they crowded out a new cluster's raylet past Ray's fixed 30 s start-up deadline (load
# 26, three errors), and a run at nice 5 had three failures before it was stopped. The Ray tests'
# deadlines are long enough for the starved workers instead (docs/benchmarks.md, "Test suite").

# Two cores are shared by the test process and anything it starts; keep torch from oversubscribing
# (one thread per pytest-xdist worker process).
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _PROCESSES)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The longest test files first (from CI's --durations). With `--dist loadfile` a file runs in one
# process; pytest-xdist would otherwise order files by their number of tests, which puts these few long
# Ray tests last, where one of them runs alone for minutes while the other process idles.
LONGEST_FIRST = (
    "test_sweep.py",
    "test_tracking_server.py",
    "test_ray_train.py",
    "test_export.py",
    "test_sweep_tune.py",
    "test_finetune.py",
    "test_ray_data.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
