"""Trust diagnostics: PSIS k-hat, importance resampling, log evidence, NeuTra."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal

from pyroflows import (
    AutoFlowGuide,
    fit,
    importance_resample,
    khat_threshold,
    log_evidence,
    neutra,
    psis,
    psis_diagnostic,
    to_inference_data,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

QUIET = {"progress": False, "diagnose": False}
COV = torch.tensor([[1.0, 0.95], [0.95, 1.0]])


def correlated():
    pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), COV))


@pytest.fixture(scope="module")
def mean_field():
    pyro.clear_param_store()
    guide = AutoNormal(correlated)
    fit(correlated, guide, num_steps=1500, seed=0, **QUIET)
    return guide


@pytest.fixture(scope="module")
def flow_guide():
    pyro.clear_param_store()
    guide = AutoFlowGuide(correlated)
    fit(correlated, guide, num_steps=4000, seed=0, **QUIET)
    return guide


def test_psis_matches_arviz():
    log_w = torch.distributions.StudentT(2.5).sample((3000,)).abs().log() * 1.5
    ours, k = psis(log_w)
    theirs, k_az = az.psislw(log_w.numpy().astype(np.float64))
    assert k == pytest.approx(float(k_az), abs=1e-6)
    assert np.allclose(ours.numpy(), theirs, atol=1e-6)


def test_exact_proposal_in_float32_is_trusted():
    # The Laplace start of a conjugate normal model is its exact posterior: in float32,
    # log p - log q is constant up to rounding (a few distinct values 5e-7 apart). The
    # weights are bounded, not heavy-tailed: k-hat must not report a degenerate fit as inf.
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([0.9, 1.4, 0.4, 1.3])
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model).setup(y)
    assert guide.preconditioned
    result = psis_diagnostic(model, guide, y, num_samples=4000)
    assert result.ok and result.ess > 3990


def test_khat_threshold_follows_sample_size():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(10**5) == 0.7


def test_khat_flags_mean_field_on_a_correlated_gaussian(mean_field):
    result = psis_diagnostic(correlated, mean_field, num_samples=4000)
    assert not result.ok and result.k_hat > 0.7
    assert "cannot be trusted" in result.summary()


def test_khat_passes_a_fitted_flow_on_the_same_target(flow_guide):
    result = psis_diagnostic(correlated, flow_guide, num_samples=4000)
    assert result.ok, result.summary()
    assert result.ess > 2000
    assert result.elbo == pytest.approx(0.0, abs=0.03)  # log Z = 0: the flow is nearly exact


def test_elbo_estimate_matches_the_exact_mean_field_gap(mean_field):
    # The best product of normals has variances 1/Lambda_ii (Lambda = COV^-1), and
    # KL(q || p) = (sum log Lambda_ii + log det COV) / 2; log Z = 0, so ELBO = -KL.
    precision = torch.linalg.inv(COV).diagonal()
    kl = 0.5 * (precision.log().sum() + torch.logdet(COV)).item()
    result = psis_diagnostic(correlated, mean_field, num_samples=8000)
    assert result.elbo == pytest.approx(-kl, abs=0.05)


def test_importance_resampling_recovers_the_correlation(mean_field):
    draws = mean_field.quantiles([0.5])  # set up; the raw guide has no correlation
    assert draws["z"].shape == (1, 2)
    out = importance_resample(correlated, mean_field, num_samples=4000, seed=0)
    z = out.samples["z"]
    assert z.shape == (4000, 2)
    assert abs(float(torch.corrcoef(z.T)[0, 1]) - 0.95) < 0.05
    assert out.num_adaptations >= 1 and out.diagnostic.ok
    assert 0 < out.ess <= 4000
    idata = out.to_inference_data()
    assert idata.posterior["z"].shape == (1, 4000, 2)


def test_importance_resampling_without_adaptation_keeps_raw_weights(mean_field):
    out = importance_resample(correlated, mean_field, num_samples=2000, adapt=False, seed=0)
    assert out.num_adaptations == 0 and not out.diagnostic.ok


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        # Written to broadcast over a leading draw dimension: diagnostics then vectorise.
        pyro.sample("y", dist.Normal((x * beta).sum(-1), 0.5), obs=y)


@pytest.mark.slow  # an accuracy run: a fit to convergence and 10,000 draws
def test_log_evidence_matches_the_exact_marginal_likelihood():
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=generator)
    y = x @ torch.tensor([1.0, -0.5, 0.2]) + 0.5 * torch.randn(20, generator=generator)
    exact = dist.MultivariateNormal(torch.zeros(20), x @ x.T + 0.25 * torch.eye(20)).log_prob(y)
    guide = AutoFlowGuide(regression)
    fit(regression, guide, x, y, num_steps=2000, seed=0, **QUIET)
    est = log_evidence(regression, guide, x, y, num_samples=10000)
    assert est.mcse < 0.05
    assert abs(est.log_evidence - float(exact)) < 3 * est.mcse, (est, float(exact))
    assert est.diagnostic.ok


def test_log_evidence_refuses_flat_priors():
    def flat(y):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AutoFlowGuide(flat)
    with pytest.raises(ValueError, match="'mu' has an improper"):
        log_evidence(flat, guide, torch.tensor(0.5), num_samples=100)


def test_log_evidence_warns_when_khat_is_high(mean_field):
    with pytest.warns(UserWarning, match="not reliable"):
        log_evidence(correlated, mean_field, num_samples=2000)


def test_diagnostics_fall_back_to_sequential_draws_for_a_model_that_does_not_broadcast():
    def scalar_model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        mean = torch.tensor(float(a) + float(b))  # float(): one draw at a time only
        pyro.sample("y", dist.Normal(mean, 1.0), obs=torch.tensor(1.0))

    guide = AutoFlowGuide(scalar_model)
    guide()
    with pytest.warns(UserWarning, match="sequentially"):
        result = psis_diagnostic(scalar_model, guide, num_samples=50)
    assert result.num_samples == 50 and math.isfinite(result.k_hat)


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@pytest.mark.slow  # NUTS, 500 + 500 steps
def test_neutra_on_centred_eight_schools_matches_the_reference():
    reference = json.loads(
        (Path(__file__).parent / "data" / "eight_schools_centered_reference.json").read_text()
    )["parameters"]["tau"]
    pyro.clear_param_store()
    guide = AutoFlowGuide(eight_schools)
    fit(eight_schools, guide, SCHOOLS_Y, SCHOOLS_SIGMA, num_steps=1500, seed=0, **QUIET)
    idata = neutra(
        eight_schools, guide, SCHOOLS_Y, SCHOOLS_SIGMA, num_samples=600, warmup_steps=300, seed=1
    )
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert idata.posterior["tau"].shape == (1, 600)
    tau_mean = float(idata.posterior["tau"].mean())
    mcse = float(az.mcse(idata, var_names=["tau"])["tau"])
    assert abs(tau_mean - reference["mean"]) < 3 * mcse, (tau_mean, mcse)
    assert "diverging" in idata.sample_stats


def test_observed_data_broadcast_up_to_the_batch_shape_is_drawn():
    # A likelihood with batch shape (1, N) observing y of shape (N,) (the groups' dim kept
    # left of the data plate, so that draws broadcast) crashed draw() with an IndexError: the
    # plates were looked up in the value's shape at the batch shape's indices.
    def model(x, group, y):
        with pyro.plate("groups", 3, dim=-2), pyro.plate("predictors", 2, dim=-1):
            beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
        logits = (x * beta[..., group, :]).sum(-1).unsqueeze(-2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    x, group = torch.randn(12, 2), torch.arange(12) % 3
    y = torch.bernoulli(torch.full((12,), 0.5))
    guide = AutoFlowGuide(model, init="prior").setup(x, group, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vectorised: no fallback to one draw at a time
        result = psis_diagnostic(model, guide, x, group, y, num_samples=50)
        idata = to_inference_data(model, guide, x, group, y, num_samples=20)
    assert math.isfinite(result.k_hat)
    assert idata.log_likelihood["y"].sizes["data"] == 12
    assert idata.posterior["beta"].shape == (1, 20, 3, 2)


def test_a_model_that_broadcasts_wrongly_over_draws_is_run_draw_by_draw():
    # mu[..., None, :] adds a dimension once mu is batched: the run over a plate of draws
    # raised nothing and summed the densities over the wrong cells (log joint about twice
    # the model's own), silently wrong weights; now caught at the first draw
    from pyroflows.draws import draw, runs_vectorised

    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))

    def vector_member(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 5.0).to_event(1))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("J", 6):
            loc, scale = mu[..., None, :], tau[..., None, None]
            theta = pyro.sample("theta", dist.Normal(loc, scale).to_event(1))
            pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)

    guide = AutoFlowGuide(vector_member).setup(y)
    assert not runs_vectorised(vector_member, guide, (y,), {}, num=8)
    with pytest.warns(UserWarning, match="wrong shape"):
        draws = draw(vector_member, guide, (y,), {}, 4)
    for i in range(4):
        latent = {n: draws.values[n][i] for n in ("mu", "tau", "theta")}
        conditioned = pyro.poutine.condition(vector_member, data=latent)
        one = pyro.poutine.trace(conditioned).get_trace(y).log_prob_sum()
        assert torch.isclose(draws.log_joint[i], one, rtol=1e-4, atol=1e-3)


def test_moment_matching_skips_a_map_that_moves_every_draw_to_zero_density():
    # rats (held-out set): a moment-matching map moved every proposal where the model's
    # density is zero, and PSIS on those weights raised instead of the map being refused.
    # Here the model refuses every point after the proposals' own evaluation.
    from pyroflows import importance_resample

    calls = []

    def fussy():
        x = pyro.sample("x", dist.Normal(0.0, 3.0))
        calls.append(x.numel() >= 2000)  # a run over all proposals at once
        pyro.factor("after", torch.zeros_like(x) - (math.inf if sum(calls) > 1 else 0.0))

    guide = AutoFlowGuide(fussy, init_scale=0.5, init="prior")
    out = importance_resample(fussy, guide, num_samples=2000, seed=0, warn=False)
    assert sum(calls) > 1 and out.num_adaptations == 0 and out.samples["x"].shape == (2000,)
