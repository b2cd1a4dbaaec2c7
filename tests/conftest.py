import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # the benchmarks: `import bench` (bench/ sits at the repository root)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny in-process models: two threads per process on a shared
    2-core machine can be 10x slower, and one thread keeps the summation order fixed). Files take it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def same_threads(one_thread) -> dict:
    """For a bit-identical comparison of runs made in this process and in subprocesses: torch on one
    thread here (``one_thread``), and the environment that starts a subprocess's torch on one thread too,
    to merge into its env. A run on another thread count sums in another order, so without the pin a
    user's exported OMP_NUM_THREADS (SLURM sites set it) decides whether two correct runs agree."""
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
