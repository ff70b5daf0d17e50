"""Milliseconds per SVI step: ``fit``'s compiled step against AutoNormal (the default run,
``benchmarks.step_cost``), AutoFlowGuide beside Pyro's guides, and scaling with dimension.

Every guide trains the same model with ``SVI`` + ``Trace_ELBO`` (1 particle; two rows
price ``fit``'s other objectives on the default guide) and
``pyro.optim.Adam``; steps of all guides are interleaved in shuffled order so that drift in
machine load hits them alike; the median over the timed steps is reported.

- eight schools (d = 10): AutoNormal, AutoMultivariateNormal, AutoIAFNormal, Pyro's
  ``AutoNormalizingFlow(iterated(4, spline_coupling))`` and AutoFlowGuide variants;
- a hierarchical model with d = 10, 100, 1000, 10000 group effects (``--scaling``):
  AutoNormal beside the default AutoFlowGuide.

    python -m benchmarks.cost                 # fit against AutoNormal: results/fast_path.md
    python -m benchmarks.cost --convergence   # wall time to convergence, 14 posteriors
    python -m benchmarks.cost --guides        # eight schools, every guide: results/cost.md
    python -m benchmarks.cost --guides --scaling       # and the d sweep
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import iterated, spline_coupling
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyroflows import AutoFlowGuide, ImportanceWeightedELBO

from . import step_cost
from .posteriors import eight_schools_centered

OUT = Path(__file__).parent / "results" / "cost.md"
FAST_PATH = Path(__file__).parent / "results" / "fast_path.md"
CONVERGENCE = Path(__file__).parent / "results" / "fast_path_convergence.md"


def hierarchical(groups: int):
    """mu, tau, theta_1..J with y_j ~ N(theta_j, 1): d = J + 2 latent dimensions."""
    y = torch.randn(groups)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        with pyro.plate("groups", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    return model, (y,)


def median_ms(model, args, guides: dict, steps: int, warmup: int = 30) -> dict:
    """``guides``: name -> guide factory, or (factory, ELBO) for another objective."""
    svis = {}
    for name, make in guides.items():
        make, elbo = make if isinstance(make, tuple) else (make, Trace_ELBO())
        pyro.clear_param_store()
        svi = SVI(model, make(model), pyro.optim.Adam({"lr": 1e-2}), elbo)
        for _ in range(warmup):
            svi.step(*args)
        svis[name] = svi
    times = {name: [] for name in svis}
    labels = {name: name for name in svis}
    for step in range(steps):
        for name in random.sample(list(svis), len(svis)):
            start = time.perf_counter()
            try:
                svis[name].step(*args)
            except ValueError:  # the fit left the support (a scale of 0): time no further
                svis.pop(name)
                labels[name] = f"{name} (diverged at step {warmup + step}; timed until then)"
                continue
            times[name].append(time.perf_counter() - start)
    return {labels[name]: 1e3 * statistics.median(t) for name, t in times.items() if t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--guides", action="store_true")
    parser.add_argument("--convergence", action="store_true")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.convergence:
        lines = step_cost.convergence()
        CONVERGENCE.write_text("\n".join(lines) + "\n")
        print(f"wrote {CONVERGENCE}")
        return
    if not args.guides:
        lines = step_cost.run()
        FAST_PATH.write_text("\n".join(lines) + "\n")
        print(f"wrote {FAST_PATH}")
        return
    torch.set_num_threads(args.threads)
    lines = [
        "# Milliseconds per SVI step",
        "",
        f"Median over {args.steps} interleaved steps, {args.threads} CPU threads, "
        f"torch {torch.__version__}; ratio = guide / AutoNormal.",
        "",
        "## Eight schools (d = 10)",
        "",
        "| guide | ms/step | x AutoNormal |",
        "|---|---|---|",
    ]
    schools = eight_schools_centered()
    guides = {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoIAFNormal": AutoIAFNormal,
        "Pyro spline_coupling x4": lambda m: AutoNormalizingFlow(
            m, functools.partial(iterated, 4, spline_coupling)
        ),
        "AutoFlowGuide (default)": AutoFlowGuide,
        "AutoFlowGuide nsf x4": functools.partial(AutoFlowGuide, flow="nsf", num_layers=4),
        "AutoFlowGuide realnvp x4": functools.partial(AutoFlowGuide, flow="realnvp", num_layers=4),
        "AutoFlowGuide iaf x4": functools.partial(AutoFlowGuide, flow="iaf", num_layers=4),
        # the other objectives of pyroflows.fit, on the default guide
        "AutoFlowGuide (default), loss='stl'": functools.partial(AutoFlowGuide, stl=True),
        "AutoFlowGuide (default), loss='iwae' K=8": (
            AutoFlowGuide,
            ImportanceWeightedELBO(num_particles=8, dreg=False, max_plate_nesting=1),
        ),
        "AutoFlowGuide (default), loss='dreg' K=8": (
            AutoFlowGuide,
            ImportanceWeightedELBO(num_particles=8, max_plate_nesting=1),
        ),
    }
    ms = median_ms(schools.model, schools.args, guides, args.steps)
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.2f} | {value / ms['AutoNormal']:.2f} |")
        print(lines[-1], flush=True)
    if args.scaling:
        lines += [
            "",
            "## Scaling: hierarchical model",
            "",
            "| d | AutoNormal | AutoFlowGuide | ratio |",
        ]
        lines.append("|---|---|---|---|")
        for groups in (8, 98, 998, 9998):
            model, model_args = hierarchical(groups)
            steps = args.steps if groups < 5000 else max(20, args.steps // 5)
            ms = median_ms(model, model_args, {"n": AutoNormal, "f": AutoFlowGuide}, steps)
            lines.append(
                f"| {groups + 2} | {ms['n']:.2f} | {ms['f']:.2f} | {ms['f'] / ms['n']:.2f} |"
            )
            print(lines[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
