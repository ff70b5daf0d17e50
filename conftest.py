import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--float64", action="store_true", help="run the suite with torch's default dtype float64"
    )


def pytest_configure(config):
    """Share the cores among pytest-xdist workers instead of oversubscribing them.

    Each worker (and the notebook kernels and ranks it starts) gets cores / workers threads:
    two workers of two threads on two cores made the fast suite slower than one process
    (187 s against 164 s); two of one thread take 131 s.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_and_dtype(request):
    """Every test starts from a fixed seed (and, with --float64, in double precision)."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    if request.config.getoption("--float64"):
        torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
