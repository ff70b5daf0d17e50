"""AutoFlowGuide(local_prior="model"): the model's own prior of its locals times each
member's Gaussian, started at the likelihood's Laplace approximation."""

import math

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
    y = (
        1.0
        + 0.5 * torch.randn(n, generator=generator)
        + sigma * torch.randn(n, generator=generator)
    )
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


def test_members_of_several_elements_start_element_by_element():
    # three elements per member, each its own share (a layout mixing members and elements
    # would be off)
    generator = torch.Generator().manual_seed(1)
    sigma = 1.0 + torch.rand(60, 3, generator=generator)
    y = torch.randn(60, 3, generator=generator) * 2

    def vector_model(sigma, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", 60, subsample_size=20) as idx:
            theta = pyro.sample("theta", dist.Normal(mu, 2.0).expand([20, 3]).to_event(1))
            pyro.sample(
                "y",
                dist.Normal(theta * theta.new_tensor([1.0, 2.0, 0.5]), sigma[idx]).to_event(1),
                obs=y[idx],
            )

    guide = AutoFlowGuide(vector_model, local_prior="model").setup(sigma, y)
    weights = torch.tensor([1.0, 2.0, 0.5])
    loc = guide.locals.loc[0].detach().reshape(60, 3)
    scale = torch.nn.functional.softplus(guide.locals.scale_raw[0].detach()).reshape(60, 3)
    # y = w theta + noise: the likelihood's share is N(y / w, sigma / w)
    assert torch.allclose(loc, y / weights, atol=1e-3)
    assert torch.allclose(scale, sigma / weights, rtol=1e-3)


def grid_posterior(sigma, y):
    """Exact means and sds of mu, tau and each theta_i (a grid over mu, log tau)."""
    sigma, y = sigma.double(), y.double()
    mu, log_tau = torch.meshgrid(
        torch.linspace(-3, 5, 400, dtype=torch.float64),
        torch.linspace(-10, 2.5, 600, dtype=torch.float64),
        indexing="ij",
    )
    tau = log_tau.exp()
    log_p = dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfNormal(5.0).log_prob(tau) + log_tau
    total = (tau[..., None] ** 2 + sigma**2).sqrt()
    log_p = log_p + dist.Normal(mu[..., None], total).log_prob(y).sum(-1)
    w = torch.softmax(log_p.reshape(-1), 0).reshape(log_p.shape)
    out = {}
    for name, value in (("mu", mu), ("log_tau", log_tau), ("tau", tau)):
        mean = (w * value).sum()
        out[name] = (mean, ((w * (value - mean) ** 2).sum()).sqrt())
    c, v = exact_conditional(mu[..., None], tau[..., None], sigma, y)
    mean = (w[..., None] * c).sum((0, 1))
    out["theta"] = (mean, ((w[..., None] * (c**2 + v**2)).sum((0, 1)) - mean**2).sqrt())
    return out


def test_resampling_weighs_the_globals_with_members_integrated_out_and_fixes_a_narrow_guide():
    from pyroflows import importance_resample

    pyro.set_rng_seed(0)
    sigma, y = data(40)
    exact = grid_posterior(sigma, y)
    guide = AutoFlowGuide(model, num_layers=1, local_plates=["groups"]).setup(sigma, y, None)
    with torch.no_grad():  # q(mu, log tau): centred, but 3 times too narrow
        guide.loc.copy_(torch.stack([exact["mu"][0], exact["log_tau"][0]]).float())
        sd = torch.stack([exact["mu"][1], exact["log_tau"][1]]).float() / 3
        guide.scale_raw.copy_(sd.expm1().log())
    narrow = guide.sample_posterior(2000)["tau"].std()
    assert abs(float((narrow / exact["tau"][1]).log())) > 0.5
    out = importance_resample(model, guide, sigma, y, None, num_samples=2000, seed=0)
    ess = out.ess
    assert ess > 300
    for name in ("mu", "tau"):
        mean, sd = exact[name]
        draws = out.samples[name].double()
        assert abs(draws.mean() - mean) < 4 * sd / ess**0.5, name
        assert abs(float((draws.std() / sd).log())) < 0.15, name
    theta = out.samples["theta"].double()
    assert theta.shape == (2000, 40)
    z = (theta.mean(0) - exact["theta"][0]) / (exact["theta"][1] / ess**0.5)
    assert z.abs().max() < 4.5
    assert out.to_inference_data().posterior["theta"].shape == (1, 2000, 40)
    with pytest.raises(ValueError, match=r"subsampled.*weighting the globals needs every member"):
        importance_resample(model, guide, sigma, y, 10, num_samples=10)


def test_a_globals_draw_that_rounds_its_members_draws_gets_no_weight():
    # tau = e^-19 at mu = 5: every theta_i's draws fall on a few float32 values around mu,
    # where the model's density is e^18 per member: a weight of rounding, not of the model
    from pyroflows.member_resample import resample_members

    pyro.set_rng_seed(0)
    sigma, y = data(40)
    guide = AutoFlowGuide(model, num_layers=1, local_plates=["groups"]).setup(sigma, y, None)
    with torch.no_grad():
        guide.loc.copy_(torch.tensor([5.0, -19.0]))
        guide.scale_raw.fill_(-9.0)  # softplus: 1e-4, nearly a point
    with pytest.raises(ValueError, match="rounded its members' draws"):
        resample_members(model, guide, (sigma, y, None), {}, num_samples=20)


def test_infer_on_a_full_data_hierarchy_with_local_plates_resamples_the_globals():
    from pyroflows import infer

    sigma, y = data(40)
    exact = grid_posterior(sigma, y)
    guide = AutoFlowGuide(model, local_plates=["groups"])
    posterior = infer(model, sigma, y, None, guide=guide, num_samples=2000, seed=0, progress=False)
    assert "members integrated out" in posterior.route.label
    ess = posterior.diagnostics["ess"]
    for name in ("mu", "tau"):
        mean, sd = exact[name]
        assert abs(posterior.samples[name].double().mean() - mean) < 4 * sd / ess**0.5, name
    assert posterior.samples["theta"].shape == (2000, 40)


def test_weighing_many_globals_draws_at_once_matches_one_at_a_time():
    # with the exact conditional (the model's prior, members started at their likelihoods)
    # a member's K weights are equal, so each globals draw's bound is deterministic:
    # log p(g, y) - log q(g) on the unconstrained scale, whether weighed alone or in a batch
    from pyroflows.member_bound import MemberImportanceELBO

    pyro.set_rng_seed(0)
    sigma, y = data(40)
    guide = AutoFlowGuide(model, local_plates=["groups"]).setup(sigma, y, None)
    latents = guide.get_posterior().sample((5,)).detach()
    bound = MemberImportanceELBO(num_particles=4)
    many, _, members = bound.weigh_many(model, guide, (sigma, y, None), {}, latents)
    assert members.shape == (5, 4, 40)
    with torch.no_grad():
        one = [bound.weigh(model, guide, (sigma, y, None), {}, g)[0] for g in latents]
    assert torch.allclose(many, torch.stack(one), rtol=1e-4, atol=1e-3)
    exact = exact_bound(guide, latents, sigma, y)
    assert torch.allclose(many.double(), exact, rtol=1e-4, atol=2e-3)


def exact_bound(guide, latents, sigma, y):
    """log p(g, y) - log q(g) on the unconstrained scale at globals draws ``(mu, log tau)``,
    every theta_i integrated out: y_i ~ N(mu, sqrt(tau^2 + sigma_i^2))."""
    mu, log_tau = latents[:, 0].double(), latents[:, 1].double()
    total = (log_tau.exp()[:, None] ** 2 + sigma.double() ** 2).sqrt()
    return (
        dist.Normal(0.0, 5.0).log_prob(mu)
        + dist.HalfNormal(5.0).log_prob(log_tau.exp())
        + log_tau
        + dist.Normal(mu[:, None], total).log_prob(y.double()).sum(-1)
        - guide.get_posterior().log_prob(latents).double()
    )


def test_a_pickled_guide_leaves_the_model_and_data_behind_and_says_what_to_do():
    import pickle

    sigma, y = data(40)
    guide = AutoFlowGuide(model, local_plates=["groups"]).setup(sigma, y, None)
    loaded = pickle.loads(pickle.dumps(guide))
    assert "_model_arguments" not in loaded.__dict__ and "_user_model" not in loaded.__dict__
    with pytest.raises(ValueError, match="pass the model's arguments"):
        loaded.sample_posterior(10)
    with pytest.raises(ValueError, match=r"unpickled guide has none.*state_dict"):
        loaded.sample_posterior(10, sigma, y, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_member_without_data_starts_wide_and_finite(dtype):
    # Neal's funnel as a hierarchy: no likelihood, so each member's Gaussian starts flat
    # (100 wide); its raw scale overflowed float32 (expm1(100) = inf) and the first
    # step's gradient was NaN
    def funnel():
        v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=dtype), 3.0))
        with pyro.plate("i", 5):
            pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=dtype), (v / 2).exp()))

    guide = AutoFlowGuide(funnel, local_plates=["i"]).setup()
    scale = torch.nn.functional.softplus(guide.locals.scale_raw[0].detach())
    assert torch.isfinite(guide.locals.scale_raw[0]).all()
    assert torch.allclose(scale, torch.full_like(scale, 100.0), rtol=1e-3)
    from pyroflows import fit

    result = fit(funnel, guide, num_steps=20, progress=False, diagnose=False, seed=0)
    assert result.num_steps == 20 and all(torch.isfinite(p).all() for p in guide.parameters())


