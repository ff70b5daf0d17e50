"""Local latents in AutoFlowGuide: subsampled plates, per-member parameters, lazy updates."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value

from pyroflows import AutoFlowGuide, fit, infer, neutra, psis_diagnostic
from pyroflows.adam import RowAdam
from pyroflows.subsampling import Reshuffled

N = 40


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()


def data(n=N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0 + torch.rand(n, generator=generator)
    theta = 1.0 + 0.5 * torch.randn(n, generator=generator)
    y = theta + sigma * torch.randn(n, generator=generator)
    return sigma, y


def hierarchical(sigma, y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y), subsample_size=subsample_size) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])


def explicit(sigma, y, idx):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y), subsample=idx):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma[idx]), obs=y[idx])


def numbered(guide):
    """Member i's location is i, its scale tiny: a draw names the member it came from."""
    with torch.no_grad():
        guide.locals.loc[0].copy_(torch.arange(N, dtype=torch.get_default_dtype())[:, None])
        guide.locals.scale_raw[0].fill_(-30.0)


def test_subsampled_latents_are_local_and_indexed_by_the_models_indices():
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical).setup(sigma, y, 10)
    assert guide.local_sites == ("theta",) and guide.latent_dim == 2
    assert guide.locals.loc[0].shape == (N, 1)  # every member, not the subsample
    numbered(guide)
    guide_trace = pyro.poutine.trace(guide).get_trace(sigma, y, 10)
    model_trace = pyro.poutine.trace(
        pyro.poutine.replay(hierarchical, trace=guide_trace)
    ).get_trace(sigma, y, 10)
    indices = model_trace.nodes["groups"]["value"]  # the model's own subsample
    theta = guide_trace.nodes["theta"]["value"]
    assert len(set(indices.tolist())) == 10
    assert torch.allclose(theta, indices.to(theta.dtype), atol=1e-6)


def test_explicit_indices_are_refused_without_create_plates_and_honoured_with_them():
    sigma, y = data()
    idx = torch.tensor([3, 17, 5, 29])
    with pytest.raises(ValueError, match=r"plate 'groups' explicit indices.*create_plates"):
        AutoFlowGuide(explicit).setup(sigma, y, idx)

    def plates(sigma, y, idx):
        return pyro.plate("groups", len(y), subsample=idx)

    guide = AutoFlowGuide(explicit, create_plates=plates).setup(sigma, y, idx)
    numbered(guide)
    guide_trace = pyro.poutine.trace(guide).get_trace(sigma, y, idx)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(explicit, trace=guide_trace)).get_trace(
        sigma, y, idx
    )
    assert torch.equal(model_trace.nodes["groups"]["value"], idx)
    assert torch.allclose(guide_trace.nodes["theta"]["value"], idx.to(torch.get_default_dtype()))


def test_members_outside_the_minibatch_do_not_move_and_those_inside_do():
    sigma, y = data()
    idx = torch.arange(10)

    def plates(sigma, y, idx):
        return pyro.plate("groups", len(y), subsample=idx)

    guide = AutoFlowGuide(explicit, create_plates=plates)
    fit(explicit, guide, sigma, y, idx, num_steps=1, progress=False, diagnose=False, seed=0)
    before = [p.detach().clone() for p in (guide.locals.loc[0], guide.locals.scale_raw[0])]
    fit(explicit, guide, sigma, y, idx, num_steps=30, progress=False, diagnose=False, seed=1)
    for old, new in zip(before, (guide.locals.loc[0], guide.locals.scale_raw[0]), strict=True):
        assert torch.equal(old[10:], new[10:].detach())  # Adam's moments did not move them
        assert not torch.allclose(old[:10], new[:10].detach())


def test_the_subsampled_elbo_is_unbiased_for_the_full_data_elbo():
    pyro.set_rng_seed(0)
    sigma, y = data()
    # the same 8 members at every call (the guide's own subsamples follow its epochs, so
    # reseeding alone would not repeat a minibatch)
    same = lambda *args: pyro.plate("groups", N, subsample=torch.arange(8))  # noqa: E731
    guide = AutoFlowGuide(hierarchical, init_scale=0.3, local_prior="learned", create_plates=same)
    guide.setup(sigma, y, 8)
    with torch.no_grad():  # a trained-like guide: the networks not at zero
        for p in guide.locals.nets.parameters():
            p.add_(0.3 * torch.randn_like(p))
    # each call: 100 particles, vectorised (one minibatch per call, fresh at every call)
    elbo = Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        mini = torch.tensor([elbo.loss(hierarchical, guide, sigma, y, 8) for _ in range(150)])
        full = torch.tensor([elbo.loss(hierarchical, guide, sigma, y) for _ in range(50)])
    se = (mini.var() / len(mini) + full.var() / len(full)).sqrt()
    assert abs(mini.mean() - full.mean()) < 3 * se


