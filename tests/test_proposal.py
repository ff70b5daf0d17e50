"""``pyroflows.proposal``: the guide mixed with its heavy-tailed copy, for importance weights."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyroflows import AutoFlowGuide, importance_resample
from pyroflows.modes import Mode
from pyroflows.proposal import defensive_draws, heavy_tailed


def scale_and_shift():
    s = pyro.sample("s", dist.HalfNormal(2.0))
    pyro.sample("x", dist.Normal(torch.ones(2), s[..., None]).to_event(1))


def trained_like(dtype, flow=("sinh_arcsinh", "iaf")):
    """A guide whose parameters are far from their initial values, as after training."""
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(scale_and_shift, flow=list(flow)).setup()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide.to(dtype)


def explicit_log_q(guide, draws, modes=(), shares=(0.5, 0.5)):
    """The mixture's density at each draw, each part scored by inverting the flow afresh
    (clones: no transform's cache can answer), in the constrained space of the draws."""
    s = draws.values["s"].reshape(-1, 1)
    x = draws.values["x"].reshape(-1, 2)
    u = torch.cat([s.log(), x], -1).clone()  # HalfNormal's bijection is exp
    parts = [
        math.log(shares[0]) + guide.get_posterior().log_prob(u.clone()),
        math.log(shares[1]) + heavy_tailed(guide).log_prob(u.clone()),
    ]
    parts += [math.log(w) + m.log_prob(u) for w, m in zip(shares[2:], modes, strict=True)]
    log_q_u = torch.logsumexp(torch.stack(parts), 0)
    _, log_det = guide.latent_to_sites(u, log_det=True)
    return log_q_u - log_det


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_mixtures_density_is_its_parts_mean_at_every_draw(dtype):
    guide = trained_like(dtype)
    draws = defensive_draws(scale_and_shift, guide, (), {}, 400)
    finite = torch.isfinite(draws.log_joint)
    assert finite.float().mean() > 0.9 and draws.log_q.dtype == dtype
    expected = explicit_log_q(guide, draws)
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    assert torch.allclose(draws.log_q[finite], expected[finite], rtol=tol, atol=tol)


def test_a_mode_component_joins_the_mixture_by_its_mass():
    guide = trained_like(torch.float64)
    mode = Mode(torch.tensor([0.5, 3.0, -3.0]).double(), 0.2 * torch.eye(3).double(), 0.0)
    # equal masses: the flow's (split in two) and the mode's, 1/4, 1/4, 1/2 of the draws
    draws = defensive_draws(scale_and_shift, guide, (), {}, 400, [mode], log_evidence=0.0)
    finite = torch.isfinite(draws.log_joint)
    near = (draws.values["x"] - torch.tensor([3.0, -3.0])).norm(dim=-1) < 1.0
    assert 180 <= int(near.sum()) <= 220  # the mode's 200 draws (and few of the flow's)
    expected = explicit_log_q(guide, draws, [mode], shares=(0.25, 0.25, 0.5))
    assert torch.allclose(draws.log_q[finite], expected[finite], rtol=1e-8, atol=1e-8)


def student_t():
    pyro.sample("x", dist.StudentT(2.0, 0.0, 1.0))


def test_a_guide_too_narrow_for_a_heavy_tail_is_corrected_by_the_defensive_half():
    # t with 2 degrees of freedom: P(|x| > 4.303) = 0.05 exactly. A guide a quarter as wide
    # hardly draws there; the heavy-tailed half does, and its weights give the tail its mass.
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(student_t, init_scale=0.25, init="prior").setup()
    plain = importance_resample(student_t, guide, num_samples=8000, seed=0, adapt=False, warn=False)
    out = importance_resample(
        student_t, guide, num_samples=8000, seed=0, adapt=False, warn=False, defensive=True
    )
    tail = float((out.samples["x"].abs() > 4.303).double().mean())
    assert float((plain.samples["x"].abs() > 4.303).double().mean()) < 0.01
    assert out.diagnostic.k_hat < 0.7
    assert abs(tail - 0.05) < 4 * math.sqrt(0.05 * 0.95 / out.diagnostic.ess), tail


def test_defensive_weighing_needs_a_flow_guide_and_says_so():
    with pytest.raises(TypeError, match="defensive=True needs an AutoFlowGuide, not AutoNormal"):
        importance_resample(student_t, AutoNormal(student_t), num_samples=10, defensive=True)


def test_defensive_weighing_of_a_model_that_does_not_broadcast_says_how_to_fix_it():
    def not_broadcasting():
        s = pyro.sample("s", dist.HalfNormal(2.0))
        pyro.sample("x", dist.Normal(torch.ones(2), s).to_event(1))  # s needs [..., None]

    guide = AutoFlowGuide(not_broadcasting)
    with pytest.raises(ValueError, match=r"does not run vectorised(.|\n)*broadcast"):
        importance_resample(not_broadcasting, guide, num_samples=10, defensive=True)
