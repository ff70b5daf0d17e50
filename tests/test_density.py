"""Flow: a trainable flow distribution (density estimation, sampling, conditioning)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import FitError, Flow


def perturb(flow, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return flow


@pytest.mark.parametrize("name", ["nsf", "realnvp", "maf", "iaf", "nsf_ar", "glow"])
def test_log_prob_is_the_change_of_variables(name):
    """log p(x) = log N(z) - log|det df/dz| at z = f^-1(x), with the Jacobian by autograd."""
    flow = perturb(Flow(3, name, num_layers=2, hidden_dims=[8]).double())
    flow.data_loc.copy_(torch.tensor([1.0, -2.0, 0.5]))
    flow.data_scale.copy_(torch.tensor([2.0, 0.5, 3.0]))
    flow.standardized.fill_(True)
    x = torch.randn(5, 3, dtype=torch.float64) * 2
    transform = flow.transform()
    z = transform.inv(x)
    torch.testing.assert_close(transform(z), x)  # the inverse round-trips
    expected = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(lambda v: flow.transform()(v), zi)
        base = dist.Normal(0.0, 1.0).log_prob(zi).sum()
        expected.append(base - torch.linalg.slogdet(jac).logabsdet)
    torch.testing.assert_close(flow.log_prob(x), torch.stack(expected))


def test_density_integrates_to_one():
    flow = perturb(Flow(1, "nsf", num_layers=3, hidden_dims=[8], count_bins=6), scale=0.5)
    grid = torch.linspace(-30, 30, 60001).unsqueeze(-1)
    with torch.no_grad():
        mass = torch.trapezoid(flow.log_prob(grid).exp(), grid.squeeze(-1))
    assert abs(mass.item() - 1.0) < 1e-3


@pytest.mark.slow  # an accuracy run: two density fits to convergence
def test_fit_recovers_a_gaussian_and_beats_it_on_a_mixture():
    torch.manual_seed(0)
    # Correlated Gaussian on a far-away scale: the exact held-out NLL is its entropy.
    cov = torch.tensor([[4.0, 3.0], [3.0, 9.0]])
    truth = dist.MultivariateNormal(torch.tensor([100.0, -50.0]), cov)
    train, held = truth.sample((2000,)), truth.sample((2000,))
    flow = Flow(2, "nsf", num_layers=2, hidden_dims=[16])
    result = flow.fit(train, num_steps=400, progress=False, validation=held, seed=0)
    exact = -truth.log_prob(held).mean().item()
    assert result.validation_loss == pytest.approx(exact, abs=0.05)
    assert result.final_loss < result.losses[0]
    draws = flow.sample((4000,))
    torch.testing.assert_close(draws.mean(0), truth.mean, atol=0.25, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.8, rtol=0.1)

    # Two well-separated blobs: a Gaussian cannot fit them, the flow must do much better.
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])

    def blobs(n):
        return centres[torch.randint(2, (n,))] + 0.3 * torch.randn(n, 2)

    train, held = blobs(2000), blobs(2000)
    flow = Flow(2, "nsf", num_layers=3, hidden_dims=[32])
    result = flow.fit(train, num_steps=600, progress=False, validation=held, seed=1)
    gaussian = dist.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gaussian_nll = -gaussian.log_prob(held).mean().item()
    mixture = dist.MixtureSameFamily(
        dist.Categorical(torch.ones(2)), dist.Normal(centres, 0.3).to_event(1)
    )
    exact = -mixture.log_prob(held).mean().item()
    assert result.validation_loss < gaussian_nll - 1.0
    assert result.validation_loss < exact + 0.35


def test_conditional_flow_learns_the_conditional_density():
    torch.manual_seed(0)

    def simulate(n):
        c = torch.rand(n, 1) * 4 - 2
        return 2 * c + 0.3 * torch.randn(n, 1) * (0.5 * c).exp(), c

    flow = Flow(1, num_layers=2, hidden_dims=[32], context_dim=1)
    x, c = simulate(3000)
    held_x, held_c = simulate(2000)
    result = flow.fit(x, c, num_steps=600, progress=False, validation=(held_x, held_c), seed=0)
    exact = -dist.Normal(2 * held_c, 0.3 * (0.5 * held_c).exp()).log_prob(held_x).mean().item()
    assert result.validation_loss == pytest.approx(exact, abs=0.08)
    # Samples given a context follow that context's law (tails included: see Flow's doc).
    for value in (-1.5, 0.0, 1.5):
        draws = flow.sample((4000,), context=torch.tensor([value]))
        assert draws.mean().item() == pytest.approx(2 * value, abs=0.1)
        assert draws.std().item() == pytest.approx(0.3 * math.exp(0.5 * value), rel=0.12)


def test_shapes_gradients_and_base_override():
    flow = perturb(Flow(3, "nsf", num_layers=2, hidden_dims=[8], context_dim=2))
    context = torch.randn(4, 2)
    assert flow(context).batch_shape == (4,) and flow(context).event_shape == (3,)
    assert flow.sample((5,), context=context).shape == (5, 4, 3)
    assert flow.log_prob(torch.randn(5, 4, 3), context).shape == (5, 4)
    flow.rsample((2,), context=context).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())

    # At construction the flow is the identity: the result is the base distribution itself.
    fresh = Flow(3, "realnvp", hidden_dims=[8])
    base = dist.Normal(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])).to_event(1)
    x = torch.randn(6, 3)
    torch.testing.assert_close(fresh(base=base).log_prob(x), base.log_prob(x))
    with pytest.raises(ValueError, match=r"event shape \(2,\), expected \(3,\)"):
        fresh(base=dist.Normal(torch.zeros(2), 1.0).to_event(1))


def test_float64_fit_and_state_dict_round_trip():
    torch.manual_seed(0)
    data = torch.randn(300, 2, dtype=torch.float64) * 5 + 1
    flow = Flow(2, "nsf", num_layers=2, hidden_dims=[8]).double()
    flow.fit(data, num_steps=30, progress=False)
    assert flow.log_prob(data).dtype == torch.float64
    copy = Flow(2, "nsf", num_layers=2, hidden_dims=[8]).double()
    copy.load_state_dict(flow.state_dict())
    assert bool(copy.standardized)
    torch.testing.assert_close(copy.log_prob(data), flow.log_prob(data), rtol=0, atol=0)


def test_a_flow_inside_a_pyro_model():
    flow = perturb(Flow(2, "nsf", num_layers=2, hidden_dims=[8]))
    data = torch.randn(10, 2)

    def model():
        pyro.module("density", flow)
        with pyro.plate("rows", 10):
            pyro.sample("x", flow(), obs=data)

    trace = pyro.poutine.trace(model).get_trace()
    torch.testing.assert_close(trace.log_prob_sum(), flow.log_prob(data).sum())
    assert any(name.startswith("density$$$") for name in pyro.get_param_store())
    pyro.clear_param_store()


def test_bad_input_is_named():
    flow = Flow(2, "nsf", hidden_dims=[8])
    with pytest.raises(ValueError, match=r"data must have shape \(\.\.\., 2\), got \(5, 3\)"):
        flow.fit(torch.randn(5, 3), progress=False)
    bad = torch.randn(6, 2)
    bad[4, 1] = math.nan
    with pytest.raises(ValueError, match=r"non-finite values in rows \[\[4\]\]"):
        flow.fit(bad, progress=False)
    with pytest.raises(ValueError, match="context_dim=0"):
        flow.log_prob(torch.randn(3, 2), torch.randn(3, 1))
    conditional = Flow(2, "nsf", hidden_dims=[8], context_dim=3)
    with pytest.raises(ValueError, match="conditional; pass a context of size 3"):
        conditional.sample((2,))
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 3\)"):
        conditional.sample(context=torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"one row per data row \(5\)"):
        conditional.fit(torch.randn(5, 2), torch.randn(4, 3), progress=False)
    with pytest.raises(ValueError, match="'planar' has no analytic inverse"):
        Flow(2, "planar")
    with pytest.raises(ValueError, match="unknown flow 'nfs'"):
        Flow(2, "nfs")


def test_non_finite_loss_raises_fit_error_and_keeps_parameters():
    flow = Flow(2, "nsf", num_layers=1, hidden_dims=[8])
    data = torch.randn(50, 2)
    flow.fit(data, num_steps=5, progress=False)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with torch.no_grad():
        next(flow.transform_module.parameters()).fill_(math.inf)
    poisoned = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(FitError, match="step 1") as error:
        flow.fit(data, num_steps=5, progress=False)
    assert error.value.step == 1
    # No update was applied: the state is exactly what the failing step was given.
    after = flow.state_dict()
    assert all(torch.equal(after[k], poisoned[k]) for k in after)
    assert not all(torch.equal(before[k], poisoned[k]) for k in before)


def test_a_density_fit_prints_a_summary_not_every_loss():
    result = Flow(2, hidden_dims=[8]).fit(torch.randn(50, 2), num_steps=30, progress=False)
    text = repr(result)
    assert text.startswith("DensityFit(30 steps") and "final loss" in text
    assert len(text) < 120 and len(result.losses) == 30
