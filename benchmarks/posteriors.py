"""Pyro ports of the reference posteriors, and how to score a set of draws against them.

Each posterior is a ``Posterior`` with a model, its arguments, a function that maps a dict of
draws (``{site: tensor (S, ...)}``) to the named scalar parameters of the reference, and the
reference itself: posteriordb summaries and draws (``../shared/posteriordb``), or the exact
answer (Neal's funnel).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

POSTERIORDB = Path(
    os.environ.get(
        "PYROFLOWS_POSTERIORDB", Path(__file__).resolve().parents[2] / "shared" / "posteriordb"
    )
)


@dataclass
class Posterior:
    name: str
    model: object
    args: tuple
    to_params: object  # draws dict -> {param name: (S,) tensor}
    reference: dict = field(default_factory=dict)  # param -> {"mean", "sd"}
    reference_draws: dict | None = None  # param -> tensor of reference draws
    log_z: float | None = None  # exact log evidence where known (KL = -ELBO + log Z)
    extra: dict = field(default_factory=dict)  # constants a port needs (numpyro_ports.py)


def _load(folder: str):
    root = POSTERIORDB / folder
    data = json.loads((root / "data.json").read_text())
    summary = json.loads((root / "reference_summary.json").read_text())["parameters"]
    draws = json.loads((root / "reference_draws_2000.json").read_text())
    draws = {k: torch.tensor(v, dtype=torch.float64) for k, v in draws.items()}
    return data, summary, draws


def _flatten(name, value):
    """(S, J) -> {name[1]: (S,), ...}; (S,) -> {name: (S,)}."""
    value = value.reshape(value.shape[0], -1) if value.dim() > 1 else value
    if value.dim() == 1:
        return {name: value}
    return {f"{name}[{j + 1}]": value[:, j] for j in range(value.shape[1])}


def eight_schools_centered() -> Posterior:
    data, summary, draws = _load("eight_schools-eight_schools_centered")
    y = torch.tensor(data["y"], dtype=torch.float)
    sigma = torch.tensor(data["sigma"], dtype=torch.float)

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("J", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def to_params(d):
        return {
            "mu": d["mu"].reshape(-1),
            "tau": d["tau"].reshape(-1),
            **_flatten("theta", d["theta"]),
        }

    return Posterior("eight_schools_centered", model, (y, sigma), to_params, summary, draws)


def eight_schools_noncentered() -> Posterior:
    data, summary, draws = _load("eight_schools-eight_schools_noncentered")
    y = torch.tensor(data["y"], dtype=torch.float)
    sigma = torch.tensor(data["sigma"], dtype=torch.float)

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("J", len(y)):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)

    def to_params(d):
        mu, tau = d["mu"].reshape(-1, 1), d["tau"].reshape(-1, 1)
        theta = mu + tau * d["eta"].reshape(mu.shape[0], -1)
        return {"mu": mu[:, 0], "tau": tau[:, 0], **_flatten("theta", theta)}

    return Posterior("eight_schools_noncentered", model, (y, sigma), to_params, summary, draws)


def diamonds() -> Posterior:
    """brms linear regression, N = 5000, 24 strongly correlated predictors (26 parameters)."""
    data, summary, draws = _load("diamonds-diamonds")
    x = torch.tensor(data["X"], dtype=torch.float)[:, 1:]
    xc = x - x.mean(0)
    y = torch.tensor(data["Y"], dtype=torch.float)

    def model(xc, y):
        b = pyro.sample("b", dist.Normal(torch.zeros(xc.shape[1]), 1.0).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
        sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
        mean = intercept + (b * xc).sum(-1)
        with pyro.plate("N", len(y)):
            pyro.sample("Y", dist.Normal(mean, sigma), obs=y)

    def to_params(d):
        out = _flatten("b", d["b"])
        out.update(Intercept=d["Intercept"].reshape(-1), sigma=d["sigma"].reshape(-1))
        return out

    return Posterior("diamonds", model, (xc, y), to_params, summary, draws)


def kilpisjarvi() -> Posterior:
    """Regression on the uncentred year: alpha and beta almost perfectly correlated."""
    data, summary, draws = _load("kilpisjarvi_mod-kilpisjarvi")
    x = torch.tensor(data["x"], dtype=torch.float)
    y = torch.tensor(data["y"], dtype=torch.float)
    prior = {k: float(data[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta")}

    def model(x, y):
        alpha = pyro.sample("alpha", dist.Normal(prior["pmualpha"], prior["psalpha"]))
        beta = pyro.sample("beta", dist.Normal(prior["pmubeta"], prior["psbeta"]))
        sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("N", len(y)):
            mean = alpha + beta * x
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    def to_params(d):
        return {k: d[k].reshape(-1) for k in ("alpha", "beta", "sigma")}

    return Posterior(
        "kilpisjarvi", model, (x, y), to_params, summary, draws, extra={"prior": prior}
    )


def sblrc_blr() -> Posterior:
    data, summary, draws = _load("sblrc-blr")
    x = torch.tensor(data["X"], dtype=torch.float)
    y = torch.tensor(data["y"], dtype=torch.float)

    def model(x, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
        with pyro.plate("N", len(y)):
            mean = (beta * x).sum(-1)
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    def to_params(d):
        return {**_flatten("beta", d["beta"]), "sigma": d["sigma"].reshape(-1)}

    return Posterior("sblrc_blr", model, (x, y), to_params, summary, draws)


def ar_k() -> Posterior:
    data, summary, draws = _load("arK-arK")
    k = int(data["K"])
    y = torch.tensor(data["y"], dtype=torch.float)
    lags = torch.stack([y[k - j : len(y) - j] for j in range(1, k + 1)], -1)  # (T - K, K)
    target = y[k:]

    def model(lags, target):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(lags.shape[1]), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
        with pyro.plate("T", len(target)):
            mean = alpha + (beta * lags).sum(-1)
            pyro.sample("y", dist.Normal(mean, sigma), obs=target)

    def to_params(d):
        return {
            "alpha": d["alpha"].reshape(-1),
            **_flatten("beta", d["beta"]),
            "sigma": d["sigma"].reshape(-1),
        }

    return Posterior("arK", model, (lags, target), to_params, summary, draws)


def garch11() -> Posterior:
    """GARCH(1,1) with flat priors; beta1 = (1 - alpha1) u keeps its support fixed."""
    data, summary, draws = _load("garch-garch11")
    y = torch.tensor(data["y"], dtype=torch.float)
    sigma1 = float(data["sigma1"])

    def model(y):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        alpha0 = pyro.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
        alpha1 = pyro.sample("alpha1", dist.Uniform(0.0, 1.0))
        u = pyro.sample("u", dist.Uniform(0.0, 1.0))
        beta1 = (1.0 - alpha1) * u
        pyro.factor("beta1_jacobian", torch.log1p(-alpha1))  # flat on beta1, not on u
        var = torch.full_like(mu, sigma1**2)
        scales = [var.sqrt()]
        for t in range(1, len(y)):
            var = alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * var
            scales.append(var.sqrt())
        # Scalars are () in a plain run and (S, 1) under a vectorised draw plate: join on
        # the last dim either way.
        scale = torch.cat([v.reshape(v.shape or (1,)) for v in scales], -1)
        with pyro.plate("T", len(y)):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    def to_params(d):
        alpha1 = d["alpha1"].reshape(-1)
        return {
            "mu": d["mu"].reshape(-1),
            "alpha0": d["alpha0"].reshape(-1),
            "alpha1": alpha1,
            "beta1": (1.0 - alpha1) * d["u"].reshape(-1),
        }

    return Posterior("garch11", model, (y,), to_params, summary, draws)


def low_dim_gauss_mix() -> Posterior:
    """Two-component mixture with ordered means (N = 1000)."""
    data, summary, draws = _load("low_dim_gauss_mix-low_dim_gauss_mix")
    y = torch.tensor(data["y"], dtype=torch.float)

    def model(y):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
        pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum(-1))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0 * torch.ones(2)).to_event(1))
        theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
        weights = torch.stack([theta, 1.0 - theta], -1)
        with pyro.plate("N", len(y)):
            mixture = dist.MixtureSameFamily(
                dist.Categorical(weights),
                dist.Normal(mu, sigma),
            )
            pyro.sample("y", mixture, obs=y)

    def to_params(d):
        return {
            **_flatten("mu", d["mu"]),
            **_flatten("sigma", d["sigma"]),
            "theta": d["theta"].reshape(-1),
        }

    return Posterior("low_dim_gauss_mix", model, (y,), to_params, summary, draws)


def funnel(dim: int = 10) -> Posterior:
    """Neal's funnel: v ~ N(0, 3), x_i ~ N(0, exp(v / 2)). Scored on v and log|x_i|."""

    def model():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        with pyro.plate("i", dim - 1):
            pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    def to_params(d):
        out = {"v": d["v"].reshape(-1)}
        logabs = d["x"].reshape(d["x"].shape[0], -1).abs().log()
        out.update({f"log|x[{i + 1}]|": logabs[:, i] for i in range(dim - 1)})
        return out

    # E log|x| = -(gamma + log 2) / 2, Var = 9 / 4 + pi^2 / 8
    lx = {"mean": -(0.5772156649 + math.log(2.0)) / 2, "sd": math.sqrt(9 / 4 + math.pi**2 / 8)}
    reference = {"v": {"mean": 0.0, "sd": 3.0}, **{f"log|x[{i + 1}]|": lx for i in range(dim - 1)}}
    return Posterior(f"funnel_d{dim}", model, (), to_params, reference, None, log_z=0.0)


