"""Batched HMC (``pyroflows.hmc``) and NeuTra through it (``neutra_chains``)."""

import math
import time

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import AutoFlowGuide
from pyroflows.hmc import batched_hmc
from pyroflows.neutra import flow_energy, neutra_chains

COV = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 4.0]], dtype=torch.float64)
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def gaussian_energy(z):
    centred = z - MEAN
    return 0.5 * (centred @ torch.linalg.inv(COV) * centred).sum(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_draws_match_a_correlated_gaussian_within_monte_carlo_error(seed):
    from pyro.ops.stats import effective_sample_size

    torch.manual_seed(seed)
    run = batched_hmc(gaussian_energy, torch.zeros(8, 3, dtype=torch.float64), 400, warmup=200)
    assert run.draws.shape == (8, 400, 3) and not run.divergent.any()
    ess = effective_sample_size(run.draws, chain_dim=0, sample_dim=1)
    flat = run.draws.reshape(-1, 3)
    sd = COV.diagonal().sqrt()
    assert ((flat.mean(0) - MEAN).abs() < 3.5 * sd / ess.sqrt()).all()
    assert ((flat.std(0) / sd - 1).abs() < 3.5 / (2 * ess).sqrt()).all()
    # The metric adapts to the variances (pooled over chains): 4.0 for the third coordinate.
    assert 2.5 < float(run.inv_metric[2]) < 6.0 and 0.5 < run.accept < 0.99


def test_a_divergent_trajectory_is_rejected_and_counted_not_raised():
    # Outside |z| < 3 the energy is infinite: trajectories that reach it are divergences,
    # the chain stays where it was, and the other chains are untouched.
    def walled(z):
        inside = 0.5 * (z * z).sum(-1)
        return torch.where(z.abs().max(-1).values < 3.0, inside, torch.full_like(inside, math.inf))

    torch.manual_seed(0)
    run = batched_hmc(walled, torch.zeros(4, 2), 100, warmup=50, trajectory=6.0, max_steps=16)
    assert run.divergent.any() and torch.isfinite(run.draws).all()
    assert run.draws.abs().max() < 3.0


def test_a_start_where_the_energy_is_not_finite_is_refused_naming_it():
    def energy(z):
        return 0.5 * (z * z).sum(-1) + torch.where(z[:, 0] > 0, math.nan, 0.0)

    with pytest.raises(ValueError, match="not finite at 1 start"):
        batched_hmc(energy, torch.tensor([[1.0], [-1.0]]), 10, warmup=5)


def test_a_deadline_ends_the_run_early_and_says_so():
    torch.manual_seed(0)
    run = batched_hmc(
        gaussian_energy,
        torch.zeros(4, 3, dtype=torch.float64),
        10**6,
        100,
        deadline=time.perf_counter() + 0.5,
    )
    assert "time budget" in run.stopped and run.draws.shape[1] >= 10


def test_a_run_continues_with_the_step_size_and_metric_it_is_given():
    torch.manual_seed(0)
    first = batched_hmc(gaussian_energy, torch.zeros(4, 3, dtype=torch.float64), 50, 100)
    settings = dict(step_size=first.step_size, inv_metric=first.inv_metric)
    more = batched_hmc(gaussian_energy, first.draws[:, -1], 30, 0, **settings)
    assert more.step_size == first.step_size and more.warmup == 0
    assert torch.equal(more.inv_metric, first.inv_metric) and more.draws.shape == (4, 30, 3)


def funnel_model():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("i", 2):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def test_flow_energy_is_the_model_seen_through_the_flow():
    # energy(z) = -log p(x, T(z)) - log|det dT/dz|: checked against the guide's own
    # single-vector energy and the Jacobian from autograd, in float64.
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(funnel_model, init="prior").setup()
        for p in guide.parameters():  # trained-like parameters, not the identity start
            p.data.add_(0.1 * torch.randn_like(p))
        z = torch.randn(5, 3)
        energy = flow_energy(funnel_model, guide)(z)
        transform, single = guide.get_transform(), guide.energy()
        expected = []
        for row in z:
            jacobian = torch.autograd.functional.jacobian(transform, row)
            expected.append(single(transform(row)) - torch.linalg.slogdet(jacobian)[1])
    finally:
        torch.set_default_dtype(before)
    assert torch.allclose(energy, torch.stack(expected), rtol=1e-10, atol=1e-10)


def test_neutra_chains_recover_a_funnel_and_report_chains():
    # On the funnel fitted only by its prior start (a poor flow), the chains still match
    # the analytic marginal v ~ N(0, 3) within Monte Carlo error, and say how they went.
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(funnel_model, init="prior").setup()
    chain = neutra_chains(
        funnel_model,
        guide,
        num_samples=1600,
        num_chains=8,
        warmup_steps=150,
        target_accept_prob=0.9,
    )
    assert chain.num_chains == 8 and chain.num_draws == 1600
    assert chain.samples["v"].shape == (1600,) and chain.samples["x"].shape == (1600, 2)
    v = chain.samples["v"]
    assert abs(float(v.mean())) < 3.5 * 3.0 / math.sqrt(chain.ess)
    assert "8 chains x 200 draws" in chain.describe()


def test_the_traced_gradient_equals_autograd_through_the_flow_energy():
    from pyroflows.hmc import energy_and_grad
    from pyroflows.traced import traced_gradient

    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(funnel_model, init="prior").setup()
    for p in guide.parameters():  # trained-like parameters, not the identity start
        p.data.add_(0.1 * torch.randn_like(p))
        p.requires_grad_(False)
    energy = flow_energy(funnel_model, guide)
    gradient, reason = traced_gradient(energy, torch.zeros(6, 3))
    assert reason == "" and gradient is not None
    z = 2 * torch.randn(6, 3)
    value, grad = gradient(z)
    want_value, want_grad = energy_and_grad(energy, z)
    assert torch.allclose(value, want_value, rtol=1e-5) and torch.allclose(
        grad, want_grad, rtol=1e-4
    )


def test_an_energy_the_trace_cannot_follow_is_not_traced_and_says_why():
    from pyroflows.traced import traced_gradient

    def branching(z):  # a Python branch on a value: make_fx refuses to read it
        return 0.5 * (z * z).sum(-1) * (2.0 if float(z.sum()) > 0 else 1.0)

    gradient, reason = traced_gradient(branching, torch.full((3, 2), -1.0))
    assert gradient is None and "tracing the energy failed" in reason

    calls = {"n": 0}

    def impure(z):  # reads state that changes between calls: the trace freezes its first
        calls["n"] += 1
        return 0.5 * min(calls["n"], 2) * (z * z).sum(-1)

    gradient, reason = traced_gradient(impure, torch.zeros(3, 2))
    assert gradient is None and "froze" in reason


def test_a_graph_that_stops_agreeing_gives_way_to_the_energy_with_a_warning():
    from pyroflows.traced import CHECK_EVERY, traced_gradient

    state = {"scale": 1.0}  # read as a Python number: frozen into the trace

    def energy(z):
        return 0.5 * state["scale"] * (z * z).sum(-1)

    gradient, _ = traced_gradient(energy, torch.zeros(2, 2))
    state["scale"] = 2.0
    z = torch.ones(2, 2)
    for _ in range(CHECK_EVERY - 1):
        assert float(gradient(z)[0][0]) == 1.0  # the frozen graph, until the check
    with pytest.warns(UserWarning, match="traced energy gave up"):
        value, _ = gradient(z)
    assert float(value[0]) == 2.0 and gradient.given_up
    assert float(gradient(z)[0][0]) == 2.0  # from then on, the energy itself


def test_an_enumerated_model_is_refused_by_the_batched_energy_naming_the_site():
    # The batched energy conditions the flow's sites only: an enumerated discrete site
    # would be drawn afresh at every evaluation (a random energy, on which HMC's step size
    # collapsed and a 500-draw infer ran for minutes), so it is refused, and infer keeps
    # Pyro's NUTS, which sums it out, for such models.
    from pyro.infer import config_enumerate
    from pyro.ops.indexing import Vindex

    from pyroflows.neutra import cannot_batch

    @config_enumerate
    def mixture(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with pyro.plate("data", len(y)):
            k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6])))
            pyro.sample("y", dist.Normal(Vindex(loc)[..., k], 1.0), obs=y)

    y = torch.tensor([-2.0, -1.5, 2.0, 2.5])
    guide = AutoFlowGuide(mixture, init="prior").setup(y)
    assert "'k' is not in the flow" in cannot_batch(mixture, guide, (y,))
    with pytest.raises(ValueError, match="'k' is not in the flow"):
        flow_energy(mixture, guide, (y,))
    assert cannot_batch(funnel_model, AutoFlowGuide(funnel_model).setup()) == ""


