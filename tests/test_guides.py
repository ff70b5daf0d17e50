"""AutoFlowGuide behaves as a Pyro user expects of an autoguide."""

import io
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoContinuous, AutoGuideList, AutoNormal

import pyroflows.laplace
from pyroflows import AutoFlowGuide, init_to_median
from pyroflows.draws import draw
from pyroflows.laplace import find_mode

SMALL = {"hidden_dims": [16], "num_layers": 2}


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def train(model, guide, *args, steps=20, lr=0.01, loss=None, **kwargs):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss or Trace_ELBO())
    losses = [svi.step(*args, **kwargs) for _ in range(steps)]
    return losses


def every_support_model(y, scale=1.0):
    """Positive, interval, simplex, ordered, positive-ordered, corr-Cholesky, PD, matrix events."""
    sigma = pyro.sample("sigma", dist.HalfNormal(scale))
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    cuts = pyro.sample(
        "cuts",
        dist.TransformedDistribution(
            dist.Normal(0.0, 1.0).expand([3]).to_event(1), dist.transforms.OrderedTransform()
        ),
    )
    rates = pyro.sample(
        "rates", dist.ImproperUniform(constraints.positive_ordered_vector, (), (2,))
    )
    chol = pyro.sample("chol", dist.LKJCholesky(3, 2.0))
    cov = pyro.sample("cov", dist.Wishart(torch.tensor(5.0), torch.eye(2)))
    matrix = pyro.sample("matrix", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
    with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1):
        nested = pyro.sample("nested", dist.Normal(0.0, 1.0))
    pyro.deterministic("total", weights.sum())
    mean = rho + weights[0] + cuts[0] + rates[0] + chol[1, 0] + cov[0, 0] + matrix.sum()
    mean = mean + nested.sum()
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


SUPPORTED = {
    "sigma": constraints.positive,
    "rho": constraints.interval(-1.0, 1.0),
    "weights": constraints.simplex,
    "cuts": constraints.ordered_vector,
    "rates": constraints.positive_ordered_vector,
    "chol": constraints.corr_cholesky,
    "cov": constraints.positive_definite,
}


def test_every_support_event_shape_and_plate():
    y = torch.randn(5)
    guide = AutoFlowGuide(every_support_model, **SMALL)
    losses = train(every_support_model, guide, y, scale=2.0, steps=5)  # args and kwargs
    assert all(torch.isfinite(torch.tensor(losses)))
    draws = guide(y, scale=2.0)
    assert set(draws) == set(SUPPORTED) | {"matrix", "nested"}  # no observed/deterministic
    assert draws["matrix"].shape == (2, 3) and draws["nested"].shape == (2, 3)
    samples = guide.sample_posterior(200)
    for name, support in SUPPORTED.items():
        assert support.check(samples[name]).all(), name


def test_untrained_guide_starts_exactly_where_autonormal_starts():
    def model():
        pyro.sample("a", dist.Normal(1.0, 2.0))
        pyro.sample("b", dist.Gamma(torch.tensor([2.0, 3.0]), 1.0).to_event(1))

    ours = AutoFlowGuide(model, init_scale=0.3, init_loc_fn=init_to_median, init="prior")
    theirs = AutoNormal(model, init_scale=0.3, init_loc_fn=init_to_median)
    pyro.set_rng_seed(3)
    ours()
    pyro.set_rng_seed(3)
    theirs()
    loc = torch.cat([theirs.locs.a.reshape(-1), theirs.locs.b.reshape(-1)])
    scale = torch.cat([theirs.scales.a.reshape(-1), theirs.scales.b.reshape(-1)])
    assert torch.allclose(ours.loc, loc) and torch.allclose(ours.scale, scale)
    # identity flow: q is exactly Normal(loc, scale) in unconstrained space
    z = ours.get_posterior().sample((1000,))
    expected = dist.Normal(loc, scale).to_event(1).log_prob(z)
    assert torch.allclose(ours.get_posterior().log_prob(z), expected, atol=1e-4)