# Rezende & Mohamed (2015), section 6.1, on the box [-4, 4]^2 (U2-U4 do not confine z1; the
# paper's figures show this box): z ~ Uniform(-4, 4)^2, p(z) proportional to exp(-U(z)).
def _w1(z1):
    return torch.sin(2 * math.pi * z1 / 4)


def _energy(name, z):
    z1, z2 = z[..., 0], z[..., 1]
    w1 = _w1(z1)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    if name == "U1":
        ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
        modes = torch.logsumexp(
            torch.stack([-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2]), 0
        )
        return ring - modes
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "U3":
        a, b = -0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2
        return -torch.logsumexp(torch.stack([a, b]), 0)
    a, b = -0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2
    return -torch.logsumexp(torch.stack([a, b]), 0)


TWO_MODES = {"weights": (0.3, 0.7), "at": (-3.0, 3.0), "sd": (0.5, 1.0), "prior_sd": 10.0}


def two_modes(dim: int = 4) -> Posterior:
    """Two well-separated Gaussian modes of unequal weight and width in ``dim`` dimensions: a
    broad normal prior times a mixture factor (0.3 N(-3, 0.5^2 I) + 0.7 N(3, I)). Exact
    reference: the prior times each component is again Gaussian, so the posterior is a
    two-component mixture with known weights. ``left`` (the share of draws with
    ``x[1] < 0``) is scored against the left mode's weight as a Bernoulli (sd sqrt(p(1-p)))."""
    weights, at, sd, prior_sd = (TWO_MODES[k] for k in ("weights", "at", "sd", "prior_sd"))

    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros(dim), prior_sd).to_event(1))
        parts = [
            math.log(w) + dist.Normal(m, s).log_prob(x).sum(-1)
            for w, m, s in zip(weights, at, sd, strict=True)
        ]
        pyro.factor("modes", torch.logsumexp(torch.stack(parts), 0))

    # N(x; m, s^2) N(x; 0, p^2) = N(m; 0, s^2 + p^2) N(x; m', v'), per coordinate
    log_w = torch.tensor(
        [
            math.log(w)
            + dim * float(dist.Normal(0.0, math.sqrt(s**2 + prior_sd**2)).log_prob(torch.tensor(m)))
            for w, m, s in zip(weights, at, sd, strict=True)
        ]
    )
    post_w = torch.softmax(log_w, 0).tolist()
    var = [1 / (1 / s**2 + 1 / prior_sd**2) for s in sd]
    loc = [v * m / s**2 for v, m, s in zip(var, at, sd, strict=True)]
    mean = sum(w * m for w, m in zip(post_w, loc, strict=True))
    second = sum(w * (v + m**2) for w, v, m in zip(post_w, var, loc, strict=True))
    coordinate = {"mean": mean, "sd": math.sqrt(second - mean**2)}
    left = post_w[0]
    reference = {f"x[{i + 1}]": coordinate for i in range(dim)}
    reference["left"] = {"mean": left, "sd": math.sqrt(left * (1 - left))}

    def to_params(d):
        x = d["x"].reshape(d["x"].shape[0], dim)
        return {**_flatten("x", x), "left": (x[:, 0] < 0).double()}

    return Posterior(f"two_modes_d{dim}", model, (), to_params, reference, None)


