"""Guides saved by earlier versions (tests/data/legacy, made by make_legacy_guides.py) still
load, whole or as a state dict, and draw exactly what they drew when saved."""

import importlib.util
from pathlib import Path

import pyro
import pytest
import torch

from pyroflows import AutoFlowGuide

FOLDER = Path(__file__).parent / "data" / "legacy"
_maker = FOLDER.parent / "make_legacy_guides.py"
_spec = importlib.util.spec_from_file_location("make_legacy", _maker)
make_legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_legacy)


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def assert_same_draws(drawn, saved):
    assert drawn.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(drawn[name], saved[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(make_legacy.CASES))
def test_a_whole_saved_guide_loads_and_draws_the_same(case):
    guide = torch.load(FOLDER / f"{case}.guide.pt", weights_only=False)
    assert_same_draws(guide.sample_posterior(200, seed=5), torch.load(FOLDER / f"{case}.draws.pt"))


@pytest.mark.parametrize("case", sorted(make_legacy.CASES))
def test_a_saved_state_dict_loads_into_a_fresh_guide(case):
    guide = AutoFlowGuide(make_legacy.regression, **make_legacy.CASES[case])
    guide.load_state_dict(torch.load(FOLDER / f"{case}.state.pt"))
    x, y = make_legacy.data()
    with torch.no_grad():
        guide(x, y)  # a loaded guide needs one call to map its latent vector to the sites
    assert_same_draws(guide.sample_posterior(200, seed=5), torch.load(FOLDER / f"{case}.draws.pt"))
