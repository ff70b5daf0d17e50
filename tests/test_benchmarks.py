"""The benchmark ports stay runnable: each model broadcasts over draws and maps to the
reference's parameter names (skipped where the posteriordb folder is absent)."""

import pyro
import pytest
import torch

from benchmarks.posteriors import POSTERIORDB, POSTERIORS
from pyroflows import AutoFlowGuide
from pyroflows.draws import draw


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_port_draws_vectorised_and_names_every_reference_parameter(name, recwarn):
    if not POSTERIORDB.exists() and name not in ("funnel_d10", "U1", "U2", "U3", "U4"):
        pytest.skip(f"no posteriordb at {POSTERIORDB}")
    pyro.clear_param_store()
    posterior = POSTERIORS[name]()
    guide = AutoFlowGuide(posterior.model)
    guide(*posterior.args)
    draws = draw(posterior.model, guide, posterior.args, {}, 50)
    assert not [w for w in recwarn if "sequentially" in str(w.message)], "port does not broadcast"
    params = posterior.to_params(draws.values)
    assert set(posterior.reference) <= set(params)
    assert all(v.shape == (50,) and torch.isfinite(v).all() for v in params.values())
    assert torch.isfinite(draws.log_weights).all()


def test_energy_references_integrate_to_their_grid_moments():
    u1 = POSTERIORS["U1"]()
    # U1 is symmetric in both coordinates: zero means, and a finite normaliser
    assert abs(u1.reference["z[1]"]["mean"]) < 1e-6 and abs(u1.reference["z[2]"]["mean"]) < 1e-6
    assert u1.log_z is not None and torch.isfinite(torch.tensor(u1.log_z))