def test_flat_improper_priors_initialise():
    def model(y):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    guide = AutoFlowGuide(model, **SMALL)
    train(model, guide, torch.randn(20) + 3.0, steps=3)
    assert torch.allclose(guide._init_loc(), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_vague_priors_far_median_does_not_start_the_guide_where_draws_have_zero_density(dtype):
    """BUGS-style priors (InverseGamma(0.001, 0.001) on a variance): the prior's median is
    about 1e34 in float32 (1e298 in float64), the members are drawn at that scale, and an
    untrained guide started there drew only zero-density points. The default start is the
    image of zero wherever the model's log joint is higher there (surgical, posteriordb)."""
    n = torch.tensor([47.0, 148, 119, 810, 211, 196], dtype=dtype)
    r = torch.tensor([0.0, 18, 8, 46, 8, 13], dtype=dtype)

    def model(n, r):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=dtype), 1000.0))
        sigmasq = pyro.sample("sigmasq", dist.InverseGamma(1e-3, 1e-3))
        with pyro.plate("hospitals", len(n)):
            b = pyro.sample("b", dist.Normal(mu, sigmasq.sqrt()))
            pyro.sample("r", dist.Binomial(n, logits=b), obs=r)

    with torch.random.fork_rng():
        torch.set_default_dtype(dtype)
        try:
            for init in ("prior", "auto"):
                pyro.set_rng_seed(0)
                guide = AutoFlowGuide(model, init=init, **SMALL).setup(n, r)
                draws = draw(model, guide, (n, r), {}, 100)
                assert torch.isfinite(draws.log_weights).all(), init
                assert float(guide.median(n, r)["sigmasq"]) < 1e3, init

            # a prior whose median is the better start keeps it (a centre far from zero)
            def centred(n, r):
                mu = pyro.sample("mu", dist.Normal(torch.tensor(500.0, dtype=dtype), 1.0))
                pyro.sample("r", dist.Normal(mu, 1.0), obs=r + 500.0)

            guide = AutoFlowGuide(centred, init="prior", **SMALL).setup(n, r)
            assert abs(float(guide.median(n, r)["mu"]) - 500.0) < 2.0
        finally:
            torch.set_default_dtype(torch.float32)


def test_dependent_support_is_refused_naming_the_site():
    def model():
        a = pyro.sample("a", dist.Uniform(0.0, 1.0))
        pyro.sample("b", dist.Uniform(0.0, 1.0 - a))

    with pytest.raises(ValueError, match=r"support of latent site 'b'.*depends on other latent"):
        AutoFlowGuide(model)()


def test_median_and_quantiles_of_a_known_distribution():
    def model():
        pyro.sample("s", dist.LogNormal(0.0, 1.0))

    guide = AutoFlowGuide(model, init_scale=0.5, init="prior")
    guide()
    median = guide.median()["s"]
    assert torch.allclose(median, guide.loc.exp(), rtol=0.03)  # median of a LogNormal
    q = guide.quantiles([0.1, 0.9])["s"]
    exact = (guide.loc + 0.5 * torch.tensor([-1.2816, 1.2816])).exp()
    assert torch.allclose(q.squeeze(-1), exact, rtol=0.05)
    assert torch.equal(guide.median()["s"], median)  # fixed seed: repeatable


def regression_model(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        # (x * w).sum(-1) rather than x @ w: broadcasts over vectorised particles
        return pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def line_model(x, y=None):
    # scalar globals broadcast against the data plate, as vectorised inference needs
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.deterministic("slope_squared", b**2)
    with pyro.plate("data", len(x)):
        return pyro.sample("y", dist.Normal(a + b * x, s), obs=y)


def line_data():
    x = torch.randn(10)
    return x, 1.0 + 2.0 * x + 0.3 * torch.randn(10)


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive(parallel):
    x, y = line_data()
    guide = AutoFlowGuide(line_model, **SMALL)
    train(line_model, guide, x, y, steps=3)
    out = Predictive(line_model, guide=guide, num_samples=11, parallel=parallel)(x)
    assert out["a"].numel() == 11 and out["s"].min() > 0
    assert torch.allclose(out["slope_squared"], out["b"] ** 2)  # deterministic sites too
    assert out["y"].shape == (11, 10)


def test_vectorized_particles():
    x, y = line_data()
    guide = AutoFlowGuide(line_model, **SMALL)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    losses = train(line_model, guide, x, y, loss=elbo, steps=3)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_jit_elbo_trains_the_guide():
    """Pyro's own flow guides fail under JitTrace_ELBO (pyro#3132)."""
    x, y = line_data()
    guide = AutoFlowGuide(line_model, **SMALL)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / 600)})
    svi = SVI(line_model, guide, optim, JitTrace_ELBO())
    losses = [svi.step(x, y) for _ in range(600)]
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert abs(float(guide.median()["b"]) - 2.0) < 0.3  # the data were made with b = 2