def heavy_tails(dim: int = 3, df: float = 1.5) -> Posterior:
    """Independent Student-t coordinates with ``df = 1.5`` (no finite variance): scored on
    ``log|x_i|``, whose mean and sd are finite (by quadrature)."""

    def model():
        pyro.sample("x", dist.StudentT(df, torch.zeros(dim), 1.0).to_event(1))

    r = torch.linspace(-30.0, 30.0, 600_001, dtype=torch.float64)  # r = log|x|
    t = dist.StudentT(torch.tensor(df, dtype=torch.float64))
    density = 2 * t.log_prob(r.exp()).exp() * r.exp()  # of log|x|
    density = density / density.sum()
    mean = float((density * r).sum())
    lx = {"mean": mean, "sd": float((density * (r - mean) ** 2).sum().sqrt())}

    def to_params(d):
        logabs = d["x"].reshape(d["x"].shape[0], dim).abs().log()
        return {f"log|x[{i + 1}]|": logabs[:, i] for i in range(dim)}

    reference = {f"log|x[{i + 1}]|": lx for i in range(dim)}
    return Posterior(f"heavy_tails_d{dim}", model, (), to_params, reference, None, log_z=0.0)


def energy(name: str) -> Posterior:
    """A Rezende-Mohamed energy; reference moments, draws and log Z by quadrature on a grid."""

    def model():
        z = pyro.sample("z", dist.Uniform(-4.0 * torch.ones(2), 4.0).to_event(1))
        pyro.factor("energy", -_energy(name, z))

    n, half = 1601, 4.0
    grid = torch.linspace(-half, half, n, dtype=torch.float64)
    cell = (grid[1] - grid[0]) ** 2
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    log_p = -_energy(name, z) + math.log(1 / 64)  # the Uniform prior's density
    log_z = float(torch.logsumexp(log_p, 0) + math.log(cell))
    weights = torch.softmax(log_p, 0)
    mean = (weights[:, None] * z).sum(0)
    sd = ((weights[:, None] * (z - mean) ** 2).sum(0)).sqrt()
    reference = {f"z[{i + 1}]": {"mean": float(mean[i]), "sd": float(sd[i])} for i in range(2)}
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(weights, 10000, replacement=True, generator=g)
    jitter = (torch.rand(10000, 2, generator=g, dtype=torch.float64) - 0.5) * (grid[1] - grid[0])
    draws_ = z[idx] + jitter
    ref_draws = {f"z[{i + 1}]": draws_[:, i] for i in range(2)}

    def to_params(d):
        return _flatten("z", d["z"].reshape(-1, 2))

    return Posterior(name, model, (), to_params, reference, ref_draws, log_z=log_z)


