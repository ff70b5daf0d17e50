"""Accuracy and cost of AutoFlowGuide against Pyro's guides on reference posteriors.

Every guide is trained with plain ``SVI`` + ``Trace_ELBO`` (1 particle) for the same number
of steps with the same learning-rate schedule (ClippedAdam, lr 1e-2 decaying to 1e-3), then
scored on 10^4 draws: max |Δmean|/sd and max |log(sd/sd_ref)| per parameter (for the funnel,
v and log|x_i|, whose truth is analytic), the exact KL(q||p) = -ELBO + log Z where log Z is
known, and the median milliseconds per SVI step. The noise floor (the same metrics on 10^4
exact draws, or on the 2000 reference draws against their own summary) is printed alongside.

    python -m benchmarks.guides                      # all posteriors, all guides
    python -m benchmarks.guides --posterior funnel_d10 --guides AutoNormal nsf --steps 2000
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import iterated, spline_coupling
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.poutine.util import site_is_subsample

from pyroflows import AutoFlowGuide

from .posteriors import POSTERIORS, exact_draws, score

OUT = Path(__file__).parent / "results"


def guide_factories():
    return {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoIAFNormal": AutoIAFNormal,
        "Pyro spline_coupling x4": lambda m: AutoNormalizingFlow(
            m, functools.partial(iterated, 4, spline_coupling)
        ),
        "AutoFlowGuide (default: iaf x2)": AutoFlowGuide,
        "iaf x1": functools.partial(AutoFlowGuide, num_layers=1),
        "iaf x4": functools.partial(AutoFlowGuide, num_layers=4),
        "iaf x2 studentt": functools.partial(AutoFlowGuide, base="studentt"),
        "nsf x4": functools.partial(AutoFlowGuide, flow="nsf", num_layers=4),
        "nsf x2": functools.partial(AutoFlowGuide, flow="nsf", num_layers=2),
        "realnvp x4": functools.partial(AutoFlowGuide, flow="realnvp", num_layers=4),
        "nsf_ar x2": functools.partial(AutoFlowGuide, flow="nsf_ar", num_layers=2),
    }


def fit(model, guide, args, steps: int, seed: int) -> list[float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        svi.step(*args)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def guide_draws(model, guide, args, num: int) -> dict:
    """num draws of every latent site, through the guide itself (works for any autoguide)."""
    with pyro.plate("_draws", num, dim=-2):  # left of the models' single plate dim
        trace = poutine.trace(guide).get_trace(*args)
    return {
        name: site["value"].reshape(num, -1).squeeze(-1)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not name.startswith("_") and not site_is_subsample(site)
    }


@torch.no_grad()
def kl_estimate(posterior, guide, num: int) -> float | None:
    if posterior.log_z is None:
        return None
    elbo = Trace_ELBO(num_particles=num, vectorize_particles=True, max_plate_nesting=1)
    return elbo.loss(posterior.model, guide, *posterior.args) + posterior.log_z


def noise_floor(posterior, num: int) -> dict:
    if posterior.name.startswith("funnel"):
        return score(posterior, exact_draws(posterior, num))
    draws = posterior.reference_draws
    params = {k: v for k, v in draws.items()}
    return score(
        type(posterior)(posterior.name, None, (), lambda d: d, posterior.reference, None), params
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posterior", nargs="*", default=list(POSTERIORS))
    parser.add_argument("--guides", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factories = guide_factories()
    names = args.guides or list(factories)
    results, floors = [], {}
    for pname in args.posterior:
        posterior = POSTERIORS[pname]()
        floor = floors[pname] = noise_floor(posterior, args.draws)
        print(f"## {pname}  noise floor: " + ", ".join(f"{k}={v:.3f}" for k, v in floor.items()))
        for gname in names:
            for seed in args.seeds:
                guide = factories[gname](posterior.model)
                times = fit(posterior.model, guide, posterior.args, args.steps, seed)
                pyro.set_rng_seed(seed + 1000)
                metrics = score(
                    posterior, guide_draws(posterior.model, guide, posterior.args, args.draws)
                )
                metrics["kl"] = kl_estimate(posterior, guide, args.draws)
                metrics["ms_per_step"] = 1e3 * statistics.median(times)
                row = {"posterior": pname, "guide": gname, "seed": seed, **metrics}
                results.append(row)
                print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = "_".join(args.posterior)
    (OUT / f"guides_{tag}.json").write_text(json.dumps(results, indent=1))
    (OUT / f"guides_{tag}.md").write_text(render(results, floors, args))


def render(results: list[dict], floors: dict, args) -> str:
    lines = [
        "# Guide accuracy on reference posteriors",
        "",
        f"SVI + Trace_ELBO, 1 particle, {args.steps} steps, ClippedAdam lr 1e-2 -> 1e-3, "
        f"{args.threads} thread(s); metrics on {args.draws} draws. Funnel: v and log|x_i| against "
        "the analytic truth, KL = -ELBO (log Z = 0). Eight schools: posteriordb NUTS reference.",
    ]
    for posterior in dict.fromkeys(r["posterior"] for r in results):
        floor = floors[posterior]
        lines += [
            "",
            f"## {posterior}",
            "",
            f"Noise floor (exact/reference draws): max|Δmean|/sd {floor['max_dmean']:.3f}, "
            f"max|log sd ratio| {floor['max_dlogsd']:.3f}",
            "",
            "| guide | max abs Δmean/sd | max abs log sd ratio | max W1/sd | KL | ms/step |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            if r["posterior"] != posterior:
                continue
            w1 = f"{r['max_w1']:.3f}" if "max_w1" in r else "—"
            kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "—"
            lines.append(
                f"| {r['guide']} | {r['max_dmean']:.3f} | {r['max_dlogsd']:.3f} | {w1} | {kl} "
                f"| {r['ms_per_step']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