def test_the_local_density_is_that_of_the_draw_including_the_jacobian():
    # At trained-like parameters: a positive local is LogNormal(mean, sd) of its conditional.
    def model():
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("members", 30, subsample_size=7):
            pyro.sample("rate", dist.Gamma(2.0, scale))

    guide = AutoFlowGuide(model, init_scale=0.4).setup()
    with torch.no_grad():
        for p in guide.locals.parameters():
            p.add_(0.5 * torch.randn_like(p))
    trace = pyro.poutine.trace(guide).get_trace()
    site = trace.nodes["rate"]
    idx = trace.nodes["members"]["value"]
    g = trace.nodes[guide.latent_site_name]["value"]
    mean, sd = guide.locals.conditional(0, g, (g - guide.loc) / guide.scale, [idx])
    expected = dist.LogNormal(mean, sd).log_prob(site["value"])
    assert torch.allclose(site["fn"].log_prob(site["value"]), expected, atol=1e-5)
    assert (site["value"] > 0).all()


def test_the_learned_prior_represents_a_normal_hierarchys_exact_conditional():
    # theta_i | mu, tau, y_i: N(mu, tau) times N(y_i, sigma_i), for every mu and tau.
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical, local_prior="learned").setup(sigma, y, 10)
    net = guide.locals.nets[0]
    with torch.no_grad():  # log prior precision = -2 log tau; prior mean = mu
        net.linear.weight.copy_(torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
        guide.locals.loc[0].copy_(y[:, None])
        guide.locals.scale_raw[0].copy_(sigma.expm1().log()[:, None])  # softplus^-1
    idx = torch.arange(N)
    for mu, tau in [(0.3, 0.2), (1.5, 1.0), (-2.0, 4.0)]:
        g = torch.tensor([mu, math.log(tau)])
        mean, sd = guide.locals.conditional(0, g, torch.randn(2), [idx])
        precision = 1 / tau**2 + 1 / sigma**2
        assert torch.allclose(sd, precision.rsqrt(), rtol=1e-5)
        assert torch.allclose(mean, (mu / tau**2 + y / sigma**2) / precision, atol=1e-5)


def test_a_last_smaller_batch_and_all_members_for_predictive():
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical)
    fit(hierarchical, guide, sigma, y, 10, num_steps=20, progress=False, diagnose=False)
    assert guide(sigma, y, 3)["theta"].shape == (3,)  # a last smaller batch
    predictive = Predictive(hierarchical, guide=guide, num_samples=5, return_sites=["theta"])
    assert predictive(sigma, y)["theta"].shape == (5, N)  # subsample_size=None: all
    assert guide.sample_posterior(6)["theta"].shape == (6, N)
    assert guide.median()["theta"].shape == (N,)
    assert guide.quantiles([0.1, 0.9])["theta"].shape == (2, N)


def test_save_and_load_keep_every_member_and_refuse_another_model():
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical)
    fit(hierarchical, guide, sigma, y, 10, num_steps=20, progress=False, diagnose=False)
    state = guide.state_dict()
    loaded = AutoFlowGuide(hierarchical)
    loaded.load_state_dict(state)
    loaded.setup(sigma, y, 10)
    assert torch.equal(loaded.locals.loc[0], guide.locals.loc[0])
    a, b = guide.sample_posterior(50, seed=3), loaded.sample_posterior(50, seed=3)
    assert torch.allclose(a["theta"], b["theta"])
    other = AutoFlowGuide(hierarchical)
    with pytest.raises(ValueError, match="local latents differ"):
        other.load_state_dict(state)
        other.setup(*data(n=N + 1), 10)
    learned = AutoFlowGuide(hierarchical, local_prior="learned")
    with pytest.raises(ValueError, match="local_prior='model', this guide has local_prior="):
        learned.load_state_dict(state)


