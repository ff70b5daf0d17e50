"""The importance-weighted bound and its DReG gradients, against exact answers."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import init_to_value

from pyroflows import AutoFlowGuide, ImportanceWeightedELBO


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = torch.tensor(1.0)
POST_MEAN, POST_SD = 0.5, math.sqrt(0.5)
LOG_Z = float(dist.Normal(0.0, math.sqrt(2.0)).log_prob(Y))


def guide_at(loc, scale):
    guide = AutoFlowGuide(
        model,
        flow="realnvp",
        hidden_dims=[4],
        init_loc_fn=init_to_value(values={"mu": torch.tensor(loc)}),
        init="prior",
        init_scale=scale,
    )
    guide(Y)
    return guide


def guide_grads(guide, elbo):
    for p in guide.parameters():
        p.grad = None
    elbo.loss_and_grads(model, guide, Y)
    return torch.cat([p.grad.flatten() for p in (guide.loc, guide.scale_raw)])


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("dreg", [False, True])
def test_bound_equals_log_evidence_at_the_exact_posterior(k, dreg):
    guide = guide_at(POST_MEAN, POST_SD)
    elbo = ImportanceWeightedELBO(num_particles=k, dreg=dreg)
    assert elbo.loss(model, guide, Y) == pytest.approx(-LOG_Z, abs=1e-5)
    assert elbo.loss_and_grads(model, guide, Y) == pytest.approx(-LOG_Z, abs=1e-5)


def test_bound_tightens_with_k_away_from_the_posterior():
    guide = guide_at(0.0, 0.4)
    losses = {}
    for k in (1, 64):
        elbo = ImportanceWeightedELBO(num_particles=k)
        losses[k] = sum(elbo.loss(model, guide, Y) for _ in range(200)) / 200
    assert losses[64] < losses[1] - 0.05
    assert losses[64] > -LOG_Z - 0.01  # still a bound


def test_dreg_guide_gradient_vanishes_at_the_optimum_where_iwae_does_not():
    guide = guide_at(POST_MEAN, POST_SD)
    dreg = guide_grads(guide, ImportanceWeightedELBO(num_particles=8, dreg=True))
    assert dreg.abs().max() < 1e-5
    iwae = torch.stack(
        [guide_grads(guide, ImportanceWeightedELBO(num_particles=8, dreg=False)) for _ in range(5)]
    )
    assert iwae.abs().max() > 1e-2  # the score term: noise at the optimum


def test_dreg_with_one_particle_is_sticking_the_landing():
    guide = guide_at(0.2, 0.3)
    pyro.set_rng_seed(4)
    elbo = ImportanceWeightedELBO(num_particles=1, dreg=True, max_plate_nesting=0)
    dreg = guide_grads(guide, elbo)
    guide.stl = True
    pyro.set_rng_seed(4)
    stl = guide_grads(guide, Trace_ELBO())
    assert torch.allclose(dreg, stl, atol=1e-5)


def test_dreg_is_unbiased_for_the_iwae_gradient():
    guide = guide_at(0.0, 0.4)
    reps = 600
    grads = {}
    for dreg in (True, False):
        elbo = ImportanceWeightedELBO(num_particles=4, dreg=dreg)
        grads[dreg] = torch.stack([guide_grads(guide, elbo) for _ in range(reps)])
    diff = grads[True].mean(0) - grads[False].mean(0)
    stderr = torch.sqrt(grads[True].var(0) / reps + grads[False].var(0) / reps)
    assert (diff.abs() < 4 * stderr).all(), (diff, stderr)


def underflowing_model():
    # For x > 1.72 the variance exp(-60 x) underflows to 0 in float32 while the scale does
    # not: the log weight is -inf and its own backward pass is 0 * inf = NaN.
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(0.0, torch.exp(-30.0 * x)), obs=torch.tensor(1.0))


@pytest.mark.parametrize("dreg", [True, False])
def test_bound_survives_draws_whose_weight_underflows(dreg):
    guide = AutoFlowGuide(underflowing_model, flow="realnvp", init="prior", init_scale=1.0)
    elbo = ImportanceWeightedELBO(num_particles=64, dreg=dreg, max_plate_nesting=0)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        log_w, _ = elbo._log_weights(underflowing_model, guide, (), {})
    assert (log_w == -math.inf).any() and torch.isfinite(log_w).any()
    pyro.set_rng_seed(0)
    loss = elbo.loss_and_grads(underflowing_model, guide)
    assert math.isfinite(loss)
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
