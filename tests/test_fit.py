"""pyroflows.fit: the training loop's options, its schedule and its NaN guard."""

import math
import warnings

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from pyroflows import AutoFlowGuide, FitError, fit

matplotlib.use("Agg")
QUIET = {"progress": False, "diagnose": False}


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def normal_mean(y, prior_scale=10.0):
    mu = pyro.sample("mu", dist.Normal(0.0, prior_scale))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_fit_converges_to_the_exact_posterior_and_stops_early():
    y = torch.randn(30) + 0.5
    guide = AutoFlowGuide(normal_mean, hidden_dims=[8])
    result = fit(normal_mean, guide, y, 1.0, num_steps=5000, window=100, seed=0, **QUIET)
    assert result.converged and result.num_steps < 5000
    assert len(result.losses) == result.num_steps and result.wall_time > 0
    post_var = 1.0 / (1.0 + 30.0)
    post_mean = post_var * y.sum()
    draws = guide.sample_posterior(4000)["mu"]
    assert abs(draws.mean() - post_mean) < 0.1 * math.sqrt(post_var)
    assert abs(draws.std() / math.sqrt(post_var) - 1.0) < 0.1
    assert "converged" in result.summary()


def test_the_schedule_warms_up_and_divides_the_rate_at_each_plateau():
    y = torch.randn(10)
    result = fit(
        normal_mean,
        AutoNormal(normal_mean),
        y,
        num_steps=3000,
        lr=0.02,
        warmup=50,
        window=100,
        patience=1,
        num_decays=2,
        **QUIET,
    )
    lrs = result.lr_history
    assert lrs[0] == pytest.approx(0.02 / 50) and lrs[49] == pytest.approx(0.02)
    levels = sorted({round(v, 10) for v in lrs[50:]}, reverse=True)
    assert levels == pytest.approx([0.02, 0.02 / 3, 0.02 / 9])
    assert result.converged


def test_exponential_schedule_ends_at_a_tenth():
    result = fit(
        normal_mean,
        AutoNormal(normal_mean),
        torch.randn(5),
        num_steps=200,
        schedule="exponential",
        warmup=0,
        stop_early=False,
        **QUIET,
    )
    assert result.num_steps == 200
    assert result.lr_history[0] == pytest.approx(1e-2)
    assert result.lr_history[-1] == pytest.approx(1e-3)


def test_same_seed_same_run():
    y = torch.randn(10)
    runs = []
    for _ in range(2):
        pyro.clear_param_store()
        runs.append(
            fit(normal_mean, AutoFlowGuide(normal_mean), y, num_steps=30, seed=3, **QUIET).losses
        )
    assert runs[0] == runs[1]


def test_model_keywords_and_the_escape_for_a_colliding_one():
    seen = {}

    def model(y, seed=None, lr=None, extra=None):
        seen.update(seed=seed, lr=lr)
        normal_mean(y)

    y = torch.randn(5)
    fit(
        model,
        AutoNormal(model),
        y,
        num_steps=2,
        lr=0.1,
        model_kwargs={"seed": 7, "lr": "x"},
        **QUIET,
    )
    assert seen == {"seed": 7, "lr": "x"}
    with pytest.raises(TypeError, match="given twice"):
        fit(model, AutoNormal(model), y, num_steps=2, model_kwargs={"extra": 1}, extra=2, **QUIET)


def test_any_pyro_elbo_and_optimizer():
    @config_enumerate
    def mixture(y):
        locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("y", dist.Normal(locs[z], 0.5), obs=y)

    y = torch.cat([torch.randn(20) * 0.5 - 2.0, torch.randn(20) * 0.5 + 2.0])
    guide = AutoFlowGuide(mixture, flow="realnvp", hidden_dims=[8])
    result = fit(
        mixture,
        guide,
        y,
        num_steps=300,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        optim=pyro.optim.Adam({"lr": 0.05}),
        **QUIET,
    )
    assert result.num_steps == 300 or result.converged
    locs = guide.median()["locs"]
    assert torch.allclose(locs, torch.tensor([-2.0, 2.0]), atol=0.4)


def test_nan_loss_names_step_and_site_and_keeps_finite_parameters():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 0.1), obs=torch.tensor(5.0))  # pulls x upwards
        pyro.factor("bad", torch.where(x > 1.0, torch.tensor(math.nan), torch.tensor(0.0)))

    guide = AutoFlowGuide(model, flow="realnvp", hidden_dims=[4])
    with pytest.raises(FitError, match=r"at step \d+ at site 'bad'") as info:
        fit(model, guide, num_steps=2000, lr=0.05, seed=0, **QUIET)
    assert info.value.site == "bad" and info.value.step > 1
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_non_finite_gradient_names_the_parameter():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        # Finite value, NaN gradient: sqrt of a negative in the branch where() discards.
        pyro.factor("f", torch.where(x > 100.0, torch.sqrt(x - 100.0), torch.tensor(0.0)))

    guide = AutoNormal(model)
    with pytest.raises(FitError, match=r"gradient of parameter .*not finite at step 1"):
        fit(model, guide, num_steps=10, **QUIET)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_callback_stops_the_run_and_sees_the_state():
    states = []

    def callback(state):
        states.append(state)
        return state.step == 7

    result = fit(
        normal_mean,
        AutoNormal(normal_mean),
        torch.randn(5),
        num_steps=100,
        callbacks=[callback],
        **QUIET,
    )
    assert result.num_steps == 7 and not result.converged and "callback" in result.reason
    assert [s.step for s in states] == list(range(1, 8))
    assert states[-1].loss == result.losses[-1] and states[-1].lr > 0


