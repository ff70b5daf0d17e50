"""Which plates make a hierarchy for infer's `locals` stage, and that stage on a funnel whose
marginals are known."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import AutoFlowGuide, fit, importance_resample, infer
from pyroflows.hierarchy import hierarchy_plates


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()


def centred(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("J", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def indexed(y):  # the observations in another plate, indexing the members
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", 3):
        a = pyro.sample("a", dist.Normal(0.0, tau))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a[..., torch.arange(len(y)) % 3], 1.0), obs=y)


def gamma_members(y):
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("J", len(y)):
        rate = pyro.sample("rate", dist.Gamma(2.0, tau))
        pyro.sample("y", dist.Poisson(rate), obs=y)


def no_globals(y):
    with pyro.plate("J", len(y)):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("i", 4):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def trace_of(model, *args):
    return pyro.poutine.trace(model).get_trace(*args)


@pytest.mark.parametrize(
    "model, expected, why",
    [
        (centred, ("J",), ""),
        (indexed, (), "observed site 'y' lies outside it"),
        (gamma_members, (), "the prior of 'rate' is not Gaussian"),
        (no_globals, (), "no latent site outside it"),
    ],
)
def test_a_hierarchy_is_a_plate_with_gaussian_priors_its_own_data_and_globals(
    model, expected, why
):
    plates, reason = hierarchy_plates(trace_of(model, torch.tensor([1.0, 2.0, 0.0, 3.0])))
    assert plates == expected
    assert why in reason


def test_infer_answers_a_funnel_in_a_plate_at_the_locals_stage_within_mcse():
    # The flow carries v alone; each x_i is drawn from the model's prior given v: the
    # funnel's neck is the model's, exactly. v ~ N(0, 3); log|x_i| has mean -0.635
    # (E log|z| + E v / 2) and sd 1.867 (sqrt(pi^2 / 8 + 9 / 4)).
    posterior = infer(funnel, num_samples=4000, seed=0, progress=False)
    stages = [s.name for s in posterior.route.stages]
    assert stages == ["laplace", "locals"] and posterior.route.stages[-1].accepted
    assert "(locals)" in posterior.label and "members integrated out" in posterior.label
    ess = posterior.diagnostics["ess"]
    assert ess >= 400
    v = posterior.samples["v"]
    assert abs(float(v.mean())) < 3 * 3.0 / math.sqrt(ess)
    assert abs(float(v.std()) - 3.0) < 3 * 3.0 / math.sqrt(2 * ess)
    log_abs_x = posterior.samples["x"].abs().log()
    assert posterior.samples["x"].shape == (4000, 4)
    assert abs(float(log_abs_x.mean()) + 0.635) < 3 * 1.867 / math.sqrt(ess)


def test_a_given_guide_or_a_non_hierarchy_skips_the_locals_stage_and_says_why():
    y = torch.tensor([1.0, 2.0, 0.0])
    for guide, why in (
        (AutoFlowGuide(indexed), "skipped: a guide was given"),
        (None, "skipped: plate 'groups': observed site 'y' lies outside it"),
    ):
        with pytest.warns(UserWarning, match="approximate"):  # nothing else may run
            posterior = infer(indexed, y, guide=guide, stages=("locals",), progress=False)
        assert posterior.route.stages[0].name == "locals"
        assert posterior.route.stages[0].outcome.startswith(why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_resampling_weighs_zero_a_tail_draw_the_model_cannot_take(dtype):
    # Half the globals draws come from a heavy-tailed copy of the guide; on the funnel some
    # reach v < -180, where exp(v / 2) underflows to a scale of 0 and the model's Normal
    # refused it (validation), stopping the whole resampling with a ValueError
    def funnel_of(dtype=dtype):
        v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=dtype), 3.0))
        with pyro.plate("i", 4):
            pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=dtype), torch.exp(v / 2)))

    guide = AutoFlowGuide(funnel_of, local_plates=["i"])
    fit(funnel_of, guide, num_steps=200, progress=False, diagnose=False, seed=0)
    out = importance_resample(funnel_of, guide, num_samples=8000, seed=0, warn=False)
    assert torch.isfinite(out.samples["v"]).all() and torch.isfinite(out.samples["x"]).all()
    assert abs(float(out.samples["v"].mean())) < 0.5 and out.diagnostic.ess > 2000
