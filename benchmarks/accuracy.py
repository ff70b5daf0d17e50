"""Accuracy of every guide on every reference posterior, one fresh process per run.

Protocol: every guide is fitted by ``pyroflows.fit`` with the same budget: at most
``--steps`` steps, Adam at lr 1e-2 with the same warm-up and plateau schedule, early
stopping by the same rule, 1 particle; Pyro's guides get the same initialisation
(``init_to_median``). Then 10^4 draws from the guide, scored against the reference:
per parameter |Δmean|/sd_ref and |log(sd/sd_ref)| (max and median), marginal W1/sd_ref
(max) against the reference draws, the ELBO (mean log weight over the draws), KL(q||p) =
log Z - ELBO where log Z is known (funnel, the 2-D energies), the PSIS k-hat, the median ms
per step, the steps to convergence, and the peak resident memory of the run's process.
Each run is a fresh process, so that memory is per run. ``protocol="svi"`` (``--protocol
svi``) fits by plain SVI instead (``plain_svi``), the loop of the earlier study whose tables
are ``results/guides_*.md``.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import resource
import statistics
import time
import traceback

import pyro
import torch

from .posteriors import POSTERIORS, score

DRAWS = 10_000


def _latent_dim(posterior) -> int:
    from pyroflows import AutoFlowGuide

    guide = AutoFlowGuide(posterior.model, name="_probe")
    guide(*posterior.args)
    dim = guide.latent_dim
    pyro.clear_param_store()
    return dim


def guide_factories(dim: int) -> dict:
    """name -> model -> guide. ``dim`` sizes the matched-architecture variants."""
    from pyro.distributions.transforms import iterated, planar, spline_coupling
    from pyro.infer.autoguide import (
        AutoIAFNormal,
        AutoMultivariateNormal,
        AutoNormal,
        AutoNormalizingFlow,
    )
    from pyro.infer.autoguide.initialization import InitMessenger

    from pyroflows import AutoFlowGuide, init_to_median

    def pyro_flow(transform, model):
        # AutoNormalizingFlow hard-codes init_to_feasible, which cannot start at flat priors;
        # an inner InitMessenger sets the value first.
        model = InitMessenger(init_to_median)(model)
        return AutoNormalizingFlow(model, functools.partial(iterated, 4, transform))

    factories = {
        "AutoNormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median),
        "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m, init_loc_fn=init_to_median),
        # AutoIAFNormal ignores init_loc_fn (init_to_feasible): same inner InitMessenger
        "AutoIAFNormal": lambda m: AutoIAFNormal(InitMessenger(init_to_median)(m)),
        "Pyro planar x4": functools.partial(pyro_flow, planar),
        "Pyro spline_coupling x4": functools.partial(pyro_flow, spline_coupling),
        "AutoFlowGuide": AutoFlowGuide,
        "AutoFlowGuide init='prior'": functools.partial(AutoFlowGuide, init="prior"),
        # a per-dimension skew and tail weight before the default flow (design measurement)
        "AutoFlowGuide sinh_arcsinh + iaf x2": functools.partial(
            AutoFlowGuide, flow=["sinh_arcsinh", "iaf", "iaf"]
        ),
        # the schools as local latents (issue "subsampled local latents"): eight schools only
        "AutoFlowGuide local_plates=['J']": functools.partial(AutoFlowGuide, local_plates=["J"]),
        "AutoFlowGuide local_plates=['J'], iaf x2 (the default before 2026-12-02)": (
            functools.partial(AutoFlowGuide, local_plates=["J"], flow="iaf")
        ),
        # matched architectures: the same layers and widths as the Pyro guide beside them
        "AutoFlowGuide iaf x1 [3d+1] (= AutoIAFNormal)": functools.partial(
            AutoFlowGuide, flow="iaf", num_layers=1, hidden_dims=[3 * dim + 1]
        ),
        "AutoFlowGuide nsf x4 [10d,10d] (= spline_coupling x4)": functools.partial(
            AutoFlowGuide, flow="nsf", num_layers=4, hidden_dims=[10 * dim, 10 * dim]
        ),
    }
    zuko = zuko_factory()
    if zuko is not None:
        factories["zuko NSF (ZukoToPyro)"] = zuko
    return factories


# Library options on top of a guide: name -> (guide, fit keywords, PSIS resampling of the draws).
# They are scored on the draws a user would use: the guide's own, or ``importance_resample``'s.
VARIANTS = {
    "AutoFlowGuide + importance_resample": ("AutoFlowGuide", {}, True),
    # the schools as local latents; resampled with each member integrated out
    "AutoFlowGuide local_plates=['J'] + importance_resample": (
        "AutoFlowGuide local_plates=['J']",
        {},
        True,
    ),
    # Pyro's general path instead of fit's compiled step (benchmarks.cost --convergence)
    "AutoFlowGuide fast=False": ("AutoFlowGuide", {"fast": False}, False),
    "AutoFlowGuide loss='dreg' K=8": ("AutoFlowGuide", {"loss": "dreg", "num_particles": 8}, False),
    "AutoFlowGuide loss='dreg' K=8 + importance_resample": (
        "AutoFlowGuide",
        {"loss": "dreg", "num_particles": 8},
        True,
    ),
    "AutoFlowGuide loss='iwae' K=8 + importance_resample": (
        "AutoFlowGuide",
        {"loss": "iwae", "num_particles": 8},
        True,
    ),
}


def plain_svi(steps: int) -> dict:
    """The earlier study's loop (behind AutoFlowGuide's first defaults): ClippedAdam at lr
    1e-2 decaying to 1e-3 over a fixed number of steps, no warm-up, no early stopping."""
    return {
        "optim": pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)}),
        "schedule": "constant",
        "warmup": 0,
        "stop_early": False,
    }


# How a guide is fitted: ``fit``'s defaults (the protocol of RESULTS.md), or plain SVI.
PROTOCOLS = {"fit": lambda steps: {}, "svi": plain_svi}


def family_factories() -> dict:
    """Each registered flow through AutoFlowGuide, with its family defaults."""
    from pyroflows import AutoFlowGuide, transforms

    return {
        f"AutoFlowGuide {name}": functools.partial(AutoFlowGuide, flow=name)
        for name in transforms.available()
    }


def zuko_factory():
    """zuko's NSF wired into Pyro by hand, as users do: an AutoContinuous whose posterior is
    ``ZukoToPyro(flow())`` (zuko defaults: 3 transforms, hidden (64, 64))."""
    try:
        import zuko
        from pyro.contrib.zuko import ZukoToPyro
    except ImportError:
        return None
    from pyro.infer.autoguide import AutoContinuous

    from pyroflows import init_to_median

    class ZukoNSFGuide(AutoContinuous):
        def _setup_prototype(self, *args, **kwargs):
            super()._setup_prototype(*args, **kwargs)
            loc = self._init_loc().detach()
            self.nsf = zuko.flows.NSF(self.latent_dim, 0)
            self.shift = loc  # start at the same point as every other guide

        def sample_latent(self, *args, **kwargs):
            pyro.module(f"{self._pyro_name}.nsf", self.nsf)
            z = pyro.sample(
                f"_{self._pyro_name}_latent", ZukoToPyro(self.nsf()), infer={"is_auxiliary": True}
            )
            return z + self.shift  # a constant shift: the density of the latent is unchanged

    return lambda m: ZukoNSFGuide(m, init_loc_fn=init_to_median)


def run_one(job: dict) -> dict:
    """Fit one guide to one posterior in this (fresh) process and score it."""
    torch.set_num_threads(job.get("threads", 1))
    from pyroflows import fit
    from pyroflows.diagnostics import importance_resample, psis
    from pyroflows.draws import draw

    row = {k: job[k] for k in ("posterior", "guide", "seed")}
    base, fit_kwargs, resample = VARIANTS.get(job["guide"], (job["guide"], {}, False))
    protocol = job.get("protocol", "fit")
    fit_kwargs = {**PROTOCOLS[protocol](job["steps"]), **fit_kwargs}
    row["protocol"] = protocol
    try:
        posterior = POSTERIORS[job["posterior"]]()
        dim = _latent_dim(posterior)
        table = family_factories() if job.get("family") else guide_factories(dim)
        pyro.clear_param_store()
        guide = table[base](posterior.model)
        stamps = []
        result = fit(
            posterior.model,
            guide,
            *posterior.args,
            num_steps=job["steps"],
            seed=job["seed"],
            progress=False,
            diagnose=False,
            **fit_kwargs,
            callbacks=[lambda state: stamps.append(time.perf_counter())],
        )
        pyro.set_rng_seed(job["seed"] + 1000)
        draws = draw(posterior.model, guide, posterior.args, {}, DRAWS)
        log_w = draws.log_weights.double()
        finite = torch.isfinite(log_w)
        values = draws.values
        if resample:
            out = importance_resample(posterior.model, guide, *posterior.args, num_samples=DRAWS)
            values = out.samples
            row["k_hat_resampled"] = out.diagnostic.k_hat
            row["adaptations"] = out.num_adaptations
        row.update(score(posterior, values))
        row["elbo"] = float(log_w[finite].mean()) if finite.any() else -math.inf
        row["kl"] = posterior.log_z - row["elbo"] if posterior.log_z is not None else None
        row["k_hat"] = psis(log_w)[1]
        steps = [b - a for a, b in itertools.pairwise(stamps)]
        row["ms_per_step"] = 1e3 * statistics.median(steps) if steps else None
        row["steps"] = result.num_steps
        row["fit_seconds"] = result.wall_time + result.setup_time
        row["path"] = result.path
        row["converged"] = result.converged
        row["dim"] = dim
    except Exception as error:  # a diverged or failed fit is a result too
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        row["trace"] = traceback.format_exc(limit=3)[-600:]
    row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def run_all(jobs: list[dict], workers: int, on_result) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    results = []
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            results.append(row)
            on_result(row)
    return results


def noise_floor(posterior, num: int = DRAWS) -> dict:
    """The same metrics on exact (or reference) draws: what a perfect guide would score."""
    from .posteriors import exact_draws

    if posterior.name.startswith("funnel"):
        return score(posterior, exact_draws(posterior, num))
    draws = posterior.reference_draws
    if not draws:
        return {}
    # One half of the reference draws scored against the other half (and the summary).
    half = {k: v[: len(v) // 2] for k, v in draws.items()}
    other = {k: v[len(v) // 2 :] for k, v in draws.items()}
    identity = type(posterior)(posterior.name, None, (), lambda d: d, posterior.reference, other)
    return score(identity, half)
