"""Fixed-seed losses and draws of AutoFlowGuide over its main options, for refactors.

A refactor that claims "behaviour unchanged" runs this before and after and compares the two
files exactly (``python tests/data/behaviour_snapshot.py OUT.pt``; then
``python tests/data/behaviour_snapshot.py --compare A.pt B.pt``). Not part of the suite: bit
identity holds on one machine and torch build, not across them.
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch

import pyroflows
from pyroflows import AutoFlowGuide

Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])
SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])


def eight_schools(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(3), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)


def regression_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(50, generator=g)
    return x, y


CASES = {
    "default_prior_start": (eight_schools, (Y, SIGMA), {}, {}),
    "laplace_start": (regression, regression_data(), {}, {}),
    "studentt_base": (eight_schools, (Y, SIGMA), {"base": "studentt", "init": "prior"}, {}),
    "stl": (regression, regression_data(), {"flow": "realnvp"}, {"loss": "stl"}),
    "dreg": (eight_schools, (Y, SIGMA), {"flow": "nsf"}, {"loss": "dreg", "num_particles": 4}),
    "coupling_only": (eight_schools, (Y, SIGMA), {"flow": "realnvp", "num_layers": 2}, {}),
}


def snapshot() -> dict:
    out = {}
    for name, (model, args, guide_kwargs, fit_kwargs) in CASES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(model, **guide_kwargs)
        result = pyroflows.fit(
            model,
            guide,
            *args,
            num_steps=200,
            progress=False,
            seed=0,
            diagnose=False,
            **fit_kwargs,
        )
        draws = guide.sample_posterior(500, seed=3)
        out[name] = {
            "losses": torch.tensor(result.losses, dtype=torch.float64),
            "draws": draws,
            "state": {k: v.clone() for k, v in guide.state_dict().items() if torch.is_tensor(v)},
        }
    return out


def compare(a: dict, b: dict) -> list[str]:
    problems = []
    for case in a:
        for part in ("losses", "draws", "state"):
            x, y = a[case][part], b[case][part]
            if torch.is_tensor(x):
                x, y = {"": x}, {"": y}
            if set(x) != set(y):
                problems.append(f"{case}.{part}: keys {sorted(x)} != {sorted(y)}")
                continue
            for key in x:
                if not torch.equal(x[key], y[key]):
                    diff = (x[key].double() - y[key].double()).abs().max().item()
                    problems.append(f"{case}.{part}[{key}]: differs by up to {diff:.3g}")
    return problems


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        found = compare(torch.load(sys.argv[2]), torch.load(sys.argv[3]))
        print("\n".join(found) or "bit-identical")
        sys.exit(1 if found else 0)
    torch.save(snapshot(), sys.argv[1])
