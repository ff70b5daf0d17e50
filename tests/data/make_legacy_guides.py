"""Save guides with the code of the day, for the test that later code still loads them.

``python tests/data/make_legacy_guides.py tests/data/legacy`` writes, per case, the whole
guide (``torch.save(guide)``), its ``state_dict()`` and 200 draws with a fixed seed;
``tests/test_legacy_state.py`` loads both with the current code and compares the draws.
Rerun only to add a new generation of files (never overwrite the old ones).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import pyroflows
from pyroflows import AutoFlowGuide


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, generator=g)
    return x, x @ torch.tensor([1.0, -2.0]) + 0.3 * torch.randn(30, generator=g)


CASES = {
    "iaf_laplace": {},  # the default guide; the Laplace start succeeds here
    "realnvp_prior_full": {"flow": "realnvp", "num_layers": 2, "init": "prior"},
    "nsf_studentt": {"flow": "nsf", "num_layers": 2, "base": "studentt", "init": "prior"},
}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = data()
    for name, kwargs in CASES.items():
        pyro.clear_param_store()
        guide = AutoFlowGuide(regression, name=f"legacy_{name}", **kwargs)
        pyroflows.fit(regression, guide, x, y, num_steps=50, progress=False, seed=0, diagnose=False)
        torch.save(guide, folder / f"{name}.guide.pt")
        torch.save(guide.state_dict(), folder / f"{name}.state.pt")
        torch.save(guide.sample_posterior(200, seed=5), folder / f"{name}.draws.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