def normal_model():
    pyro.sample("x", dist.Normal(1.0, 2.0))


@pytest.mark.parametrize(("num_samples", "chains"), [(400, 4), (1000, 4), (2000, 8)])
def test_by_default_each_chain_gets_at_least_250_draws_from_4_to_16_chains(num_samples, chains):
    # R-hat - 1 is about 1 / (ESS per chain): 16 chains of 63 draws read R-hat 1.01-1.02 on
    # well-mixed draws, so a small num_samples takes fewer, longer chains.
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(normal_model).setup()
    run = neutra_chains(normal_model, guide, num_samples=num_samples, warmup_steps=20)
    assert run.num_chains == chains and run.num_draws == num_samples


def test_neutra_chains_start_only_where_the_flow_draws_have_finite_energy():
    # rats (held-out set): a badly fitted flow put 13 of 16 chain starts where the model
    # has zero density, and batched_hmc refused to start. A wall at x > 1 with a guide two
    # wide puts about a third of its draws there.
    def walled():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(x > 1.0, -math.inf, 0.0))

    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(walled, init_scale=2.0, init="prior").setup()
    run = neutra_chains(walled, guide, num_samples=320, num_chains=16, warmup_steps=50)
    assert run.samples["x"].shape == (320,) and bool((run.samples["x"] <= 1.0).all())