def test_the_default_flow_puts_a_sinh_arcsinh_layer_before_a_local_guide_s_globals():
    # With local latents the flow holds the hierarchy's globals, whose scale has a long tail
    # (test_accuracy.py); without them the default is two IAF blocks, as before.
    from pyroflows.transforms import SinhArcsinh

    sigma, y = data()
    local = AutoFlowGuide(hierarchical).setup(sigma, y, 10)
    assert isinstance(local.flow[0], SinhArcsinh) and len(local.flow) == 3
    whole = AutoFlowGuide(hierarchical).setup(sigma, y, None)  # nothing subsampled: no locals
    iaf = AutoFlowGuide(hierarchical, flow="iaf").setup(sigma, y, None)
    assert whole.locals is None and repr(whole.flow) == repr(iaf.flow)
    assert not any(isinstance(part, SinhArcsinh) for part in whole.flow)


def test_a_local_guide_saved_with_two_iaf_blocks_is_refused_by_the_new_default_naming_it():
    # Local guides saved before their default flow gained the sinh-arcsinh layer (2026-12-02)
    # must not load silently into today's default; the error names flow='iaf'.
    sigma, y = data()
    old = AutoFlowGuide(hierarchical, flow="iaf")
    fit(hierarchical, old, sigma, y, 10, num_steps=5, progress=False, diagnose=False)
    new = AutoFlowGuide(hierarchical)
    with pytest.raises(ValueError, match="flow='iaf' there"):
        new.load_state_dict(old.state_dict())
    assert new.prototype_trace is None and not list(new.parameters())  # nothing half-built
    again = AutoFlowGuide(hierarchical, flow="iaf")
    again.load_state_dict(old.state_dict())
    assert torch.equal(again.loc, old.loc)


def test_a_full_plate_declared_local_and_nested_and_constrained_locals():
    def model():
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("features", 3, dim=-1):
            with pyro.plate("groups", 20, dim=-2, subsample_size=5):
                pyro.sample("w", dist.Normal(0.0, tau))
            with pyro.plate("units", 6, dim=-2):
                pyro.sample("s", dist.LogNormal(0.0, tau))

    guide = AutoFlowGuide(model, local_plates=["units"]).setup()
    assert guide.local_sites == ("w", "s") and guide.latent_dim == 1
    trace = pyro.poutine.trace(guide).get_trace()
    assert trace.nodes["w"]["value"].shape == (5, 3)
    assert (trace.nodes["s"]["value"] > 0).all()
    samples = guide.sample_posterior(4)
    assert samples["w"].shape == (4, 20, 3) and samples["s"].shape == (4, 6, 3)
    with pytest.raises(ValueError, match="local_plates names \\['nowhere'\\]"):
        AutoFlowGuide(model, local_plates=["nowhere"]).setup()


def test_several_subsampled_plates_each_index_their_own_members():
    def model():
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("rows", 12, subsample_size=4, dim=-2) as rows:
            a = pyro.sample("a", dist.Normal(0.0, tau))
            with pyro.plate("cols", 9, subsample_size=3, dim=-1) as cols:
                pyro.sample("b", dist.Normal(a, 1.0))
        return rows, cols

    guide = AutoFlowGuide(model).setup()
    assert guide.locals.loc[1].shape == (12 * 9, 1)
    with torch.no_grad():
        guide.locals.loc[1].copy_(torch.arange(108.0)[:, None])
        guide.locals.scale_raw[1].fill_(-30.0)
    trace = pyro.poutine.trace(guide).get_trace()
    rows, cols = trace.nodes["rows"]["value"], trace.nodes["cols"]["value"]
    expected = (rows[:, None] * 9 + cols[None, :]).to(torch.get_default_dtype())
    assert torch.allclose(trace.nodes["b"]["value"], expected)


def test_what_needs_every_member_says_so():
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical)
    result = fit(hierarchical, guide, sigma, y, 10, num_steps=20, progress=False)
    assert result.diagnostic is None and "no k-hat: the model subsamples plate 'groups'" in str(
        result
    )
    with pytest.raises(ValueError, match=r"subsamples plate 'groups'.*subsample_size=None"):
        psis_diagnostic(hierarchical, guide, sigma, y, 10)
    assert psis_diagnostic(hierarchical, guide, sigma, y, num_samples=200).k_hat > 0
    with pytest.raises(ValueError, match=r"loss='dreg'.*local latents.*loss='iwae'"):
        fit(hierarchical, guide, sigma, y, 10, loss="dreg", num_particles=4, progress=False)


