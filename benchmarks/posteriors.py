"""Pyro ports of the reference posteriors, and how to score a set of draws against them.

Each posterior is a ``Posterior`` with a model, its arguments, a function that maps a dict of
draws (``{site: tensor (S, ...)}``) to the named scalar parameters of the reference, and the
reference itself: posteriordb summaries and draws (``../shared/posteriordb``), or the exact
answer (Neal's funnel).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

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


def score(posterior: Posterior, draws: dict) -> dict:
    """max/median |Δmean|/sd_ref and |log(sd/sd_ref)|, and max W1/sd_ref where draws exist."""
    params = posterior.to_params(draws)
    dmean, dlogsd, w1 = [], [], []
    for name, ref in posterior.reference.items():
        x = params[name].double()
        dmean.append(abs(float(x.mean()) - ref["mean"]) / ref["sd"])
        dlogsd.append(abs(math.log(float(x.std()) / ref["sd"])))
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


POSTERIORS = {"funnel_d10": funnel, "eight_schools_centered": eight_schools_centered}
