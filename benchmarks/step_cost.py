"""``fit``'s step against Pyro's ``AutoNormal`` step, and against the limit of its parts.

For each model and thread count, in one process:

- per step: ``fit`` with the default ``AutoFlowGuide`` (its compiled step; and with
  ``fast=False``, Pyro's general path) beside an ``AutoNormal`` + ``Trace_ELBO`` SVI step,
  interleaved: fit's callback times fit's step and then runs one AutoNormal step, so drift in
  machine load hits both alike; medians;
- totals: the whole wall time of ``fit(num_steps=2000)`` with its defaults (Laplace start,
  compilation, NaN guard, clipping, a progress display, the closing k-hat) against a
  2000-step AutoNormal SVI loop (its setup included), best of two runs each;
- the limit: the model's log joint + gradient through Pyro's potential
  (``initialize_model``) plus the flow alone (draw + log q + gradient); the hand-written log
  joint + gradient as the floor; the flow alone compiled the same way as the step.

Wall time to convergence (``--convergence``): ``fit`` with the default guide on the 14
benchmark posteriors, compiled and with ``fast=False``, side by side (two worker processes,
one thread each, each pair run together), at most 5000 steps, seed 0.

    python -m benchmarks.cost                  # writes results/fast_path.md
    python -m benchmarks.cost --convergence    # writes results/fast_path_convergence.md
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.mcmc.util import initialize_model
from torch.fx.experimental.proxy_tensor import make_fx

from pyroflows import AutoFlowGuide, fit

from .accuracy import run_all
from .posteriors import POSTERIORS, eight_schools_centered

STEPS = 300  # timed steps per measurement
TOTAL_STEPS = 2000
TOTAL_REPEATS = 3  # alternating AutoNormal and fit runs, best of each: drift moves one run ~10%


# ----------------------------------------------------------------------------- the models
def schools():
    p = eight_schools_centered()
    y, sigma = p.args

    def hand(u):  # mu, log tau, theta
        mu, log_tau, theta = u[0], u[1], u[2:]
        tau = log_tau.exp()
        return (
            dist.Normal(0.0, 5.0).log_prob(mu)
            + dist.HalfCauchy(5.0).log_prob(tau)
            + log_tau
            + dist.Normal(mu, tau).log_prob(theta).sum()
            + dist.Normal(theta, sigma).log_prob(y).sum()
        )

    return "centred eight schools, d = 10", p.model, p.args, hand, 10


def hierarchical_logistic(groups=10, predictors=7, n=2000):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, predictors, generator=g)
    group = torch.randint(0, groups, (n,), generator=g)
    beta_true = 0.5 + 0.7 * torch.randn(groups, predictors, generator=g)
    y = torch.bernoulli(torch.sigmoid((x * beta_true[group]).sum(-1)), generator=g)

    def model(x, group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", groups, dim=-2), pyro.plate("predictors", predictors, dim=-1):
            beta = pyro.sample("beta", dist.Normal(mu, tau))
        # (..., 1, n): the data plate at dim -1, left of it the groups' dim, so that draws
        # vectorised over a leading dim broadcast (psis_diagnostic, infer)
        logits = (x * beta[..., group, :]).sum(-1).unsqueeze(-2)
        with pyro.plate("data", n):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    def hand(u):
        mu, log_tau, beta = u[0], u[1], u[2:].reshape(groups, predictors)
        tau = log_tau.exp()
        logits = (x * beta[group]).sum(-1)
        return (
            dist.Normal(0.0, 1.0).log_prob(mu)
            + dist.HalfNormal(1.0).log_prob(tau)
            + log_tau
            + dist.Normal(mu, tau).log_prob(beta).sum()
            + dist.Bernoulli(logits=logits).log_prob(y).sum()
        )

    d = 2 + groups * predictors
    return f"hierarchical logistic regression, d = {d}, N = {n}", model, (x, group, y), hand, d


def hierarchical_normal(groups=1000):
    y = torch.randn(groups, generator=torch.Generator().manual_seed(0))

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        with pyro.plate("groups", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    def hand(u):
        mu, log_tau, theta = u[0], u[1], u[2:]
        tau = log_tau.exp()
        return (
            dist.Normal(0.0, 5.0).log_prob(mu)
            + dist.HalfNormal(5.0).log_prob(tau)
            + log_tau
            + dist.Normal(mu, tau).log_prob(theta).sum()
            + dist.Normal(theta, 1.0).log_prob(y).sum()
        )

    return f"hierarchical normal, d = {groups + 2}", model, (y,), hand, groups + 2


MODELS = [schools, hierarchical_logistic, hierarchical_normal]


# ------------------------------------------------------------------------- measurements
def _autonormal_svi(model, args):
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(30):
        svi.step(*args)
    return svi


def per_step(model, args, fast: bool) -> tuple[float, float]:
    """Median ms of fit's step and of an interleaved AutoNormal step."""
    pyro.clear_param_store()
    svi = _autonormal_svi(model, args)
    times = {"fit": [], "autonormal": []}
    clock = {"last": None}

    def interleave(state):
        now = time.perf_counter()
        if clock["last"] is not None and state.step > 30:  # after a warm-up
            times["fit"].append(now - clock["last"])
            start = time.perf_counter()
            svi.step(*args)
            times["autonormal"].append(time.perf_counter() - start)
        clock["last"] = time.perf_counter()

    guide = AutoFlowGuide(model)
    fit(model, guide, *args, num_steps=STEPS + 31, stop_early=False, progress=False,
        diagnose=False, callbacks=[interleave], fast=fast, seed=0)
    return tuple(1e3 * statistics.median(times[k]) for k in ("fit", "autonormal"))


