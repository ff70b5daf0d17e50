"""AutoFlowGuide against exact answers: slower tests (about a minute on 2 cores), run with
``-m slow``."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_value

from pyroflows import AutoFlowGuide

pytestmark = pytest.mark.slow


def fit(model, guide, *args, steps, particles=16, lr=0.03, final_lr=3e-4):
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": (final_lr / lr) ** (1 / steps)})
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step(*args)


def test_conjugate_linear_regression_with_correlated_design():
    torch.manual_seed(0)
    n, d, noise = 30, 3, 1.0
    design_cov = 0.9 * torch.ones(d, d) + 0.1 * torch.eye(d)
    x = torch.randn(n, d) @ torch.linalg.cholesky(design_cov).T
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + noise * torch.randn(n)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal((x * w).sum(-1), noise), obs=y)

    # The exact posterior: N(S X^T y / noise^2, S) with S = (I + X^T X / noise^2)^-1.
    cov = torch.linalg.inv(torch.eye(d) + x.T @ x / noise**2)
    mean = cov @ x.T @ y / noise**2
    sd = cov.diag().sqrt()
    corr = cov / sd[:, None] / sd[None, :]
    assert corr[0, 1] < -0.6 and corr[1, 2] < -0.6  # strongly correlated: mean-field fails

    pyro.set_rng_seed(2)
    guide = AutoFlowGuide(model)
    fit(model, guide, x, y, steps=1000)
    w = guide.sample_posterior(20000)["w"]
    assert ((w.mean(0) - mean) / sd).abs().max() < 0.1
    assert ((w.std(0) / sd) - 1).abs().max() < 0.1
    assert (torch.corrcoef(w.T) - corr).abs().max() < 0.1


def ring_energy(z):
    """Rezende & Mohamed's U1: a ring of radius 2 with two lobes along z1."""
    r = z.norm(dim=-1)
    lobes = torch.logaddexp(
        -0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2
    )
    return 0.5 * ((r - 2) / 0.4) ** 2 - lobes


def ring_model():
    z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real_vector, (), (2,)))
    pyro.factor("energy", -ring_energy(z))


def test_flow_beats_multivariate_normal_on_a_non_gaussian_target():
    """Same target, same budget: a larger ELBO is a smaller KL(q || p) (log Z is shared)."""
    init = init_to_value(values={"z": torch.tensor([2.0, 0.3])})
    elbos = {}
    for name, guide_class in [("mvn", AutoMultivariateNormal), ("flow", AutoFlowGuide)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        # init="prior" for the flow: the Laplace start sits on one lobe of the ring, a local
        # optimum of KL(q || p) (see AutoFlowGuide's docstring)
        extra = {"init": "prior"} if guide_class is AutoFlowGuide else {}
        guide = guide_class(ring_model, init_loc_fn=init, **extra)
        fit(ring_model, guide, steps=600, lr=0.02, final_lr=1e-3)
        with torch.no_grad():
            loss = Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
            elbos[name] = -loss.loss(ring_model, guide)
    # Monte Carlo error of each estimate is ~0.01; the flow is better by ~0.2 nats.
    assert elbos["flow"] > elbos["mvn"] + 0.1, elbos


@pytest.mark.parametrize("seed", [0, 1])
def test_a_sinh_arcsinh_layer_reaches_a_skewed_marginal(seed):
    # A Gumbel's long right tail: the default flow (two IAF blocks) fits it as a Gaussian,
    # sd 17-21% narrow and the 99% quantile at 3.0 (truth 4.6) at seeds 0-3; a sinh-arcsinh
    # layer first gives the marginal its own skew and tail weight.
    from pyroflows import fit as fit_guide

    def model():
        pyro.sample("x", dist.Gumbel(0.0, 1.0))

    pyro.clear_param_store()
    guide = AutoFlowGuide(model, flow=["sinh_arcsinh", "iaf", "iaf"])
    fit_guide(model, guide, num_steps=3000, progress=False, seed=seed, diagnose=False)
    x = guide.sample_posterior(40_000, seed=seed)["x"]
    truth = dist.Gumbel(0.0, 1.0)
    assert abs(torch.log(x.std() / truth.stddev)) < 0.1
    q99 = float(truth.icdf(torch.tensor(0.99)))
    assert abs(float(x.quantile(0.99)) - q99) < 0.6


def test_a_local_guide_reaches_the_hierarchy_scale_tail_on_centred_eight_schools():
    # tau's density stays positive at zero: in log tau a long left tail. With the schools
    # local, the flow holds (mu, tau) alone, and two IAF blocks fitted tau's sd 23-27% narrow
    # (benchmark, seeds 0-2); the default flow for a guide with local latents has a
    # sinh-arcsinh layer first, and its draws reach the reference's sd and 5% quantile.
    import json
    from pathlib import Path

    from pyroflows import fit as fit_guide

    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def schools(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    path = Path(__file__).parent / "data" / "eight_schools_centered_reference.json"
    reference = json.loads(path.read_text())["parameters"]["tau"]
    pyro.clear_param_store()
    guide = AutoFlowGuide(schools, local_plates=["school"])
    fit_guide(schools, guide, y, sigma, progress=False, seed=0, diagnose=False)
    tau = guide.sample_posterior(20_000, seed=0)["tau"]
    assert abs(math.log(float(tau.std()) / reference["sd"])) < 0.1
    assert abs(math.log(float(tau.quantile(0.05)) / reference["q05"])) < 0.25