def test_members_indexed_from_a_data_plate_weigh_as_the_exact_marginal():
    # One observation per member, in a data plate in shuffled order: each member's weights
    # are exact (its Gaussian is its likelihood), so each globals draw's bound is
    # log p(g, y) - log q(g), which a member given another's observation would miss
    from pyroflows.member_bound import MemberImportanceELBO

    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(2)
    order = torch.randperm(30, generator=generator)
    sigma = 1.0 + torch.rand(30, generator=generator)
    y = 1.0 + 2.0 * torch.randn(30, generator=generator)

    def shuffled(sigma, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        with pyro.plate("groups", 30):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", 30):
            pyro.sample("y", dist.Normal(theta[..., order], sigma), obs=y)

    guide = AutoFlowGuide(shuffled, local_plates=["groups"]).setup(sigma, y)
    latents = guide.get_posterior().sample((6,)).detach()
    bound = MemberImportanceELBO(num_particles=4).find_owners(shuffled, guide, (sigma, y), {})
    many, _, members = bound.weigh_many(shuffled, guide, (sigma, y), {}, latents)
    assert members.shape == (6, 4, 30)
    exact = exact_bound(guide, latents, sigma, y)  # (theta[order[n]] sees y[n]: the same)
    assert torch.allclose(many.double(), exact, rtol=1e-4, atol=2e-3)
    with pytest.raises(ValueError, match="site 'y' is outside the local plate"):
        MemberImportanceELBO(num_particles=4).weigh_many(shuffled, guide, (sigma, y), {}, latents)


def test_a_globals_draw_where_owned_observations_have_no_density_weighs_zero_not_refused():
    # rats (held-out set): at a tail draw of the globals an observation owned by a member
    # had log-density -inf; masking what no member owns as x * 0 made it NaN, and the whole
    # weighing was refused as "not separable" (a MembersNotSeparable out of infer)
    from pyroflows.member_bound import MemberImportanceELBO

    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(2)
    order = torch.randperm(30, generator=generator)
    y = 1.0 + 2.0 * torch.randn(30, generator=generator)

    def indexed(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        noise = pyro.sample("noise", dist.HalfNormal(5.0))
        with pyro.plate("groups", 30):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", 30):
            pyro.sample("y", dist.Normal(theta[..., order], noise), obs=y)

    guide = AutoFlowGuide(indexed, local_plates=["groups"]).setup(y)
    latents = guide.get_posterior().sample((4,)).detach()
    latents[0, 2] = -60.0  # noise = exp(-60): every observation's log-density is -inf
    bound = MemberImportanceELBO(num_particles=4).find_owners(indexed, guide, (y,), {})
    many, _, _ = bound.weigh_many(indexed, guide, (y,), {}, latents)
    assert many[0] == -math.inf and torch.isfinite(many[1:]).all()