def totals(model, args) -> tuple[float, float]:
    """Seconds of fit(num_steps=2000) with its defaults, and of a 2000-step AutoNormal loop
    (alternating, best of each)."""
    best = {"fit": float("inf"), "autonormal": float("inf")}
    for _ in range(TOTAL_REPEATS):
        pyro.clear_param_store()
        start = time.perf_counter()
        svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(TOTAL_STEPS):
            svi.step(*args)
        best["autonormal"] = min(best["autonormal"], time.perf_counter() - start)
        pyro.clear_param_store()
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            fit(model, AutoFlowGuide(model), *args, num_steps=TOTAL_STEPS, stop_early=False,
                progress="log", seed=0)
        best["fit"] = min(best["fit"], time.perf_counter() - start)
    return best["fit"], best["autonormal"]


def _median_ms(fn, repeats=STEPS) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parts(model, args, hand, d) -> dict[str, float]:
    """ms of the potential (+grad) through Pyro, by hand, and of the flow alone."""
    pyro.clear_param_store()
    _, potential_fn, _, _ = initialize_model(model, model_args=args)
    guide = AutoFlowGuide(model).setup(*args)
    point = {
        name: value.detach().requires_grad_()
        for name, value in guide.latent_to_sites(guide.loc.detach()[None]).items()
    }
    point = {k: torch.zeros_like(v[0]).requires_grad_() for k, v in point.items()}

    def pyro_potential():
        torch.autograd.grad(potential_fn(point), list(point.values()))

    u = torch.zeros(d, requires_grad=True)

    def by_hand():
        torch.autograd.grad(hand(u), [u])

    params = list(guide.parameters())

    def flow_alone():
        q = guide.get_posterior()
        z = q.rsample()
        torch.autograd.grad(q.log_prob(z), params, allow_unused=True)

    names = [f"guide.{n}" for n, _ in guide.named_parameters()]
    holder = _LogQ(guide)

    def flow_step(eps, *values):
        log_q = torch.func.functional_call(holder, dict(zip(names, values, strict=True)), (eps,))
        return torch.autograd.grad(log_q, values, allow_unused=True)

    inputs = [p.detach().clone().requires_grad_() for p in params]
    with pyro.validation_enabled(False):
        graph = make_fx(flow_step)(torch.randn(d), *inputs)

    def flow_compiled():
        with torch.no_grad():
            graph(torch.randn(d), *params)

    return {
        "pyro_potential": _median_ms(pyro_potential),
        "hand": _median_ms(by_hand),
        "flow": _median_ms(flow_alone),
        "flow_compiled": _median_ms(flow_compiled),
    }