@pytest.mark.slow  # 3000 steps of fit
def test_the_locals_conditional_spread_follows_the_global_scale():
    # Centred, weakly informed groups: theta_i | tau has spread ~ tau (a funnel).
    torch.manual_seed(0)
    y = 0.5 * torch.randn(30)

    def model(y):
        tau = pyro.sample("tau", dist.LogNormal(-1.0, 1.0))
        with pyro.plate("groups", len(y), subsample_size=10) as idx:
            theta = pyro.sample("theta", dist.Normal(0.0, tau))
            pyro.sample("y", dist.Normal(theta, 3.0), obs=y[idx])

    at = init_to_value(values={"tau": torch.tensor(0.4)})
    guide = AutoFlowGuide(model, init_loc_fn=at)
    # (one draw a step and windows of 100: the conditional's shape is the point here, and
    # fit's minibatch defaults, 8 draws and longer windows, cost twice the time)
    fit(model, guide, y, num_steps=3000, num_particles=1, window=100, progress=False,
        diagnose=False, seed=0)  # fmt: skip
    draws = guide.sample_posterior(4000)
    tau, theta = draws["tau"], draws["theta"]
    low, high = tau < tau.quantile(0.25), tau > tau.quantile(0.75)
    spread_low, spread_high = theta[low].std(0), theta[high].std(0)
    assert (spread_high > 1.5 * spread_low).float().mean() > 0.9
    # the truth: sd(theta_i | tau) = tau * 3 / sqrt(tau^2 + 9), about proportional to tau
    ratio = (tau[high].mean() / tau[low].mean()).item()
    assert (spread_high / spread_low).median() > 0.5 * ratio


def test_row_adam_is_adam_per_row_over_the_steps_that_touched_it():
    torch.manual_seed(0)
    start = torch.randn(4, 3, dtype=torch.float64)
    rows = torch.nn.Parameter(start.clone())
    optim = RowAdam([rows], lr=0.05)
    # row r's own Adam, stepped only when r is in the minibatch
    single = [torch.nn.Parameter(start[r].clone()) for r in range(4)]
    singles = [torch.optim.Adam([p], lr=0.05) for p in single]
    for step in range(30):
        batch = torch.tensor([0, 1]) if step % 3 else torch.tensor([0, 2])  # row 3: never
        target = torch.randn(4, 3, dtype=torch.float64)
        picked = torch.nn.functional.embedding(batch, rows, sparse=True)
        (picked - target[batch]).pow(2).sum().backward()
        optim.step()
        rows.grad = None
        for r in batch.tolist():
            (single[r] - target[r]).pow(2).sum().backward()
            singles[r].step()
            single[r].grad = None
    for r in range(4):
        assert torch.allclose(rows[r], single[r], atol=1e-10)
    assert torch.equal(rows[3].detach(), start[3])


def test_a_local_whose_support_moves_with_a_global_is_refused():
    def model():
        top = pyro.sample("top", dist.LogNormal(0.0, 1.0))
        with pyro.plate("members", 20, subsample_size=5):
            pyro.sample("x", dist.Uniform(0.0, top))

    with pytest.raises(ValueError, match="support of latent site 'x'"):
        AutoFlowGuide(model).setup()


def test_the_guides_subsamples_deal_every_member_once_an_epoch_and_uniformly():
    # Random reshuffling: N / 10 = 4 steps of 10 visit each of the 40 members exactly once
    # (independent draws, Pyro's plate, repeat some and miss others); the first step's
    # members are still a uniform random subset.
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical).setup(sigma, y, 10)
    counts = torch.zeros(N)
    for _ in range(300):
        epoch = []
        for _ in range(N // 10):
            trace = pyro.poutine.trace(guide).get_trace(sigma, y, 10)
            epoch.append(trace.nodes["groups"]["value"])
        assert sorted(torch.cat(epoch).tolist()) == list(range(N))
        counts[epoch[0]] += 1
    expected = 300 * 10 / N
    assert (counts - expected).abs().max() < 5 * (expected * 0.75) ** 0.5
    deal = Reshuffled()  # a million members: one permutation an epoch, int32
    assert len(deal("groups", 10**6, 1000).unique()) == 1000
    assert deal.orders["groups"][0].dtype == torch.int32


def test_infer_on_a_subsampled_model_returns_guide_draws_of_every_member_and_says_why():
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical)
    fit(hierarchical, guide, sigma, y, 10, num_steps=20, progress=False, diagnose=False)
    with pytest.warns(UserWarning, match="approximate"):
        posterior = infer(
            hierarchical, sigma, y, 10, guide=guide, stages=("dreg", "neutra"),
            num_samples=300, seed=0, progress=False,
        )  # fmt: skip
    assert posterior.kind == "guide" and posterior.samples["theta"].shape == (300, N)
    for stage in posterior.route.stages:
        assert stage.outcome.startswith("skipped: plate 'groups' is subsampled (10 of 40)")
    assert "guide draws, unweighed" in posterior.label
    assert list(posterior.summary().columns[:2]) == ["mean", "sd"]  # stats, no R-hat
    with pytest.raises(ValueError, match="local latents \\(theta\\)"):
        neutra(hierarchical, guide, sigma, y, 10)
    with pytest.warns(UserWarning, match="approximate"):  # infer's own guide, the same
        posterior = infer(hierarchical, sigma, y, 10, stages=("locals",), progress=False)
    assert posterior.route.stages[0].outcome.startswith(
        "skipped: plate 'groups' is subsampled (10 of 40); the fit stage's guide has"
    )