def logistic_regression() -> Posterior:
    """Bayesian logistic regression on fixed synthetic data (N = 200, 5 features + intercept).

    Reference: ``benchmarks/references/logistic_regression.json``, made by
    ``python -m benchmarks.make_references`` (see there).
    """
    x, y = (t.to(torch.get_default_dtype()) for t in logistic_data())

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 2.5).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 2.5))
        with pyro.plate("N", len(y)):
            logits = b + (w * x).sum(-1)
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    def to_params(d):
        return {**_flatten("w", d["w"]), "b": d["b"].reshape(-1)}

    summary, draws = _stored_reference("logistic_regression")
    return Posterior("logistic_regression", model, (x, y), to_params, summary, draws)


def _stored_reference(name: str):
    """``(summary, draws)`` from ``references/<name>.json`` (``make_references``), or empty."""
    path = Path(__file__).parent / "references" / f"{name}.json"
    if not path.exists():
        return {}, None
    ref = json.loads(path.read_text())
    draws = {k: torch.tensor(v, dtype=torch.float64) for k, v in ref["draws"].items()}
    return ref["parameters"], draws


HIERARCHICAL_LOGISTIC = {"groups": 24, "per_group": 8, "mu": 0.5, "sigma": 0.5, "beta": (1.0, -0.5)}


