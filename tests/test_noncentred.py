"""The mode search of a centred hierarchy avoids the spike at zero scale, and a Laplace
approximation that is a poor proposal is still the start where it is far better than the
prior's (``pyroflows.noncentred``, ``pyroflows.laplace``; rats, posteriordb held-out set)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyroflows import AutoFlowGuide, infer
from pyroflows.laplace import laplace_start
from pyroflows.noncentred import hierarchy_search_start

GLOBALS = {"mu_a": 240.0, "mu_b": 6.0, "s_y": 6.0, "s_a": 14.0, "s_b": 0.5}


def growth_data(groups=30, points=5, seed=0, dtype=torch.float32):
    """Rats-like data: 30 growth lines, 5 weights each, far from the priors' centre (0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-14.0, 14.0, points).repeat(groups)
    group = torch.arange(groups).repeat_interleave(points)
    a = GLOBALS["mu_a"] + GLOBALS["s_a"] * torch.randn(groups, generator=g)
    b = GLOBALS["mu_b"] + GLOBALS["s_b"] * torch.randn(groups, generator=g)
    y = a[group] + b[group] * x + GLOBALS["s_y"] * torch.randn(len(x), generator=g)
    return group, x.to(dtype), y.to(dtype)


def growth(group, x, y):
    """Rats (posteriordb) in miniature: two centred hierarchies, flat priors on the scales."""
    flat = dist.ImproperUniform(constraints.positive, (), ())
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 100.0))
    mu_b = pyro.sample("mu_b", dist.Normal(0.0, 100.0))
    s_y = pyro.sample("s_y", flat)
    s_a = pyro.sample("s_a", flat)
    s_b = pyro.sample("s_b", flat)
    with pyro.plate("groups", int(group.max()) + 1):
        a = pyro.sample("a", dist.Normal(mu_a, s_a))
        b = pyro.sample("b", dist.Normal(mu_b, s_b))
    with pyro.plate("points", len(y)):
        pyro.sample("y", dist.Normal(a[..., group] + b[..., group] * x, s_y), obs=y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_centred_hierarchy_starts_at_its_own_mode_not_at_the_spike(dtype):
    # From the prior's start the search ran into scales -> 0 with every member equal,
    # where the Hessian is not positive definite, and the guide started at the prior.
    pyro.set_rng_seed(0)
    data = growth_data(dtype=dtype)
    guide = AutoFlowGuide(growth).setup(*data)
    assert guide.start_description.startswith("Laplace start"), guide.start_description
    assert guide.preconditioned and not guide.laplace_proposal  # a start, not an answer
    centre = guide.centre()
    assert abs(float(centre["mu_a"]) - float(data[2].mean())) < 10.0
    for scale in ["s_y", "s_a", "s_b"]:  # at the model's own mode, not at zero scale
        assert 0.3 < float(centre[scale]) / GLOBALS[scale] < 3.0, (scale, centre[scale])
    # a stationary point of the model's energy: the mode itself
    energy = guide.energy(*data)
    u = guide.center.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(u.to(dtype)), u)
    assert grad.abs().max() < 1e-2 * (1.0 if dtype == torch.float64 else 100.0)


def test_infer_answers_the_centred_hierarchy_at_the_locals_stage():
    # Before: the locals stage started at the prior's start and its training diverged
    # (the globals ended at mu_a = -0.07, s_y = 1.4), not accepted.
    data = growth_data()
    posterior = infer(growth, *data, seed=0, stages=("laplace", "locals"), progress=False)
    last = posterior.route.stages[-1]
    assert (last.name, last.accepted) == ("locals", True), posterior.route
    for name, truth in GLOBALS.items():  # the data's generating values, within 4 sds
        draws = posterior.samples[name].double()
        assert abs(draws.mean() - truth) < 4 * draws.std(), (name, draws.mean(), draws.std())


def student_energy(dim, df=1.5):
    t = dist.StudentT(df, torch.zeros((), dtype=torch.float64), 1.0)
    return lambda u: -t.log_prob(u).sum()


def test_a_poor_proposal_is_the_start_only_where_far_better_than_the_prior():
    energy = student_energy(40)  # heavy tails: the Laplace approximation's k-hat is high
    far = torch.full((40,), 30.0, dtype=torch.float64)
    start = laplace_start(energy, far, init_scale=0.1)  # the prior start far out: 1e4 nats
    assert start.ok and not start.proposal
    assert "better start than the prior's" in start.reason
    assert torch.allclose(start.mode, torch.zeros(40, dtype=torch.float64), atol=1e-4)
    # the prior start at the mode, with unit scale: within START_MARGIN of it, kept
    near = laplace_start(energy, torch.zeros(40, dtype=torch.float64), init_scale=1.0)
    assert not near.ok and "poor proposal" in near.reason


def test_a_funnel_keeps_the_prior_start():
    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        with pyro.plate("i", 9):
            pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    guide = AutoFlowGuide(funnel).setup()
    assert guide.start_description.startswith("prior start"), guide.start_description
    assert not guide.preconditioned


def schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def searches(model, args, shapes):
    """How many energy evaluations ``hierarchy_search_start`` makes on ``model``."""
    guide = AutoFlowGuide(model, init="prior").setup(*args)
    energy, calls = guide.energy(*args), []

    def counted(u):
        calls.append(1)
        return energy(u)

    shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
    hierarchy_search_start(model, guide.prototype_trace, shapes, counted, guide.loc, args, {})
    return len(calls)


def test_a_hierarchy_already_non_centred_takes_no_fallback_search():
    # eta ~ Normal(0, 1) does not move with (mu, tau): there is no spike to avoid, and the
    # fallback's searches (0.3-0.4 s on the README's eight schools) are not run; the
    # centred growth model's members do move with their globals, and it takes them.
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])
    sigma = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
    assert searches(schools, (y, sigma), {"mu": (), "tau": (), "eta": (8,)}) == 0
    shapes = {name: () for name in GLOBALS} | {"a": (30,), "b": (30,)}
    shapes = {k: shapes[k] for k in ["mu_a", "mu_b", "s_y", "s_a", "s_b", "a", "b"]}
    assert searches(growth, growth_data(), shapes) > 0
