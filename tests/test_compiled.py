"""``fit``'s compiled step: the same gradients as Pyro's general path, taken only where exact."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints

from pyroflows import AutoFlowGuide, FitError, fit
from pyroflows.compiled import CHECK_EVERY, base_draws, compile_step
from pyroflows.objectives import FlowELBO, ImportanceWeightedELBO
from pyroflows.scoring import scoring

QUIET = {"progress": False, "diagnose": False}


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# ------------------------------------------------------------ five structurally different models
def nested_plates(y):  # y: (4 observations, 3 groups); positive supports
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    with pyro.plate("groups", y.shape[-1], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("obs", y.shape[-2], dim=-2):
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def simplex_and_lkj(x):  # a simplex and an LKJ Cholesky factor
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    chol = pyro.sample("chol", dist.LKJCholesky(3, 2.0))
    scale = pyro.sample("scale", dist.HalfNormal(torch.ones(3)).to_event(1))
    with pyro.plate("n", len(x)):
        pyro.sample("x", dist.MultivariateNormal(w, scale_tril=scale[..., None] * chol), obs=x)


def masked(y, mask):  # obs_mask (a latent for each missing value) and poutine.mask
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y, obs_mask=mask)
        with poutine.mask(mask=mask):
            pyro.sample("z", dist.Normal(mu, 1.0), obs=y)


def scaled_with_factor(y):  # poutine.scale and pyro.factor
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with poutine.scale(scale=2.5), pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    pyro.factor("tilt", -0.5 * mu**2)


def with_params(y):  # the model's own pyro.param sites, one constrained
    sigma = pyro.param("sigma", torch.tensor(1.5), constraint=constraints.positive)
    loc = pyro.param("loc", torch.tensor(0.3))
    mu = pyro.sample("mu", dist.Normal(loc, 2.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


class Regression(PyroModule):  # a PyroModule with nn.Parameters
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](2, 1)

    def forward(self, x, y):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(self.linear(x).squeeze(-1), sigma), obs=y)


def cases():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, generator=g)
    x = torch.randn(10, 3, generator=g) * 0.5 + 0.3
    y5 = torch.randn(5, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    xr = torch.randn(6, 2, generator=g)
    return {
        "nested_plates": (nested_plates, (y,)),
        "simplex_and_lkj": (simplex_and_lkj, (x,)),
        "masked": (masked, (y5, mask)),
        "scaled_with_factor": (scaled_with_factor, (y5,)),
        "with_params": (with_params, (y5,)),
        "pyro_module": (None, (xr, xr.sum(-1))),
    }


def objectives(loss):
    """(general-path objective, compiled objective, particles)."""
    if loss in ("elbo", "stl"):
        return Trace_ELBO(), FlowELBO(), 0
    k = 4
    return ImportanceWeightedELBO(k, dreg=loss == "dreg"), ImportanceWeightedELBO(
        k, dreg=loss == "dreg"
    ), k


def perturbed_guide(model, args, loss):
    flow = "realnvp" if loss in ("stl", "dreg") else "iaf"  # stl/dreg: a one-pass inverse
    guide = AutoFlowGuide(model, flow=flow, init="prior").setup(*args)
    with torch.no_grad():  # trained-like parameters, not the identity flow
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide


# Every model under the ELBO, every objective on the model with its own parameters: in the
# default suite; the other 15 pairs (3-5 s each) run under the slow marker (CI runs both).
FAST_PAIRS = {(name, "elbo") for name in cases()}
FAST_PAIRS |= {("with_params", loss) for loss in ("stl", "iwae", "dreg")}
PAIRS = [
    pytest.param(name, loss, marks=() if (name, loss) in FAST_PAIRS else pytest.mark.slow)
    for name in cases()
    for loss in ("elbo", "stl", "iwae", "dreg")
]


@pytest.mark.parametrize(("name", "loss"), PAIRS)
def test_gradients_equal_the_general_paths_at_given_draws(name, loss, float64):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    model, args = cases()[name]
    model = Regression() if model is None else model
    model(*args)  # the model's own parameters exist before the guide does
    guide = perturbed_guide(model, args, loss)
    general, compiled_objective, particles = objectives(loss)
    with scoring(guide, stopped=loss == "stl"):
        step, reason = compile_step(compiled_objective, model, guide, args, {}, particles)
        assert reason == ""
        with torch.no_grad():  # model parameters away from their start too
            for p in step.params:
                p.add_(0.1 * torch.randn_like(p))
        draws = step.draws()
        with poutine.trace(param_only=True) as capture, base_draws(guide, draws):
            general_loss = general.loss_and_grads(model, guide, *args)
        tensors = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        assert tensors == set(step.params)  # the same parameters train on both paths
        want = {p: p.grad.clone() for p in step.params}
        for p in step.params:
            p.grad = None
        loss_value, params = step.loss_and_grads(draws)
    assert float(loss_value) == pytest.approx(general_loss, rel=1e-10)
    for p, name_ in params.items():
        got, expected = p.grad, want[p]
        bound = 1e-10 * expected.abs().clamp(min=1.0)
        assert ((got - expected).abs() <= bound).all(), name_
    assert any(bool((g != 0).any()) for g in want.values())


# ---------------------------------------------------------------- where it is not exact
def stochastic_branch(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    likelihood = dist.Normal(mu, 1.0) if torch.rand(()) < 0.5 else dist.StudentT(3.0, mu, 1.0)
    with pyro.plate("n", len(y)):
        pyro.sample("y", likelihood, obs=y)


def value_branch(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    likelihood = dist.Normal(mu, 1.0) if mu > 0 else dist.StudentT(3.0, mu, 1.0)
    with pyro.plate("n", len(y)):
        pyro.sample("y", likelihood, obs=y)


def subsampled(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=5) as index:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[index])


def enumerated_site(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu + c, 1.0), obs=y)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (stochastic_branch, "structure changes from run to run"),
        (value_branch, "structure changes from run to run"),
        (subsampled, "subsampled (5 of 20)"),
        (enumerated_site, "site 'c' is enumerated"),
    ],
)
def test_falls_back_to_the_general_path_saying_why(model, why, capsys):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    y = torch.randn(20)
    guide = AutoFlowGuide(model, init="prior", init_scale=1.0).setup(y)
    step, reason = compile_step(FlowELBO(), model, guide, (y,), {})
    assert step is None and why in reason
    if model is enumerated_site:
        return  # Trace_ELBO cannot fit it; TraceEnum_ELBO is an ELBO instance (general path)
    result = fit(model, guide, y, num_steps=5, seed=0, progress="log", diagnose=False)
    assert result.path.startswith("general (") and why in result.path
    notes = [line for line in capsys.readouterr().err.splitlines() if "general path" in line]
    assert len(notes) == 1 and why in notes[0]


def test_fast_false_and_a_given_elbo_take_the_general_path():
    y = torch.randn(5)
    guide = AutoFlowGuide(scaled_with_factor, init="prior")
    result = fit(scaled_with_factor, guide, y, num_steps=3, fast=False, **QUIET)
    assert result.path == "general (fast=False)"
    result = fit(scaled_with_factor, guide, y, num_steps=3, loss=Trace_ELBO(), **QUIET)
    assert result.path.startswith("general (the loss Trace_ELBO")


def test_a_branch_on_values_seen_later_is_caught_while_running():
    drift = {"on": False}

    def drifting(y):  # the same structure in every run; other arithmetic once drifted
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        shift = 1.0 if drift["on"] else 0.0
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    def drift_at_step_50(state):
        drift["on"] = state.step >= 50

    y = torch.randn(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(drifting, AutoFlowGuide(drifting), y, num_steps=CHECK_EVERY + 10,
                     callbacks=[drift_at_step_50], **QUIET)
    assert result.path.startswith(f"general from step {CHECK_EVERY}: "), result.path
    assert sum("continues on Pyro's general path" in str(w.message) for w in caught) == 1
    assert result.num_steps == CHECK_EVERY + 10 and all(map(math.isfinite, result.losses))


# ------------------------------------------------------------------- the same fit, faster
def conjugate(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_compiled_and_general_fits_are_the_same_fit(float64):
    y = torch.tensor([1.2, 0.4, 2.1, 1.7, 0.9])
    runs = {}
    for fast in (True, False):
        pyro.clear_param_store()
        guide = AutoFlowGuide(conjugate, init="prior")
        optim = pyro.optim.ClippedAdam({"lr": 0.02})
        runs[fast] = fit(conjugate, guide, y, num_steps=300, seed=0, optim=optim, fast=fast,
                         **QUIET)
    assert runs[True].path == "compiled" and runs[False].path == "general (fast=False)"
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-9)
    precision = 1 / 4 + len(y)
    mean, sd = float(y.sum() / precision), 1 / math.sqrt(precision)
    draws = runs[True].guide.sample_posterior(4000)["mu"]
    assert abs(float(draws.mean()) - mean) < 3 * sd / math.sqrt(4000) + 0.05 * sd
    assert abs(float(draws.std()) / sd - 1) < 0.1


def test_a_non_finite_step_fails_alike_on_both_paths(float64):
    def model(y):
        loc = pyro.param("loc", torch.tensor(0.0))
        x = pyro.sample("x", dist.Normal(loc, 1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    def poison_at_step_5(state):  # the model's parameter becomes NaN after step 5
        if state.step == 5:
            with torch.no_grad():
                pyro.param("loc").unconstrained().fill_(math.nan)

    y = torch.randn(3)
    errors, paths = {}, {}
    for fast in (True, False):
        pyro.clear_param_store()
        guide = AutoFlowGuide(model, init="prior", name="poisoned")
        step, _ = compile_step(FlowELBO(), model, guide.setup(y), (y,), {})
        paths[fast] = step is not None
        with pytest.raises(FitError) as error:
            fit(model, guide, y, num_steps=50, seed=0, fast=fast, callbacks=[poison_at_step_5],
                **QUIET)
        errors[fast] = error.value
        assert all(bool(torch.isfinite(p).all()) for p in guide.parameters())
    assert paths[True]  # the compiled step was taken
    assert errors[True].step == errors[False].step == 6
    assert errors[True].site == errors[False].site == "x"


def test_new_arguments_are_traced_anew():
    # The graph holds the data it was traced with: a second fit on other data must not
    # keep stepping on the first data.
    pyro.clear_param_store()
    guide = AutoFlowGuide(conjugate, init="prior")
    first = fit(conjugate, guide, torch.full((5,), -3.0), num_steps=400, seed=0, **QUIET)
    second = fit(conjugate, guide, torch.full((5,), 3.0), num_steps=800, seed=0, **QUIET)
    assert first.path == second.path == "compiled"
    exact = 15.0 / (1 / 4 + 5)  # the posterior mean for the second data
    assert abs(float(guide.median()["mu"]) - exact) < 0.2


def test_calls_through_fast_bindings_compute_exactly_what_the_aten_calls_did():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyroflows.graph_calls import call_through_bindings

    def f(x, w):
        h = torch.addmm(x[0], x, w).t().mm(w) ** 2 - w.sum() / (1.0 + x.exp())
        scaled = torch.ops.aten.add.Scalar(h, 1.0, 3)  # alpha given positionally: kept as is
        return (scaled.abs().sqrt().log() * -x).expand(2, 4, 4).select(0, 1).sum([0]).view(2, 2)

    x, w = torch.randn(4, 4), torch.randn(4, 4)
    traced = make_fx(f)(x, w)
    fast = make_fx(f)(x, w)
    assert call_through_bindings(fast) >= 10
    assert any(n.target is torch.ops.aten.add.Scalar for n in fast.graph.nodes)
    for _ in range(3):
        x, w = torch.randn(4, 4), torch.randn(4, 4)
        assert torch.equal(fast(x, w), traced(x, w))
        torch.testing.assert_close(fast(x, w), f(x, w))


def test_simplified_graphs_compute_what_the_traced_ones_did_and_keep_their_random_draws():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyroflows.graph_calls import simplify

    scale = torch.tensor([2.0, 3.0])

    def f(x):
        noise = torch.randn(2)  # upstream of nothing variable: must stay random, not folded
        constant = (scale.log() * 2.0).exp().view(2)  # constants only: folded once
        return (x.detach().view(2).expand(2) * constant + noise, noise)

    traced = make_fx(f)(torch.ones(2))
    lean = make_fx(f)(torch.ones(2))
    assert simplify(lean) >= 5
    assert not any(n.target is torch.ops.aten.detach.default for n in lean.graph.nodes)
    x = torch.randn(2)
    with torch.no_grad():
        torch.manual_seed(1)
        want, _ = traced(x)
        torch.manual_seed(1)
        got, got_noise = lean(x)
        assert torch.equal(got, want)
        _, other_noise = lean(x)
    assert not torch.equal(other_noise, got_noise)


def test_a_graph_that_mutates_a_tensor_keeps_its_constants_unfolded():
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyroflows.graph_calls import simplify

    def f(x):
        buffer = torch.zeros(3)
        buffer.add_(x)  # a folded zeros would accumulate across calls
        return buffer * 2.0

    lean = make_fx(f)(torch.ones(3))
    simplify(lean)
    for _ in range(2):
        assert torch.equal(lean(torch.ones(3)), torch.full((3,), 2.0))