def hierarchical_logistic_data():
    """Fixed synthetic data: 24 groups of 8 Bernoulli outcomes, 2 predictors. With so few
    outcomes per group the group scale is weakly identified: the centred form is a funnel."""
    c = HIERARCHICAL_LOGISTIC
    g = torch.Generator().manual_seed(0)
    group = torch.arange(c["groups"]).repeat_interleave(c["per_group"])
    x = torch.randn(len(group), 2, generator=g, dtype=torch.float64)
    a = c["mu"] + c["sigma"] * torch.randn(c["groups"], generator=g, dtype=torch.float64)
    logits = a[group] + x @ torch.tensor(c["beta"], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(logits), generator=g)
    return x, group, y


def hierarchical_logistic_centered() -> Posterior:
    """A centred hierarchical logistic regression (24 groups): ``a_j ~ N(mu, sigma)``,
    ``y ~ Bernoulli(logit = a_group + x beta)``.

    Reference: ``benchmarks/references/hierarchical_logistic_centered.json``, NUTS on the
    non-centred form (``python -m benchmarks.make_references --hierarchical``, needs the
    ``bench`` extra; see there).
    """
    x, group, y = hierarchical_logistic_data()
    x = x.to(torch.get_default_dtype())
    y = y.to(torch.get_default_dtype())
    groups = HIERARCHICAL_LOGISTIC["groups"]

    def model(x, group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("groups", groups):
            a = pyro.sample("a", dist.Normal(mu, sigma))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("N", len(y)):
            logits = a[..., group] + (x * beta).sum(-1)
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    def to_params(d):
        return {
            "mu": d["mu"].reshape(-1),
            "sigma": d["sigma"].reshape(-1),
            **_flatten("a", d["a"].reshape(d["a"].shape[0], -1)),
            **_flatten("beta", d["beta"].reshape(d["beta"].shape[0], -1)),
        }

    summary, draws = _stored_reference("hierarchical_logistic_centered")
    return Posterior(
        "hierarchical_logistic_centered", model, (x, group, y), to_params, summary, draws
    )


def logistic_data():
    # Explicit float32: the draws of a generator depend on the dtype, and the data must not
    # change with torch's default dtype.
    g = torch.Generator().manual_seed(2015)
    x = torch.randn(200, 5, generator=g, dtype=torch.float32)
    x[:, 1] = 0.8 * x[:, 0] + 0.6 * x[:, 1]  # correlated features
    true_w = torch.tensor([1.5, -1.0, 0.5, 0.0, 2.0], dtype=torch.float32)
    p = torch.sigmoid(x @ true_w - 0.5)
    y = torch.bernoulli(p, generator=g)
    return x, y


def score(posterior: Posterior, draws: dict) -> dict:
    """max/median |Δmean|/sd_ref and |log(sd/sd_ref)|, and max W1/sd_ref where draws exist."""
    params = posterior.to_params(draws)
    dmean, dlogsd, w1 = [], [], []
    for name, ref in posterior.reference.items():
        x = params[name].double()
        dmean.append(abs(float(x.mean()) - ref["mean"]) / ref["sd"])
        sd = float(x.std())  # 0 where every draw is one proposal (a collapsed answer)
        dlogsd.append(abs(math.log(sd / ref["sd"])) if sd > 0 else math.inf)
        if posterior.reference_draws is not None and name in posterior.reference_draws:
            w1.append(wasserstein1(x, posterior.reference_draws[name]) / ref["sd"])
    t = torch.tensor
    out = {
        "max_dmean": max(dmean),
        "med_dmean": float(t(dmean).median()),
        "max_dlogsd": max(dlogsd),
        "med_dlogsd": float(t(dlogsd).median()),
    }
    if w1:
        out["max_w1"] = max(w1)
    if "left" in posterior.reference:  # a two-mode target: the left mode's weight
        out["left_weight"] = float(params["left"].double().mean())
    return out


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """1-D Wasserstein-1 distance between two samples (via quantile functions)."""
    q = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    return float((torch.quantile(a.double(), q) - torch.quantile(b.double(), q)).abs().mean())


def exact_draws(posterior: Posterior, num: int, seed: int = 0) -> dict:
    """Draws from the exact posterior where we can make them (the funnel: its prior)."""
    if not posterior.name.startswith("funnel"):
        raise ValueError("exact draws only for the funnel")
    g = torch.Generator().manual_seed(seed)
    dim = len(posterior.reference)
    v = 3.0 * torch.randn(num, generator=g)
    x = torch.randn(num, dim - 1, generator=g) * torch.exp(v / 2)[:, None]
    return {"v": v, "x": x}


# Added for `infer` (issue "A NUTS-grade posterior in one call"): scored by benchmarks.infer,
# not part of the accuracy set's default list.
ADDED = {
    "funnel_d50": functools.partial(funnel, 50),
    "two_modes_d4": two_modes,
    "heavy_tails_d3": heavy_tails,
    "hierarchical_logistic_centered": hierarchical_logistic_centered,
}
# references computed here, no posteriordb: exactly, or stored in references/
ANALYTIC = ("funnel_d10", "U1", "U2", "U3", "U4", *ADDED)
OWN_REFERENCES = ("logistic_regression", "hierarchical_logistic_centered")


def require_posteriordb(names) -> None:
    """Stop at once, saying where the references come from, if a posterior needs them."""
    missing = [n for n in names if n not in ANALYTIC and n not in OWN_REFERENCES]
    if missing and not POSTERIORDB.exists():
        raise SystemExit(
            f"benchmarks: {', '.join(missing)} need the posteriordb reference posteriors, "
            f"looked for in {POSTERIORDB} (folders of data.json, reference_summary.json and "
            "reference_draws_2000.json from stan-dev/posteriordb). Set PYROFLOWS_POSTERIORDB "
            f"to their folder, or run only --posteriors {' '.join(ANALYTIC)} logistic_regression."
        )


POSTERIORS = {
    "eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools_centered": eight_schools_centered,
    "diamonds": diamonds,
    "kilpisjarvi": kilpisjarvi,
    "sblrc_blr": sblrc_blr,
    "arK": ar_k,
    "garch11": garch11,
    "low_dim_gauss_mix": low_dim_gauss_mix,
    "funnel_d10": funnel,
    **{name: functools.partial(energy, name) for name in ("U1", "U2", "U3", "U4")},
    "logistic_regression": logistic_regression,
}