def test_enumerated_discrete_sites_are_hidden():
    @config_enumerate
    def mixture(y):
        locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("y", dist.Normal(locs[z], 0.5), obs=y)

    y = torch.cat([torch.randn(10) - 2, torch.randn(10) + 2])
    guide = AutoFlowGuide(mixture, **SMALL)
    losses = train(mixture, guide, y, loss=TraceEnum_ELBO(max_plate_nesting=1), steps=5)
    assert guide.latent_dim == 2 and all(map(torch.isfinite, map(torch.tensor, losses)))


def test_discrete_site_not_enumerated_is_an_error():
    def model():
        pyro.sample("k", dist.Poisson(3.0))

    with pytest.raises(ValueError, match="latent site 'k' is discrete"):
        AutoFlowGuide(model)()


def test_no_latent_sites_is_an_error():
    def model(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent sample sites"):
        AutoFlowGuide(model)(torch.tensor(0.0))


def subsampled_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(y), subsample_size=5) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=y[idx])


def test_subsampled_latents_are_guided_as_locals():  # tests/test_locals.py has the rest
    guide = AutoFlowGuide(subsampled_model)
    assert guide(torch.randn(20))["z"].shape == (5,)
    assert guide.local_sites == ("z",)


def test_autoguidelist_gives_local_latents_their_own_guide():
    y = torch.randn(20) + 1.0
    guide = AutoGuideList(subsampled_model)
    guide.append(AutoFlowGuide(poutine.block(subsampled_model, hide=["z"]), **SMALL))
    guide.append(AutoNormal(poutine.block(subsampled_model, expose=["z"])))
    losses = train(subsampled_model, guide, y, steps=5)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert guide(y)["z"].shape == (5,)


def test_unknown_flow_is_an_error_at_construction():
    with pytest.raises(ValueError, match=r"unknown flow 'splines'.*nsf"):
        AutoFlowGuide(regression_model, flow="splines")


def test_two_guides_never_share_parameters():
    x, y = torch.randn(10, 2), torch.randn(10)
    first = AutoFlowGuide(regression_model, **SMALL)
    second = AutoFlowGuide(regression_model, **SMALL)
    assert first._pyro_name != second._pyro_name
    train(regression_model, first, x, y, steps=3)
    second(x, y)
    before = second.loc.detach().clone()
    train(regression_model, first, x, y, steps=5, lr=0.1)
    assert torch.equal(second.loc.detach(), before)


def test_a_name_collision_in_the_store_is_an_error():
    x, y = torch.randn(10, 2), torch.randn(10)
    first = AutoFlowGuide(regression_model, name="shared", **SMALL)
    first(x, y)
    second = AutoFlowGuide(regression_model, name="shared", **SMALL)
    with pytest.raises(RuntimeError, match="two guides share the name 'shared'"):
        train(regression_model, second, x, y, steps=1)


def draws(guide, *args, seed=7):
    pyro.set_rng_seed(seed)
    return guide(*args)["w"]


def test_state_dict_loads_into_a_fresh_guide_without_a_call():
    x, y = torch.randn(10, 2), torch.randn(10)
    trained = AutoFlowGuide(regression_model, **SMALL)
    train(regression_model, trained, x, y, steps=20, lr=0.05)
    state = trained.state_dict()
    expected = draws(trained, x, y)

    pyro.clear_param_store()
    untrained = AutoFlowGuide(regression_model, **SMALL)
    assert not torch.allclose(draws(untrained, x, y), expected)  # differs before loading

    pyro.clear_param_store()
    fresh = AutoFlowGuide(regression_model, **SMALL)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))  # never called before
    assert torch.equal(draws(fresh, x, y), expected)


