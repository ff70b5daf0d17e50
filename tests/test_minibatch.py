"""``fit`` on a subsampled model: more draws a step, longer plateau windows, the last two
rates averaged (``pyroflows.minibatch``)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows import AutoFlowGuide, fit
from pyroflows.minibatch import MINIBATCH_PARTICLES, minibatch_window

N = 40


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()


def data(n=N):
    generator = torch.Generator().manual_seed(0)
    sigma = 1.0 + torch.rand(n, generator=generator)
    y = 1.0 + 1.2 * torch.randn(n, generator=generator)
    return sigma, y


def hierarchy(draws: list, broadcasts: bool = True):
    """A hierarchy that records how many global draws each run of it sees; one that does not
    broadcast reshapes the locals to one draw's shape."""

    def model(sigma, y, subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        draws.append(mu.numel())
        with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            if not broadcasts:
                theta = theta.reshape(len(idx))
            pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])

    return model


@pytest.mark.parametrize(
    "subsample_size, num_particles, expected",
    [(10, None, MINIBATCH_PARTICLES), (10, 2, 2), (None, None, 1)],
)
def test_a_subsampled_model_is_fitted_with_more_draws_a_step(
    subsample_size, num_particles, expected
):
    sigma, y = data()
    draws = []
    model = hierarchy(draws)
    guide = AutoFlowGuide(model, local_plates=["groups"])
    fit(model, guide, sigma, y, subsample_size, num_steps=3, num_particles=num_particles,
        progress=False, diagnose=False)  # fmt: skip
    assert draws[-3:] == [expected] * 3  # the model's runs in the last three steps


def test_a_subsampled_model_that_does_not_broadcast_over_draws_is_fitted_with_one_and_told():
    sigma, y = data()
    draws = []
    model = hierarchy(draws, broadcasts=False)
    guide = AutoFlowGuide(model)
    with pytest.warns(UserWarning, match=f"draws one a step instead of {MINIBATCH_PARTICLES}"):
        result = fit(model, guide, sigma, y, 10, num_steps=5, progress=False, diagnose=False)
    assert result.num_steps == 5 and draws[-5:] == [1] * 5
    # where the user asked for them, the error stands
    with warnings.catch_warnings(), pytest.raises(ValueError, match="does not broadcast"):
        fit(model, guide, sigma, y, 10, num_steps=5, num_particles=4, progress=False)


def test_a_subsampled_model_judges_plateaus_on_longer_windows_and_says_so(capsys):
    sigma, y = data()
    model = hierarchy([])
    stop = [lambda state: True]  # one step is enough to see the settings
    fit(model, AutoFlowGuide(model), sigma, y, 10, num_steps=2400, progress="log",
        callbacks=stop, diagnose=False)  # fmt: skip
    said = capsys.readouterr().err
    assert minibatch_window(2400) == 200  # not clamp(2400 // 40, 100, 250) = 100
    assert f"{MINIBATCH_PARTICLES} draws a step, windows of 200 steps" in said
    pyro.clear_param_store()
    full = AutoFlowGuide(model, local_plates=["groups"])
    fit(model, full, sigma, y, None, num_steps=2400, progress="log", callbacks=stop,
        diagnose=False)  # fmt: skip
    assert "draws a step" not in capsys.readouterr().err
