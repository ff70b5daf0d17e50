"""Reference posteriors made here (no posteriordb entry exists for them).

**logistic_regression**:
The posterior is smooth and unimodal, so importance sampling from a fitted multivariate
normal is exact up to Monte Carlo error when the weights are well behaved: 200,000
proposals, Pareto-smoothed weights, accepted only if k-hat < 0.5 (finite variance). Means
and sds are weighted estimates; 2000 draws are resampled for Wasserstein distances.

**hierarchical_logistic_centered** (``--hierarchical``, needs the ``bench`` extra): NumPyro's
NUTS on the model's non-centred form (``a = mu + sigma z``, the same posterior without the
funnel), 4 chains of 2,000 warm-up and 10,000 draws at target acceptance 0.95; accepted only
with zero divergences and every R-hat below 1.01. Means and sds over all 40,000 draws; 2,000
evenly thinned draws are kept for Wasserstein distances.

    python -m benchmarks.make_references                 # logistic_regression
    python -m benchmarks.make_references --hierarchical  # hierarchical_logistic_centered
    python -m benchmarks.make_references --heldout [names]  # the held-out set (heldout.py)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

from pyroflows import fit, importance_resample

from .posteriors import hierarchical_logistic_centered, logistic_regression

OUT = Path(__file__).parent / "references" / "logistic_regression.json"
HIERARCHICAL_OUT = OUT.parent / "hierarchical_logistic_centered.json"


def hierarchical() -> None:
    """NUTS on the non-centred form; refuses to write a reference with any divergence."""
    import jax
    import numpy as np
    import numpyro
    from numpyro.diagnostics import summary as numpyro_summary
    from numpyro.infer import MCMC, NUTS

    from .numpyro_ports import _array, hierarchical_logistic_noncentered

    numpyro.enable_x64()
    posterior = hierarchical_logistic_centered()
    args = tuple(_array(a) for a in posterior.args)
    kernel = NUTS(hierarchical_logistic_noncentered, target_accept_prob=0.95)
    mcmc = MCMC(
        kernel,
        num_warmup=2000,
        num_samples=10_000,
        num_chains=4,
        progress_bar=False,
        chain_method="sequential",
    )
    mcmc.run(jax.random.PRNGKey(0), *args, extra_fields=("diverging",))
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    grouped = mcmc.get_samples(group_by_chain=True)
    rhat = max(float(np.max(v["r_hat"])) for v in numpyro_summary(grouped).values())
    if divergences or not rhat < 1.01:
        raise SystemExit(f"{divergences} divergences, max R-hat {rhat:.4f}: no reference")
    flat = {
        k: torch.tensor(np.asarray(v), dtype=torch.float64)
        for k, v in mcmc.get_samples().items()
        if k in ("mu", "sigma", "a", "beta")
    }
    params = posterior.to_params(flat)
    summary = {k: {"mean": float(v.mean()), "sd": float(v.std())} for k, v in params.items()}
    keep = torch.linspace(0, len(flat["mu"]) - 1, 2000).round().long()
    HIERARCHICAL_OUT.write_text(
        json.dumps(
            {
                "method": "NumPyro NUTS on the non-centred form, 4 chains x (2000 warm-up + "
                "10000 draws), target acceptance 0.95",
                "divergences": divergences,
                "max_r_hat": rhat,
                "parameters": summary,
                "draws": {k: [round(x, 6) for x in v[keep].tolist()] for k, v in params.items()},
            },
            indent=1,
        )
    )
    print(f"0 divergences, max R-hat {rhat:.4f}; wrote {HIERARCHICAL_OUT}")


def heldout(names) -> None:
    """The held-out set's references (``heldout.py``): NUTS as for ``hierarchical``, on the
    non-centred form of the hierarchies; refuses to write one with any divergence."""
    import jax
    import numpy as np
    import numpyro
    from numpyro.diagnostics import summary as numpyro_summary
    from numpyro.infer import MCMC, NUTS, init_to_median, init_to_uniform

    from . import numpyro_ports
    from .heldout import HELDOUT, REFERENCES

    numpyro.enable_x64()
    torch.set_default_dtype(torch.float64)
    for name in names or HELDOUT:
        posterior = HELDOUT[name]()
        model, args = numpyro_ports.port(name, posterior)
        kwargs = {"centred": False} if name in numpyro_ports.HIERARCHICAL else {}
        # arma11 from the prior's medians: NUTS's uniform (-2, 2) starts put the MA coefficient
        # outside (-1, 1), where the errors grow as theta^t; chains stuck there (R-hat 60)
        init = init_to_median if name == "arma11" else init_to_uniform
        kernel = NUTS(model, target_accept_prob=0.95, init_strategy=init)
        mcmc = MCMC(kernel, num_warmup=2000, num_samples=10_000, num_chains=4,
                    progress_bar=False, chain_method="sequential")  # fmt: skip
        mcmc.run(jax.random.PRNGKey(0), *args, **kwargs, extra_fields=("diverging",))
        divergences = int(mcmc.get_extra_fields()["diverging"].sum())
        grouped = mcmc.get_samples(group_by_chain=True)
        rhat = max(float(np.nanmax(v["r_hat"])) for v in numpyro_summary(grouped).values())
        if divergences or not rhat < 1.01:
            raise SystemExit(f"{name}: {divergences} divergences, max R-hat {rhat:.4f}")
        flat = {k: torch.tensor(np.asarray(v)) for k, v in mcmc.get_samples().items()}
        params = posterior.to_params(flat)
        keep = torch.linspace(0, 40_000 - 1, 2000).round().long()
        (REFERENCES / f"heldout_{name}.json").write_text(
            json.dumps(
                {
                    "method": "NumPyro NUTS, 4 chains x (2000 warm-up + 10000 draws), target "
                    "acceptance 0.95" + (", non-centred form" if kwargs else ""),
                    "divergences": divergences,
                    "max_r_hat": rhat,
                    "parameters": {
                        k: {"mean": float(v.mean()), "sd": float(v.std())}
                        for k, v in params.items()
                    },
                    "draws": {
                        k: [round(x, 6) for x in v[keep].tolist()] for k, v in params.items()
                    },
                },
                indent=1,
            )
        )
        print(f"{name}: 0 divergences, max R-hat {rhat:.4f}", flush=True)


def main() -> None:
    if "--hierarchical" in sys.argv[1:]:
        hierarchical()
        return
    if "--heldout" in sys.argv[1:]:
        heldout(sys.argv[sys.argv.index("--heldout") + 1 :])
        return
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
