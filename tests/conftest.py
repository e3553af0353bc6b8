import os

import pytest
import torch

# Two cores are shared by the test process and anything it starts; keep torch from oversubscribing
# (one thread per pytest-xdist worker process).
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _PROCESSES)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
