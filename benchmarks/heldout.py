"""The held-out set: six posteriordb posteriors nothing in ``infer`` was tuned on.

Frozen on 2026-12-01, before any of them was run through ``infer``: the ports below, their
data (``heldout/*.json``, copied from posteriordb's data files) and their references, and
nothing about the route is to be changed to suit them. They are scored by the same rule as
the benchmark set (``posteriors.score``), and reported apart from it.

posteriordb's own reference draws are zipped, which the copy this project works from does
not hold; the references here are made the way posteriordb made its own (long NUTS runs,
checked): NumPyro's NUTS, 4 chains of 2,000 warm-up and 10,000 draws at target acceptance
0.95, on the model's non-centred form where it has a hierarchy (the same posterior, no
funnel), accepted only with zero divergences and every R-hat below 1.01
(``python -m benchmarks.make_references --heldout``, the ``bench`` extra).

What each one asks of ``infer``, chosen for variety rather than for any stage:

- ``dugongs``: nonlinear growth curve, a bounded ``lambda`` in (0.5, 1), a Gamma(1e-4, 1e-4)
  precision (4 parameters).
- ``surgical``: centred hierarchy of 12 hospitals, binomial, inverse-gamma variance (14).
- ``seeds``: centred random-effects logistic regression, Gamma(1e-3, 1e-3) precision (26).
- ``rats``: two centred hierarchies over 30 rats, flat priors on three scales,
  observations indexing the rats from a data plate (65).
- ``glm_poisson``: cubic Poisson regression under bounded uniform priors (4).
- ``arma11``: ARMA(1, 1) written as the user would, a Python loop over 200 time points (4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from .posteriors import Posterior

DATA = Path(__file__).parent / "heldout"
REFERENCES = Path(__file__).parent / "references"


def load_data(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def stored_reference(name: str):
    """``(summary, draws)`` from ``references/heldout_<name>.json``; empty before it is made."""
    path = REFERENCES / f"heldout_{name}.json"
    if not path.exists():
        return {}, None
    stored = json.loads(path.read_text())
    draws = {k: torch.tensor(v, dtype=torch.float64) for k, v in stored["draws"].items()}
    return stored["parameters"], draws


def named_columns(name: str, value: torch.Tensor) -> dict:
    """(S, J) -> {name[1]: (S,), ...} (Stan's 1-based names); (S,) -> {name: (S,)}."""
    value = value.reshape(value.shape[0], -1)
    if value.shape[1] == 1:
        return {name: value[:, 0]}
    return {f"{name}[{j + 1}]": value[:, j] for j in range(value.shape[1])}


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.get_default_dtype())


def posterior(name, model, args, params) -> Posterior:
    summary, draws = stored_reference(name)
    return Posterior(name, model, args, params, summary, draws)


def dugongs() -> Posterior:
    data = load_data("dugongs")

    def model(x, y):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 1000.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 1000.0))
        lam = pyro.sample("lambda", dist.Uniform(0.5, 1.0))
        tau = pyro.sample("tau", dist.Gamma(1e-4, 1e-4))
        with pyro.plate("N", len(y)):
            pyro.sample("y", dist.Normal(alpha - beta * lam**x, tau.rsqrt()), obs=y)

    def params(d):
        return {k: d[k].reshape(-1) for k in ("alpha", "beta", "lambda", "tau")}

    return posterior("dugongs", model, (tensor(data["x"]), tensor(data["Y"])), params)


def surgical() -> Posterior:
    data = load_data("surgical")

    def model(n, r):
        mu = pyro.sample("mu", dist.Normal(0.0, 1000.0))
        sigmasq = pyro.sample("sigmasq", dist.InverseGamma(1e-3, 1e-3))
        with pyro.plate("hospitals", len(n)):
            b = pyro.sample("b", dist.Normal(mu, sigmasq.sqrt()))
            pyro.sample("r", dist.Binomial(n, logits=b), obs=r)

    def params(d):
        # the scale, not the variance: an inverse-gamma variance's sd is dominated by its tail
        return {"mu": d["mu"].reshape(-1), "sigma": d["sigmasq"].reshape(-1).sqrt(),
                **named_columns("b", d["b"])}  # fmt: skip

    return posterior("surgical", model, (tensor(data["n"]), tensor(data["r"])), params)


