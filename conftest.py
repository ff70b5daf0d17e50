import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--float64", action="store_true", help="run the suite with torch's default dtype float64"
    )


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
