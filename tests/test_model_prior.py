"""AutoFlowGuide(local_prior="model"): the model's own prior of its locals times each
member's Gaussian, started at the likelihood's Laplace approximation."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyroflows import AutoFlowGuide

N, B = 1050, 100  # not a multiple of the subsample: the last chunk overlaps


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()


def data(n=N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0 + torch.rand(n, generator=generator)
    y = 1.0 + 0.5 * torch.randn(n, generator=generator) + sigma * torch.randn(n, generator=generator)
    return sigma, y


def model(sigma, y, subsample_size=B):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])


def exact_conditional(mu, tau, sigma, y):
    """theta_i | mu, tau, y_i ~ N(c_i, v_i)."""
    precision = tau**-2 + sigma**-2
    return (mu * tau**-2 + y * sigma**-2) / precision, precision.rsqrt()


def test_every_member_starts_at_its_likelihood():
    # Normal likelihood: the Laplace share is exact, N(y_i, sigma_i), member by member (a
    # start that shuffled indices or kept the minibatch's N / B scale would be far off)
    sigma, y = data()
    guide = AutoFlowGuide(model, local_prior="model").setup(sigma, y)
    loc = guide.locals.loc[0].detach().squeeze(-1)
    scale = torch.nn.functional.softplus(guide.locals.scale_raw[0].detach()).squeeze(-1)
    assert torch.allclose(loc, y, atol=1e-4)
    assert torch.allclose(scale, sigma, rtol=1e-4)


@pytest.mark.parametrize("tau_scale", [0.01, 1.0, 30.0])
def test_the_guides_local_density_is_the_exact_conditional_at_any_global_scale(tau_scale):
    # the trap of a learned prior: right only where q(tau) has been. The model's prior is
    # right at every tau, far from where the guide started too
    sigma, y = data()
    guide = AutoFlowGuide(model, local_prior="model").setup(sigma, y)
    with torch.no_grad():
        guide.loc[1] = torch.tensor(tau_scale).log()  # tau's unconstrained location
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(sigma, y)
    site = trace.nodes["theta"]
    idx = trace.nodes["groups"]["value"]
    mu, tau = trace.nodes["mu"]["value"], trace.nodes["tau"]["value"]
    mean, sd = exact_conditional(mu, tau, sigma[idx], y[idx])
    expected = dist.Normal(mean, sd).log_prob(site["value"])
    assert torch.allclose(site["fn"].log_prob(site["value"]), expected, atol=1e-3, rtol=1e-4)


def test_sample_posterior_draws_every_member_from_its_conditional():
    sigma, y = data()
    guide = AutoFlowGuide(model, local_prior="model", init_scale=1e-5).setup(sigma, y)
    draws = guide.sample_posterior(4000, seed=1)
    mu, tau = draws["mu"].mean(), draws["tau"].mean()  # q(globals) is a near point
    mean, sd = exact_conditional(mu, tau, sigma, y)
    theta = draws["theta"]
    assert theta.shape == (4000, N)
    z = (theta.mean(0) - mean) / (sd / 4000**0.5)
    assert z.abs().max() < 5  # 1050 members, each within 5 standard errors
    assert ((theta.std(0) / sd).log().abs() < 0.1).all()