def test_the_member_bound_is_the_elbo_at_one_draw_and_exact_with_the_exact_conditional():
    from pyroflows.objectives import MemberImportanceELBO

    sigma, y = data()
    # the same 8 members at every call (the guide's own subsamples follow its epochs, so
    # reseeding alone would not repeat a minibatch)
    same = lambda *args: pyro.plate("groups", N, subsample=torch.arange(8))  # noqa: E731
    guide = AutoFlowGuide(hierarchical, init_scale=0.3, local_prior="learned", create_plates=same)
    guide.setup(sigma, y, 8)
    with torch.no_grad():  # a trained-like guide: the networks not at zero
        for p in guide.locals.nets.parameters():
            p.add_(0.3 * torch.randn_like(p))
    one = MemberImportanceELBO(num_particles=1, max_plate_nesting=1)
    with torch.no_grad():
        ours = torch.tensor([one.loss(hierarchical, guide, sigma, y, 8) for _ in range(300)])
        elbo = Trace_ELBO()
        pyros = torch.tensor([elbo.loss(hierarchical, guide, sigma, y, 8) for _ in range(300)])
    se = (ours.var() / len(ours) + pyros.var() / len(pyros)).sqrt()
    assert abs(ours.mean() - pyros.mean()) < 3 * se
    # With the exact conditional every member's K weights are equal: given the same globals
    # draw, the bound at K = 16 is the bound at K = 1 (log mean exp of equal terms).
    net = guide.locals.nets[0]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.linear.weight.copy_(torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
        guide.locals.loc[0].copy_(y[:, None])
        guide.locals.scale_raw[0].copy_(sigma.expm1().log()[:, None])
    many = MemberImportanceELBO(num_particles=16, max_plate_nesting=1)
    for seed in range(3):
        values = []
        for bound in (one, many):
            pyro.set_rng_seed(seed)  # the globals are drawn first: the same g for both
            values.append(bound.loss(hierarchical, guide, sigma, y, 8))
        assert values[0] == pytest.approx(values[1], rel=1e-4)
        pyro.set_rng_seed(seed)  # and Pyro's ELBO on the same draw: the same value
        assert Trace_ELBO().loss(hierarchical, guide, sigma, y, 8) == pytest.approx(
            values[0], rel=1e-4
        )


def test_the_member_bound_trains_with_fit_and_refuses_a_model_that_does_not_factorise():
    from pyroflows.objectives import MemberImportanceELBO

    sigma, y = data()
    guide = AutoFlowGuide(hierarchical)
    result = fit(
        hierarchical,
        guide,
        sigma,
        y,
        10,
        loss="iwae",
        num_particles=8,
        num_steps=30,
        progress=False,
        diagnose=False,
        seed=0,
    )
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)

    def coupled(y, keepdim=True):  # a term outside the plate that depends on the locals
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", len(y), subsample_size=5):
            theta = pyro.sample("theta", dist.Normal(0.0, tau))
        pyro.sample("total", dist.Normal(theta.sum(-1, keepdim=keepdim), 1.0), obs=y.sum())

    guide = AutoFlowGuide(coupled)
    with pytest.raises(ValueError, match="site 'total' is outside the local plate"):
        MemberImportanceELBO(num_particles=4).loss(coupled, guide, y)
    with pytest.raises(ValueError, match="total"):  # not broadcasting over the draws
        MemberImportanceELBO(num_particles=4).loss(coupled, guide, y, False)