def seeds() -> Posterior:
    data = load_data("seeds")

    def model(total, x1, x2, germinated):
        alpha0 = pyro.sample("alpha0", dist.Normal(0.0, 1000.0))
        alpha1 = pyro.sample("alpha1", dist.Normal(0.0, 1000.0))
        alpha12 = pyro.sample("alpha12", dist.Normal(0.0, 1000.0))
        alpha2 = pyro.sample("alpha2", dist.Normal(0.0, 1000.0))
        tau = pyro.sample("tau", dist.Gamma(1e-3, 1e-3))
        with pyro.plate("plates", len(total)):
            b = pyro.sample("b", dist.Normal(0.0, tau.rsqrt()))
            logits = alpha0 + alpha1 * x1 + alpha2 * x2 + alpha12 * x1 * x2 + b
            pyro.sample("n", dist.Binomial(total, logits=logits), obs=germinated)

    def params(d):
        fixed = {k: d[k].reshape(-1) for k in ("alpha0", "alpha1", "alpha12", "alpha2")}
        return {**fixed, "sigma": d["tau"].reshape(-1).rsqrt(), **named_columns("b", d["b"])}

    args = tuple(tensor(data[k]) for k in ("N", "x1", "x2", "n"))
    return posterior("seeds", model, args, params)


def rats() -> Posterior:
    data = load_data("rats")
    flat = dist.ImproperUniform(constraints.positive, (), ())

    def model(rat, x, y):
        mu_alpha = pyro.sample("mu_alpha", dist.Normal(0.0, 100.0))
        mu_beta = pyro.sample("mu_beta", dist.Normal(0.0, 100.0))
        sigma_y = pyro.sample("sigma_y", flat)
        sigma_alpha = pyro.sample("sigma_alpha", flat)
        sigma_beta = pyro.sample("sigma_beta", flat)
        with pyro.plate("rats", 30):
            alpha = pyro.sample("alpha", dist.Normal(mu_alpha, sigma_alpha))
            beta = pyro.sample("beta", dist.Normal(mu_beta, sigma_beta))
        with pyro.plate("points", len(y)):
            mean = alpha[..., rat] + beta[..., rat] * x
            pyro.sample("y", dist.Normal(mean, sigma_y), obs=y)

    scales = ("mu_alpha", "mu_beta", "sigma_y", "sigma_alpha", "sigma_beta")

    def params(d):
        locals_ = {**named_columns("alpha", d["alpha"]), **named_columns("beta", d["beta"])}
        return {**{k: d[k].reshape(-1) for k in scales}, **locals_}

    rat = torch.tensor(data["rat"]) - 1
    x = tensor(data["x"]) - data["xbar"]
    return posterior("rats", model, (rat, x, tensor(data["y"])), params)


def glm_poisson() -> Posterior:
    data = load_data("glm_poisson")

    def model(year, count):
        alpha = pyro.sample("alpha", dist.Uniform(-20.0, 20.0))
        beta1 = pyro.sample("beta1", dist.Uniform(-10.0, 10.0))
        beta2 = pyro.sample("beta2", dist.Uniform(-10.0, 10.0))
        beta3 = pyro.sample("beta3", dist.Uniform(-10.0, 10.0))
        with pyro.plate("years", len(year)):
            log_rate = alpha + beta1 * year + beta2 * year**2 + beta3 * year**3
            pyro.sample("C", dist.Poisson(log_rate.exp()), obs=count)

    def params(d):
        return {k: d[k].reshape(-1) for k in ("alpha", "beta1", "beta2", "beta3")}

    return posterior("glm_poisson", model, (tensor(data["year"]), tensor(data["C"])), params)


def arma11() -> Posterior:
    data = load_data("arma11")

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
        theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
        err = [y[0] - (mu + phi * mu)]  # the error before the first point taken as 0
        for t in range(1, len(y)):
            err.append(y[t] - (mu + phi * y[t - 1] + theta * err[-1]))
        err = torch.stack(err, -1)
        pyro.factor("y", dist.Normal(0.0, sigma.unsqueeze(-1)).log_prob(err).sum(-1))

    def params(d):
        return {k: d[k].reshape(-1) for k in ("mu", "phi", "theta", "sigma")}

    return posterior("arma11", model, (tensor(data["y"]),), params)


HELDOUT = {
    "dugongs": dugongs,
    "surgical": surgical,
    "seeds": seeds,
    "rats": rats,
    "glm_poisson": glm_poisson,
    "arma11": arma11,
}