def test_whole_guide_pickles():
    x, y = torch.randn(10, 2), torch.randn(10)
    guide = AutoFlowGuide(regression_model, **SMALL)
    train(regression_model, guide, x, y, steps=5)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(draws(loaded, x, y), draws(guide, x, y))


def test_state_dict_from_another_model_is_refused():
    x, y = torch.randn(10, 2), torch.randn(10)
    guide = AutoFlowGuide(regression_model, **SMALL)
    guide(x, y)

    def other(y):
        pyro.sample("v", dist.Normal(0.0, 1.0))

    other_guide = AutoFlowGuide(other, **SMALL)
    other_guide(y)
    with pytest.raises(
        ValueError, match=r"other latent sites: it has w\[2\], this model has v\[\]"
    ):
        other_guide.load_state_dict(guide.state_dict())
    fresh = AutoFlowGuide(other, **SMALL)
    fresh.load_state_dict(guide.state_dict())
    with pytest.raises(ValueError, match="other latent sites"):
        fresh(y)


def test_float64_and_device_moves():
    x, y = torch.randn(10, 2).double(), torch.randn(10).double()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    guide = AutoFlowGuide(model, **SMALL)
    train(model, guide, x, y, steps=3)
    assert guide.loc.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    guide.to("cpu")
    assert guide(x, y)["w"].dtype == torch.float64


def test_studentt_base_has_learnable_tails():
    x, y = torch.randn(10, 2), torch.randn(10)
    guide = AutoFlowGuide(regression_model, base="studentt", **SMALL)
    train(regression_model, guide, x, y, steps=5, lr=0.1)
    assert guide.df_raw.grad is not None
    assert isinstance(guide.get_base_dist().base_dist, dist.StudentT)


@pytest.mark.parametrize("kwargs", [{}, {"base": "studentt"}, {"affine": "diagonal"}])
def test_svi_updates_every_parameter(kwargs):
    x, y = line_data()
    guide = AutoFlowGuide(line_model, **SMALL, **kwargs)
    guide(x, y)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    train(line_model, guide, x, y, steps=3, lr=0.05)
    for name, p in guide.named_parameters():
        if name == "scale_lower":  # only its strictly lower triangle is used
            p, old = p.tril(-1), before[name].tril(-1)
        else:
            old = before[name]
        assert not torch.equal(p.detach(), old), f"SVI never updated {name}"


def test_stl_scores_the_sample_with_stopped_parameters():
    """STL: same log-density, and the gradient differs from the plain one by the score term."""
    x, y = line_data()
    guide = AutoFlowGuide(line_model, stl=True, **SMALL)
    guide(x, y)
    z = guide.get_posterior().rsample((4,))
    assert torch.allclose(guide._stopped_log_prob(z), guide.get_posterior().log_prob(z), atol=1e-4)
    stopped = guide._stopped_log_prob(z.detach())
    assert not stopped.requires_grad  # no path from the parameters
    train(line_model, guide, x, y, steps=3)


def test_stl_needs_an_inverse():
    with pytest.raises(ValueError, match="stl=True needs a flow with an analytic inverse"):
        AutoFlowGuide(line_model, flow="planar", stl=True)(*line_data())


def test_affine_auto_is_full_only_for_coupling_stacks():
    x, y = line_data()
    coupling = AutoFlowGuide(line_model, flow="nsf", **SMALL)
    autoregressive = AutoFlowGuide(line_model, flow="iaf", **SMALL)
    coupling(x, y), autoregressive(x, y)
    assert coupling.full_rank and not autoregressive.full_rank
    forced = AutoFlowGuide(line_model, flow="iaf", affine="full", **SMALL)
    forced(x, y)
    assert forced.full_rank and forced.scale_tril.shape == (3, 3)