class _LogQ(torch.nn.Module):
    """The guide's draw and log q from base draws ``eps`` (for ``functional_call``)."""

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, eps):
        transform = self.guide.get_transform()
        z = transform(eps)
        return self.guide.get_base_dist().log_prob(eps) - transform.log_abs_det_jacobian(eps, z)


def run(threads=(1, 2)) -> list[str]:
    lines = [
        "Medians over interleaved steps; `fit` runs the default `AutoFlowGuide` (its compiled "
        "step, or `fast=False`), `AutoNormal` an SVI step with `Trace_ELBO` and Pyro's Adam. "
        f"Totals: `fit(num_steps={TOTAL_STEPS})` with its defaults (Laplace start, compiling, "
        "NaN guard, clipping, progress display, the closing k-hat) against a "
        f"{TOTAL_STEPS}-step AutoNormal loop, alternating, best of {TOTAL_REPEATS}. Limit = "
        "Pyro's potential + grad (`initialize_model`) + the flow alone (draw, log q, grad); "
        f"floor = the log joint written by hand. torch {torch.__version__}.",
        "",
        "| model | threads | fit ms/step | AutoNormal ms/step | ratio | fit fast=False "
        "(ratio) | total fit s | total AutoNormal s | ratio | Pyro potential ms | hand "
        "ms | flow ms (compiled) | fit / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in threads:
        torch.set_num_threads(n)
        for make in MODELS:
            name, model, args, hand, d = make()
            fast_ms, an_ms = per_step(model, args, fast=True)
            slow_ms, an2_ms = per_step(model, args, fast=False)
            total_fit, total_an = totals(model, args)
            p = parts(model, args, hand, d)
            limit = p["pyro_potential"] + p["flow"]
            lines.append(
                f"| {name} | {n} | {fast_ms:.2f} | {an_ms:.2f} | {fast_ms / an_ms:.2f} | "
                f"{slow_ms:.2f} ({slow_ms / an2_ms:.2f}) | {total_fit:.1f} | {total_an:.1f} | "
                f"{total_fit / total_an:.2f} | {p['pyro_potential']:.2f} | {p['hand']:.2f} | "
                f"{p['flow']:.2f} ({p['flow_compiled']:.2f}) | {fast_ms / limit:.2f} |"
            )
            print(lines[-1], flush=True)
    return lines


def convergence(seed: int = 0, steps: int = 5000, workers: int = 2) -> list[str]:
    """Wall time to convergence with the compiled step and with Pyro's general path."""
    guides = ("AutoFlowGuide", "AutoFlowGuide fast=False")
    jobs = [
        {"posterior": p, "guide": g, "seed": seed, "steps": steps}
        for p in POSTERIORS
        for g in guides
    ]
    rows = {}

    def keep(row):
        rows[(row["posterior"], row["guide"])] = row
        print(row["posterior"], row["guide"], row.get("fit_seconds"), row.get("error"), flush=True)

    run_all(jobs, workers, keep)
    lines = [
        f"fit with the default guide, at most {steps} steps (the plateau rule ends most "
        f"sooner), seed {seed}; compiled step vs `fast=False`, each pair run side by side "
        "(one thread each). Seconds include setup (Laplace start, compiling).",
        "",
        "| posterior | path | steps | ms/step | fit s | fast=False: steps | ms/step | fit s "
        "| time ratio | max abs(Δmean)/sd (compiled / general) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POSTERIORS:
        a, b = rows.get((p, guides[0]), {}), rows.get((p, guides[1]), {})
        if "fit_seconds" not in a or "fit_seconds" not in b:
            lines.append(f"| {p} | failed: {a.get('error') or b.get('error')} |")
            continue
        lines.append(
            f"| {p} | {a['path']} | {a['steps']} | {a['ms_per_step']:.2f} | "
            f"{a['fit_seconds']:.1f} | {b['steps']} | {b['ms_per_step']:.2f} | "
            f"{b['fit_seconds']:.1f} | {a['fit_seconds'] / b['fit_seconds']:.2f} | "
            f"{a['max_dmean']:.2f} / {b['max_dmean']:.2f} |"
        )
    return lines
