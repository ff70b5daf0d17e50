r"""Guide draws as ``arviz.InferenceData`` (the only module that imports ArviZ).

ArviZ's ``az.from_pyro`` takes only MCMC runs; ``to_inference_data`` does the same for
any fitted guide. What you get:

- ``posterior``: ``num_samples`` draws of every latent site in constrained space and of every
  ``pyro.deterministic`` site, as one chain. Dimensions are named after the model's plates
  (a site in ``pyro.plate("school", 8)`` has a dimension ``"school"``); others are
  ``"<site>_dim_<i>"``.
- ``posterior_predictive``: the observed sites re-drawn at each posterior draw.
- ``log_likelihood``: pointwise ``log p(y_i | z)`` of every observed site, so ``az.loo``
  and ``az.compare`` work. A likelihood written only as ``pyro.factor`` has no pointwise
  terms: you get a warning and no group.
- ``observed_data``, and ``sample_stats`` with ``lp`` (``log p(x, z)``) and
  ``log_weight`` (``log p(x, z) - log q(z)``, the importance weights); the PSIS k-hat and
  its threshold are in the attributes.

Guide draws are not MCMC draws. R-hat and MCMC ESS mean nothing for them (one "chain" of
independent draws: use ``az.summary(idata, kind="stats")``), and they follow ``q``, not the
posterior. With ``resample=True`` the draws are importance-resampled with Pareto-smoothed
weights ``p/q`` (``importance_resample``), which corrects them when k-hat is
below its threshold; use those for ``az.loo`` (LOO on raw guide draws is biased; Magnusson
et al. 2019, arXiv:1904.10679).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import torch
import xarray as xr

with warnings.catch_warnings():  # ArviZ 0.2x announces its 1.0 refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from .diagnostics import importance_resample
from .draws import NOT_VECTORISED_HINT, Draws, draw, evaluate_at, is_shape_error
from .psis import PSISResult

__all__ = ["from_importance_resample", "from_neutra", "split_chain", "to_inference_data"]


def to_inference_data(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    resample: bool = False,
    seed: int | None = None,
    **kwargs,
) -> az.InferenceData:
    """Draws of a fitted guide, and the model at each, as ``arviz.InferenceData``.

    Arguments:
        model, guide: a Pyro model and a guide fitted to it (any guide).
        args, kwargs: the model's arguments.
        num_samples: guide draws.
        posterior_predictive, log_likelihood: include these groups.
        resample: importance-resample the draws towards the exact posterior with
            ``importance_resample`` (Pareto-smoothed weights, moment matching where k-hat is
            high); every group is resampled consistently. ``lp`` and ``log_weight`` are then
            those of the (possibly moment-matched) proposals.
        seed: seed for the draws (the global random state is left as it was).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.randn(5)
        >>> guide = AutoFlowGuide(model)
        >>> idata = to_inference_data(model, guide, y, num_samples=100, seed=0)
        >>> sorted(idata.groups())[:3], idata.log_likelihood["y"].dims
        (['log_likelihood', 'observed_data', 'posterior'], ('chain', 'draw', 'obs'))
    """
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if resample:
            out = importance_resample(
                model,
                guide,
                *args,
                num_samples=num_samples,
                predictive=posterior_predictive,
                **kwargs,
            )
            draws, diagnostic, index = out.draws, out.diagnostic, out.index
        else:
            draws = draw(model, guide, args, kwargs, num_samples, predictive=posterior_predictive)
            diagnostic, index = PSISResult.from_log_weights(draws.log_weights), None

    def take(x):
        return x[index] if index is not None else x

    kinds = ("latent", "deterministic")
    posterior = {n: take(v) for n, v in draws.values.items() if draws.sites[n].kind in kinds}
    groups = {
        "posterior": posterior,
        "sample_stats": {"lp": take(draws.log_joint), "log_weight": take(draws.log_weights)},
    }
    if posterior_predictive:
        groups["posterior_predictive"] = {n: take(v) for n, v in draws.predictive.items()}
    if log_likelihood:
        groups["log_likelihood"] = _log_likelihood(draws, take)
    attrs = {
        "inference_library": "pyroflows",
        "inference_method": "importance-resampled guide draws" if resample else "guide draws",
        "guide": type(guide).__name__,
        "psis_k_hat": diagnostic.k_hat,
        "psis_threshold": diagnostic.threshold,
        "importance_ess": diagnostic.ess,
    }
    if resample:
        attrs["moment_matching_steps"] = out.num_adaptations
    return _build(draws, groups, attrs, chains=1)


def _log_likelihood(draws: Draws, take) -> dict:
    if not draws.log_likelihood:
        factors = [n for n, s in draws.sites.items() if s.kind == "factor"]
        if factors:
            warnings.warn(
                f"to_inference_data: the likelihood is written with pyro.factor ({factors}), "
                "which has no pointwise terms, so there is no log_likelihood group and az.loo "
                "cannot run. Write the likelihood as pyro.sample(..., obs=...) for LOO.",
                stacklevel=3,
            )
        else:
            warnings.warn(
                "to_inference_data: the model has no observed sites; no log_likelihood group",
                stacklevel=3,
            )
    return {n: take(v) for n, v in draws.log_likelihood.items()}


def _dims(draws: Draws, name: str, ndim: int) -> list[str]:
    plates = draws.sites[name].plates
    return [plates.get(i, f"{name}_dim_{i}") for i in range(ndim)]


def _numpy(value, chains):
    array = value.detach().cpu().numpy()
    return array.reshape((chains, array.shape[0] // chains, *array.shape[1:]))


def _build(draws: Draws, groups: dict, attrs: dict, chains: int) -> az.InferenceData:
    dims = {}
    for group in groups.values():
        for name, value in group.items():
            if draws is not None and name in draws.sites:
                dims[name] = _dims(draws, name, value.dim() - 1)
    observed = {} if draws is None else draws.observed  # (None: the members' resampling)
    observed = {n: v.detach().cpu().numpy() for n, v in observed.items()}
    arrays = {
        key: {n: _numpy(v, chains) for n, v in group.items()} or None
        for key, group in groups.items()
    }
    with warnings.catch_warnings():
        # ArviZ warns about one chain (R-hat undefined): that is documented above.
        warnings.filterwarnings("ignore", message=".*chain.*")
        return az.from_dict(
            **arrays,
            observed_data=observed or None,
            dims=dims,
            attrs=attrs,
            posterior_attrs=attrs,
            sample_stats_attrs=attrs if "sample_stats" in arrays else None,
        )


def split_chain(idata: az.InferenceData) -> az.InferenceData:
    """One MCMC chain as its two halves, so that ArviZ computes split R-hat and ESS for it
    (as Stan does for one chain; ArviZ refuses R-hat for a single chain)."""
    posterior = idata.posterior
    half = posterior.sizes["draw"] // 2
    if posterior.sizes["chain"] != 1 or half < 4:
        return idata
    halves = [posterior.isel(chain=0, draw=slice(i * half, (i + 1) * half)) for i in (0, 1)]
    halves = [h.assign_coords(draw=np.arange(half)) for h in halves]
    split = xr.concat(halves, dim="chain").assign_coords(chain=[0, 1])
    return az.InferenceData(posterior=split.transpose("chain", "draw", ...))


def from_importance_resample(result) -> az.InferenceData:
    draws = result.draws
    groups = {"posterior": dict(result.samples)}
    attrs = {
        "inference_library": "pyroflows",
        "inference_method": "importance-resampled guide draws",
        "psis_k_hat": result.diagnostic.k_hat,
        "psis_threshold": result.diagnostic.threshold,
        "importance_ess": result.diagnostic.ess,
        "moment_matching_steps": result.num_adaptations,
    }
    return _build(draws, groups, attrs, chains=1)


def from_guide_draws(samples: dict, why: str) -> az.InferenceData:
    """Plain guide draws (no weights, no chain) in one pseudo-chain, saying why."""
    posterior = {k: v.detach().cpu().numpy()[None] for k, v in samples.items()}
    attrs = {"inference_library": "pyroflows", "inference_method": f"guide draws ({why})"}
    return az.from_dict(posterior=posterior, attrs=attrs)


def from_neutra(model, guide, args, kwargs, latent, chains, draws_per_chain, divergent):
    """NeuTra draws as chains; ``divergent[c]`` lists chain ``c``'s divergent draws."""
    probe = draw(model, guide, args, kwargs, 1)
    posterior, log_likelihood = dict(latent), {}
    try:
        evaluated = evaluate_at(model, args, kwargs, probe, latent)
    except (RuntimeError, ValueError) as error:  # finished MCMC work is never lost to this
        if not is_shape_error(error):
            raise
        warnings.warn(
            "neutra: the model does not run vectorised over the draws "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0]}), so the result "
            "holds the latent sites' MCMC draws without deterministic sites or pointwise "
            f"log-likelihood. To have them, {NOT_VECTORISED_HINT}.",
            stacklevel=3,
        )
    else:
        posterior.update(evaluated["values"])
        log_likelihood = evaluated["log_likelihood"]
    groups = {"posterior": posterior, "log_likelihood": log_likelihood}
    groups = {k: v for k, v in groups.items() if v}
    diverging = np.zeros((chains, draws_per_chain), dtype=bool)
    for c in range(chains):
        diverging[c, list(divergent[c])] = True
    attrs = {"inference_library": "pyroflows", "inference_method": "NeuTra NUTS"}
    idata = _build(probe, groups, attrs, chains)
    idata.add_groups(sample_stats={"diverging": diverging})
    return idata