def test_stl_and_iw_losses_train_and_leave_the_guide_as_it_was():
    y = torch.randn(10)
    for loss in ("stl", "iwae", "dreg"):
        pyro.clear_param_store()
        guide = AutoFlowGuide(normal_mean, flow="realnvp", hidden_dims=[8], init="prior")
        result = fit(
            normal_mean, guide, y, 1.0, loss=loss, num_particles=4, num_steps=500, lr=0.03, **QUIET
        )
        assert not guide.stl
        post_mean = y.sum() / (len(y) + 1.0)
        assert result.losses[-1] < result.losses[0]
        if loss != "iwae":  # the plain IWAE gradient's guide SNR decays with K: it lags
            assert abs(guide.median()["mu"] - post_mean) < 0.1, loss


def test_stl_needs_an_invertible_flow_and_an_autoflowguide():
    guide = AutoFlowGuide(normal_mean, flow="planar")
    with pytest.raises(ValueError, match="analytic inverse"):
        fit(normal_mean, guide, torch.randn(3), loss="stl", num_steps=2, **QUIET)
    with pytest.raises(TypeError, match="need an AutoFlowGuide"):
        fit(normal_mean, AutoNormal(normal_mean), torch.randn(3), loss="dreg", **QUIET)
    with pytest.raises(ValueError, match="loss must be one of"):
        fit(normal_mean, AutoNormal(normal_mean), torch.randn(3), loss="kl", **QUIET)


def test_progress_log_lines_and_summary(capsys):
    fit(
        normal_mean,
        AutoNormal(normal_mean),
        torch.randn(5),
        num_steps=20,
        progress="log",
        diagnose=False,
    )
    err = capsys.readouterr().err
    assert err.count("fit: step") == 10 and "ELBO" in err and "\r" not in err
    assert "20 steps in" in err
    fit(normal_mean, AutoNormal(normal_mean), torch.randn(5), num_steps=20, **QUIET)
    assert capsys.readouterr().err == ""


def test_progress_bar(capsys):
    fit(
        normal_mean,
        AutoNormal(normal_mean),
        torch.randn(5),
        num_steps=60,
        progress="bar",
        diagnose=False,
    )
    err = capsys.readouterr().err
    assert "60/60" in err and "ELBO" in err


def test_diagnose_warns_when_the_fit_cannot_be_trusted():
    cov = torch.tensor([[1.0, 0.95], [0.95, 1.0]])

    def model():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), cov))

    with pytest.warns(UserWarning, match="k-hat"):
        result = fit(
            model, AutoDiagonalNormal(model), num_steps=800, lr=0.05, progress=False, seed=0
        )
    assert not result.diagnostic.ok
    assert "k-hat" in result.summary()


def test_an_untrustworthy_fit_is_reported_once(capsys):
    # With the progress display on, its closing summary carries the k-hat verdict; a
    # warning as well would say the same thing twice.
    cov = torch.tensor([[1.0, 0.95], [0.95, 1.0]])

    def model():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), cov))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, AutoDiagonalNormal(model), num_steps=400, lr=0.05, progress="log", seed=0)
    err = capsys.readouterr().err
    warned = sum("cannot be trusted" in str(w.message) for w in caught)
    told = err.count("cannot be trusted") + warned
    assert told == 1


def test_plot_draws_the_loss_curve():
    result = fit(normal_mean, AutoNormal(normal_mean), torch.randn(5), num_steps=120, **QUIET)
    ax = result.plot()
    assert len(ax.lines) == 2
    assert list(ax.lines[0].get_ydata()) == pytest.approx(result.losses)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        fit(normal_mean, AutoNormal(normal_mean), torch.randn(3), schedule="cosine", **QUIET)
    with pytest.raises(ValueError, match="num_steps"):
        fit(normal_mean, AutoNormal(normal_mean), torch.randn(3), num_steps=0, **QUIET)
    with pytest.raises(ValueError, match="progress"):
        fit(normal_mean, AutoNormal(normal_mean), torch.randn(3), progress="yes", diagnose=False)


def test_the_setup_reports_its_start_and_its_time(capsys):
    y = torch.randn(20) + 1.0
    guide = AutoFlowGuide(normal_mean, hidden_dims=[8])
    result = fit(normal_mean, guide, y, num_steps=20, progress="log", diagnose=False)
    err = capsys.readouterr().err
    assert "AutoFlowGuide set up in" in err and "Laplace start" in err
    assert result.setup_time > 0 and guide.start_description == "Laplace start"
    prior = AutoFlowGuide(normal_mean, init="prior", name="prior")
    fit(normal_mean, prior, y, num_steps=5, progress="log", diagnose=False)
    assert "prior start (init='prior')" in capsys.readouterr().err