def test_the_globals_diagnostic_integrates_each_member_out_where_joint_weights_degenerate():
    # The exact conditional of theta_i but for its prior's precision, off by e^0.5, and
    # q(mu, log tau) a Gaussian 1.5 times as wide as the exact posterior: a good proposal
    # for the globals, which the joint weights (40 members' errors multiplied) hide.
    from pyroflows import globals_diagnostic

    pyro.set_rng_seed(0)
    sigma, y = data()
    mu, log_tau = torch.meshgrid(
        torch.linspace(-2, 4, 300), torch.linspace(-8, 2.5, 300), indexing="ij"
    )
    log_p = dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfNormal(5.0).log_prob(log_tau.exp())
    total = (log_tau.exp()[..., None] ** 2 + sigma**2).sqrt()
    log_p = log_p + log_tau + dist.Normal(mu[..., None], total).log_prob(y).sum(-1)
    w = torch.softmax(log_p.reshape(-1), 0).reshape(log_p.shape)
    mean = torch.stack([(w * mu).sum(), (w * log_tau).sum()])
    sd = torch.stack([(w * (mu - mean[0]) ** 2).sum(), (w * (log_tau - mean[1]) ** 2).sum()])
    guide = AutoFlowGuide(
        hierarchical, local_plates=["groups"], num_layers=1, local_prior="learned"
    ).setup(sigma, y)
    net = guide.locals.nets[0]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.linear.weight.copy_(torch.tensor([[0.0, -2.0], [1.0, 0.0]]))
        net.linear.bias.copy_(torch.tensor([0.5, 0.0]))
        guide.locals.loc[0].copy_(y[:, None])
        guide.locals.scale_raw[0].copy_(sigma.expm1().log()[:, None])
        guide.loc.copy_(mean)
        guide.scale_raw.copy_((1.5 * sd.sqrt()).expm1().log())
    assert globals_diagnostic(hierarchical, guide, sigma, y, num_samples=300).k_hat < 0.6
    assert psis_diagnostic(hierarchical, guide, sigma, y, num_samples=300).k_hat > 0.8
    with pytest.raises(ValueError, match=r"subsampled \(10 of 40\).*subsample_size=None"):
        globals_diagnostic(hierarchical, guide, sigma, y, 10)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="no local latents; use psis_diagnostic"):
        globals_diagnostic(hierarchical, AutoFlowGuide(hierarchical), sigma, y)


@pytest.mark.parametrize("subsample_size", [10, None])
def test_a_subsampled_fit_ends_at_the_mean_of_its_last_two_rates(subsample_size):
    # A minibatch's gradient noise keeps the globals wandering at the smallest rate (on the
    # 1,000-group benchmark the global mean ended 0.1-0.7 sds off): with a subsampled plate,
    # fit ends at the mean of the global parameters over the schedule's last two learning
    # rates; the members' rows, and a full-data fit, end at their last step.
    sigma, y = data()
    guide = AutoFlowGuide(hierarchical, local_plates=["groups"])
    seen = []

    def record(state):
        global_params = [guide.loc, guide.scale_raw, *guide.flow.parameters()]
        seen.append(([p.detach().clone() for p in global_params], guide.locals.loc[0].clone()))
        return False

    result = fit(
        hierarchical,
        guide,
        sigma,
        y,
        subsample_size,
        num_steps=600,
        window=20,
        progress=False,
        seed=0,
        diagnose=False,
        callbacks=[record],
    )
    last_two = sorted(set(result.lr_history[100:]))[:2]  # (after the warm-up's 100 steps)
    final = [i for i, lr in enumerate(result.lr_history) if i >= 100 and lr in last_two]
    final.insert(0, final[0] - 1)  # a phase begins once the step that ended the last ran
    assert result.converged and len(final) >= 120  # the run reached its final phase
    ends = [guide.loc, guide.scale_raw, *guide.flow.parameters()]
    last = seen[-1][0]
    mean = [torch.stack([seen[i][0][k] for i in final]).mean(0) for k in range(len(ends))]
    expected = mean if subsample_size else last
    for end, want in zip(ends, expected, strict=True):
        assert torch.allclose(end.detach(), want, atol=1e-5)
    assert subsample_size is None or not torch.allclose(ends[0].detach(), last[0])
    assert torch.equal(guide.locals.loc[0].detach(), seen[-1][1])  # rows: their last step