def test_auto_init_starts_at_the_laplace_approximation_exact_for_a_gaussian_posterior():
    x = torch.randn(30, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(30)

    def regression(x, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal((x * beta).sum(-1), 0.3), obs=y)

    precision = torch.eye(3) + x.T @ x / 0.09
    cov = torch.linalg.inv(precision)
    mean = cov @ (x.T @ y) / 0.09
    guide = AutoFlowGuide(regression)
    guide(x, y)
    assert guide.preconditioned
    transform = guide._affine_transform()  # identity flow: q is this affine of N(0, I)
    assert torch.allclose(transform.loc, mean, atol=1e-4)
    assert torch.allclose(transform.scale_tril @ transform.scale_tril.T, cov, atol=1e-5)
    # and it survives save/load
    fresh = AutoFlowGuide(regression, name="restored")
    fresh.load_state_dict(guide.state_dict())
    assert fresh.preconditioned and torch.equal(fresh.precond, guide.precond)


def test_auto_init_falls_back_to_the_prior_start_where_there_is_no_mode():
    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        with pyro.plate("i", 4):
            pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    guide = AutoFlowGuide(funnel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failed search stays quiet
        guide()
    assert not guide.preconditioned
    assert torch.equal(guide.precond, torch.eye(5))
    with pytest.raises(ValueError, match="init must be"):
        AutoFlowGuide(funnel, init="map")


def test_laplace_start_falls_back_when_the_line_search_crashes(monkeypatch):
    # A search that raises (torch's strong-Wolfe search raised IndexError where the energy
    # turned NaN) is a failed Laplace start like any other, not a failed guide.
    def crash(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(pyroflows.laplace, "minimise", crash)

    def model():
        pyro.sample("x", dist.Normal(1.0, 2.0))

    guide = AutoFlowGuide(model)
    guide()
    assert not guide.preconditioned
    with pytest.warns(UserWarning, match="no sound Laplace start"):
        AutoFlowGuide(model, init="laplace", name="strict")()


def test_the_start_comparison_keeps_a_close_median_and_leaves_the_flows_weights_alone():
    # A ring: the image of zero is its centre, a stationary point no search leaves, and
    # only ~12 nats denser than the prior's median; the median must stay. Comparing the two
    # starts also drew from the random stream, which changed the flow's initial weights
    # (and U1's answer at seed 0).
    def ring():
        z = pyro.sample("z", dist.Uniform(-4.0 * torch.ones(2), 4.0).to_event(1))
        pyro.factor("ring", -0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2)

    pyro.set_rng_seed(0)
    default = AutoFlowGuide(ring, init="prior", **SMALL).setup()
    pyro.set_rng_seed(0)
    median = AutoFlowGuide(ring, init="prior", init_loc_fn=init_to_median, **SMALL).setup()
    assert torch.equal(default.loc, median.loc) and default.loc.abs().max() > 0
    pairs = zip(default.named_parameters(), median.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


@pytest.mark.parametrize("batch", [(), (7, 1, 1), (2, 3, 1, 1)])  # left of the plates
def test_unpack_latent_yields_what_pyros_does(batch):
    # pyroflows.sites.unpack_latent replaces Pyro's (which calls torch.broadcast_shapes,
    # importing sympy); every site's value, shape and order must be Pyro's
    def model():
        pyro.sample("scalar", dist.Normal(0.0, 1.0))
        pyro.sample("matrix", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
        pyro.sample("simplex", dist.Dirichlet(torch.ones(4)))
        with pyro.plate("rows", 5, dim=-2), pyro.plate("cols", 2, dim=-1):
            pyro.sample("grid", dist.HalfNormal(1.0))

    guide = AutoFlowGuide(model, **SMALL).setup()
    latent = torch.randn(*batch, guide.latent_dim)
    ours = list(guide._unpack_latent(latent))
    pyros = list(AutoContinuous._unpack_latent(guide, latent))
    assert [site["name"] for site, _ in ours] == [site["name"] for site, _ in pyros]
    for (_, a), (_, b) in zip(ours, pyros, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="latent vector"):
        list(guide._unpack_latent(torch.randn(guide.latent_dim + 1)))


def test_a_search_that_ends_at_a_saddle_says_so_in_words():
    # L-BFGS from (0.5, 0) never leaves the line u1 = 0 (the gradient there has no u1 part)
    # and ends at the saddle (0, 0); the message named torch's private _LinAlgError before
    def saddle(u):
        return u[0] ** 2 - u[1] ** 2 + 0.25 * u[1] ** 4

    why = find_mode(saddle, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert isinstance(why, str)
    assert "not positive definite" in why and "_LinAlgError" not in why
