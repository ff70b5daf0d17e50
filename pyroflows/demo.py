"""``pyroflows demo``: the main job on an embedded example, centred eight schools.

Fits Pyro's ``AutoNormal`` and runs ``infer`` (whose fitted ``AutoFlowGuide`` is shown on its
own too), then prints each one's posterior means and sds beside a reference and writes a PNG
of the marginals. The reference is posteriordb's (stan-dev/posteriordb, eight_schools: 10,000
draws of Stan's NUTS on the non-centred form of the same posterior).
"""

from __future__ import annotations

import sys
import time

__all__ = ["EIGHT_SCHOOLS", "REFERENCE", "eight_schools", "run_demo"]

# The demo runs in under a minute on 2 cores; infer's full route on this posterior takes
# about two (benchmarks/RESULTS.md), so it gets a budget and says what it reached in it.
INFER_BUDGET = 35.0

EIGHT_SCHOOLS = {
    "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}
# posteriordb reference_summary.json: (mean, sd) per parameter.
REFERENCE = {
    "mu": (4.411, 3.309),
    "tau": (3.602, 3.198),
    "theta[1]": (6.151, 5.616),
    "theta[2]": (4.940, 4.646),
    "theta[3]": (3.906, 5.281),
    "theta[4]": (4.796, 4.771),
    "theta[5]": (3.614, 4.615),
    "theta[6]": (4.051, 4.796),
    "theta[7]": (6.317, 5.003),
    "theta[8]": (4.884, 5.318),
}


def eight_schools(y, sigma):
    """Centred eight schools (Rubin 1981): the funnel that mean-field guides get wrong."""
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _params(samples: dict) -> dict:
    """``{site: draws}`` -> ``{parameter name: (S,) draws}`` in the reference's names."""
    out = {"mu": samples["mu"].reshape(-1), "tau": samples["tau"].reshape(-1)}
    theta = samples["theta"].reshape(samples["theta"].shape[0], -1)
    out.update({f"theta[{j + 1}]": theta[:, j] for j in range(theta.shape[1])})
    return out


def run_demo(out: str = "pyroflows_demo.png", seed: int = 0, file=None) -> dict:
    """Run the demo; returns ``{method: {parameter: (mean, sd)}}`` and the k-hats."""
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    from .diagnostics import psis_diagnostic
    from .fit import fit
    from .inference import infer

    file = file or sys.stdout
    y, sigma = (torch.tensor(EIGHT_SCHOOLS[k]) for k in ("y", "sigma"))
    print("pyroflows demo: centred eight schools (10 latent dimensions)", file=file)
    rows, k_hats, seconds = {}, {}, {}

    start = time.perf_counter()
    pyro.clear_param_store()
    normal = AutoNormal(eight_schools)
    fit(eight_schools, normal, y, sigma, num_steps=1500, seed=seed, diagnose=False)
    pyro.set_rng_seed(seed)
    k_hats["AutoNormal"] = psis_diagnostic(eight_schools, normal, y, sigma, num_samples=4000)
    predictive = pyro.infer.Predictive(eight_schools, guide=normal, num_samples=4000, parallel=True)
    draws = predictive(y, sigma)
    rows["AutoNormal"] = _params(draws)
    seconds["AutoNormal"] = time.perf_counter() - start

    start = time.perf_counter()
    posterior = infer(
        eight_schools, y, sigma, num_samples=4000, seed=seed, time_budget=INFER_BUDGET
    )
    seconds["infer"] = time.perf_counter() - start
    guide = posterior.guide
    pyro.set_rng_seed(seed)
    k_hats["AutoFlowGuide"] = psis_diagnostic(eight_schools, guide, y, sigma, num_samples=4000)
    rows["AutoFlowGuide"] = _params(guide.sample_posterior(4000, y, sigma, seed=seed))
    rows["infer"] = _params(posterior.samples)
    table = _table(rows, k_hats, posterior, seconds)
    print(table, file=file)
    print(posterior.route, file=file)
    _plot(rows, out)
    print(f"wrote {out}", file=file)
    return {"rows": rows, "k_hats": k_hats, "posterior": posterior}


def _table(rows, k_hats, posterior, seconds) -> str:
    methods = list(rows)
    header = f"{'parameter':<10} {'reference':>15}" + "".join(f" {m:>15}" for m in methods)
    lines = ["posterior mean (sd)", header]
    for name, (mean, sd) in REFERENCE.items():
        cells = "".join(
            f" {float(rows[m][name].mean()):>7.2f} ({float(rows[m][name].std()):5.2f})"
            for m in methods
        )
        lines.append(f"{name:<10} {mean:>7.2f} ({sd:5.2f})" + cells)
    worst = {
        m: max(abs(float(rows[m][n].mean()) - mu) / sd for n, (mu, sd) in REFERENCE.items())
        for m in methods
    }
    lines.append(f"{'worst |Δmean|/sd':<26}" + "".join(f" {worst[m]:>15.2f}" for m in methods))
    khat = {m: f"{k_hats[m].k_hat:.2f}" for m in k_hats}
    d = posterior.diagnostics
    khat["infer"] = f"R-hat {d['r_hat']:.2f}" if posterior.kind == "mcmc" else f"{d['k_hat']:.2f}"
    lines.append(f"{'PSIS k-hat':<26}" + "".join(f" {khat[m]:>15}" for m in methods))
    lines.append(
        f"(AutoNormal took {seconds['AutoNormal']:.0f} s; infer {seconds['infer']:.0f} s, "
        "its AutoFlowGuide column is the flow it fitted, before resampling or MCMC)"
    )
    return "\n".join(lines)


def _plot(rows, out) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    names = ["mu", "tau", "theta[1]"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(axes, names, strict=True):
        for method, params in rows.items():
            x = params[name].numpy()
            ax.hist(x, bins=80, range=(-15, 25), density=True, histtype="step", label=method)
        ax.axvline(REFERENCE[name][0], color="k", lw=1, ls="--", label="reference mean")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
