"""Reference posterior for the logistic regression (no posteriordb entry exists for it).

The posterior is smooth and unimodal, so importance sampling from a fitted multivariate
normal is exact up to Monte Carlo error when the weights are well behaved: 200,000
proposals, Pareto-smoothed weights, accepted only if k-hat < 0.5 (finite variance). Means
and sds are weighted estimates; 2000 draws are resampled for Wasserstein distances.

    python -m benchmarks.make_references
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyroflows import fit, importance_resample

from .posteriors import logistic_regression

OUT = Path(__file__).parent / "references" / "logistic_regression.json"


def main() -> None:
    torch.set_default_dtype(torch.float64)
    posterior = logistic_regression()
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(posterior.model)
    fit(
        posterior.model,
        guide,
        *posterior.args,
        num_steps=10000,
        seed=0,
        progress=False,
        diagnose=False,
    )
    out = importance_resample(
        posterior.model,
        guide,
        *posterior.args,
        num_samples=200_000,
        num_draws=2000,
        adapt=True,
        seed=0,
    )
    k = out.diagnostic.k_hat
    if not k < 0.5:
        raise SystemExit(f"k-hat {k:.2f} >= 0.5: importance sampling is not reliable here")
    weights = out.diagnostic.log_weights.exp()
    params = posterior.to_params(out.draws.values)
    summary = {}
    for name, x in params.items():
        mean = float((weights * x).sum())
        sd = math.sqrt(float((weights * (x - mean) ** 2).sum()))
        summary[name] = {"mean": mean, "sd": sd}
    draws = {k_: v.tolist() for k_, v in posterior.to_params(out.samples).items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "method": "PSIS importance sampling from a fitted AutoMultivariateNormal, "
                "200000 proposals, moment matching",
                "k_hat": k,
                "ess": out.diagnostic.ess,
                "parameters": summary,
                "draws": draws,
            },
            indent=1,
        )
    )
    print(f"k-hat {k:.3f}, ESS {out.diagnostic.ess:.0f}; wrote {OUT}")


if __name__ == "__main__":
    main()
