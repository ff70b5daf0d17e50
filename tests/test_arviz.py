"""to_inference_data: ArviZ groups, plate dims, deterministic sites, LOO."""

import warnings

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import AutoFlowGuide, fit, to_inference_data

matplotlib.use("Agg")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    guide = AutoFlowGuide(eight_schools)
    fit(eight_schools, guide, Y, SIGMA, num_steps=1500, seed=0, progress=False, diagnose=False)
    return guide


def test_groups_dims_and_deterministic_sites(fitted):
    idata = to_inference_data(eight_schools, fitted, Y, SIGMA, num_samples=500, seed=0)
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
    }
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw") and post["mu"].shape == (1, 500)
    assert post["eta"].dims == ("chain", "draw", "school")
    assert post["theta"].dims == ("chain", "draw", "school")  # deterministic, plate-named
    theta = post["mu"] + post["tau"] * post["eta"]
    assert np.allclose(post["theta"], theta, atol=1e-5)
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "school")
    assert idata.log_likelihood["obs"].shape == (1, 500, 8)
    assert np.array_equal(idata.observed_data["obs"].values, Y.numpy())
    # pointwise log-likelihood is log N(y_i | theta_i, sigma_i) at each draw
    expected = dist.Normal(torch.as_tensor(post["theta"].values), SIGMA).log_prob(Y)
    assert np.allclose(idata.log_likelihood["obs"].values, expected.numpy(), atol=1e-4)
    assert np.isfinite(idata.sample_stats["log_weight"]).all()
    assert 0 < idata.posterior.attrs["importance_ess"] <= 500


def test_posterior_predictive_is_drawn_not_copied(fitted):
    idata = to_inference_data(eight_schools, fitted, Y, SIGMA, num_samples=300, seed=0)
    pred = idata.posterior_predictive["obs"].values[0]
    assert pred.std(0).min() > 5.0  # at least the observation noise (sigma >= 9)
    assert not np.allclose(pred[0], Y.numpy())


def test_arviz_functions_work_unchanged(fitted):
    idata = to_inference_data(
        eight_schools, fitted, Y, SIGMA, num_samples=1000, seed=0, resample=True
    )
    assert idata.posterior.attrs["inference_method"] == "importance-resampled guide draws"
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and -40 < loo.elpd_loo < -25
    summary = az.summary(idata, kind="stats")
    assert "mu" in summary.index and "theta[0]" in summary.index
    az.plot_posterior(idata, var_names=["mu"])
    az.plot_pair(idata, var_names=["mu", "tau"])


def test_same_seed_same_draws(fitted):
    a = to_inference_data(eight_schools, fitted, Y, SIGMA, num_samples=50, seed=3)
    b = to_inference_data(eight_schools, fitted, Y, SIGMA, num_samples=50, seed=3)
    assert np.array_equal(a.posterior["mu"], b.posterior["mu"])


def test_factor_likelihood_warns_instead_of_an_empty_group():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("lik", dist.Normal(mu, 1.0).log_prob(y).sum(-1))

    guide = AutoFlowGuide(model)
    with pytest.warns(UserWarning, match="pyro.factor"):
        idata = to_inference_data(model, guide, torch.randn(4), num_samples=20)
    assert "log_likelihood" not in idata.groups()
    assert "posterior" in idata.groups()
