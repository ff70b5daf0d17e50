r"""Importance resampling for a guide with local latents: the globals weighted with each
member integrated out, then each member's locals resampled among its own draws.

Joint weights ``p(x, z) / q(z)`` over the globals and every member degenerate as members are
added, whatever the guide (``globals_diagnostic``). Here, for each of ``S`` globals draws
``g_s`` (half from the guide, half from a heavy-tailed version of it: a defensive mixture,
``pyroflows.proposal``), every member ``i`` gets ``K`` draws ``u_ik ~ q(u_i | g_s)`` and weights
``w_ik = p(y_i, u_ik | g_s) / q(u_ik | g_s)``; the globals' weight is
``p(g_s) prod_i mean_k w_ik / q_mix(g_s)`` (unbiased for ``p(g_s, y) / q_mix(g_s)``), and
member ``i``'s locals are one ``u_ik`` picked with probability ``w_ik / sum_k w_ik``. Globals
drawn by their Pareto-smoothed weights, each with its picked locals, are nested
importance-sampling draws of the joint posterior: exact as ``S`` and ``K`` grow, and good
where ``q(globals)`` covers the globals' posterior (its k-hat says so) and each member's
conditional is close to its exact one (``AutoFlowGuide(..., local_prior="model")``).

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyroflows import AutoFlowGuide
    >>> def model(y):
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", len(y)):
    ...         theta = pyro.sample("theta", dist.Normal(0.0, tau))
    ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
    >>> y = torch.zeros(20)
    >>> guide = AutoFlowGuide(model, local_plates=["groups"], local_prior="model")
    >>> samples, result, index = resample_members(model, guide, (y,), {}, num_samples=100)
    >>> samples["theta"].shape, result.num_samples
    (torch.Size([100, 20]), 100)
"""

from __future__ import annotations

import math
import warnings

import pyro
import torch
from torch import Tensor
from torch.distributions import biject_to

from .draws import draw, evaluate_at
from .member_bound import MemberImportanceELBO
from .proposal import heavy_tailed
from .psis import NoFiniteWeights, PSISResult
from .subsampling import SubsampledModel, subsampled_plate, trace_at_guide_draw

__all__ = ["resample_members"]

RESOLUTION_STEPS = 1000  # see _collapsed
BATCH = 64  # globals draws weighed in one run of the guide and the model, at least
MAX_BATCH = 4096  # and at most
MEMBER_DRAWS_PER_RUN = 2**20  # members x K x globals draws per run, as a rule


@torch.no_grad()
def resample_members(
    model,
    guide,
    args,
    kwargs,
    num_samples: int = 4000,
    num_draws: int | None = None,
    member_draws: int = 16,
    seed: int | None = None,
) -> tuple[dict[str, Tensor], PSISResult, Tensor]:
    """``(samples, diagnostic, index)``: ``num_draws`` (default ``num_samples``) draws of
    the globals and every member, resampled from ``num_samples`` weighted globals draws
    (see the module docstring); ``diagnostic`` is the globals' PSIS, ``index`` which
    globals draw each sample is. The model must see every member (full data)."""
    if getattr(guide, "prototype_trace", None) is None:
        guide.setup(*args, **kwargs)
    why = subsampled_plate(trace_at_guide_draw(model, guide, args, kwargs))
    if why:
        raise SubsampledModel(
            f"importance_resample: {why}; weighting the globals needs every member. Call it "
            "with arguments under which the plate is whole (e.g. subsample_size=None)"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    bound = MemberImportanceELBO(member_draws).find_owners(model, guide, args, kwargs)
    log_w, latents, picked = [], [], {site.name: [] for site in guide.locals.sites}
    guide_q, heavy = guide.get_posterior(), heavy_tailed(guide)
    batch_size, start = _batch_size(guide, member_draws), 0
    while start < num_samples:
        # the first run small: a model that broadcasts wrongly fails there, not out of memory
        count = min(BATCH if start == 0 else batch_size, num_samples - start)
        start += count
        batch = torch.cat([guide_q.sample((count - count // 2,)), heavy.sample((count // 2,))])
        # a tail draw beyond float (a scale of 0) is weighed zero; the trace gets a stand-in
        ok = _representable(guide, batch)
        safe = torch.where(ok[:, None], batch, guide.loc.detach())
        # non-finite draws are handled below, not hidden: a tail draw can make a model's
        # distribution invalid (a scale exp(v / 2) that underflows to 0), which validation
        # would raise for the whole batch; its density is then not finite and weighs zero
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", message="Encountered NaN")
            values, trace, members = bound.weigh_many(model, guide, args, kwargs, safe)
        # the bound weighs by q(g); the draws come from the defensive mixture
        q, q_heavy = guide_q.log_prob(safe), heavy.log_prob(safe)
        values = values + q - (torch.logaddexp(q, q_heavy) - math.log(2))
        dim = -(bound.max_plate_nesting + 2)  # the globals draws' plate
        local = {site.name: _draws_of(site, trace, dim, count) for site in guide.locals.sites}
        # a tail draw can overflow the model (e.g. exp of a huge log scale) or collapse the
        # members' draws (a tiny one): its weight is zero, its members never picked
        finite = ok & torch.isfinite(values) & torch.isfinite(members).flatten(1).all(-1)
        finite = finite & ~_collapsed(guide, local)
        log_w.append(torch.where(finite, values, values.new_tensor(-math.inf)))
        latents.append(batch)
        weights = torch.where(finite[:, None, None], members, torch.zeros_like(members))
        k = weights.shape[1]  # each member's draw, picked by its weight: (count, members)
        probs = weights.transpose(1, 2).softmax(-1).reshape(-1, k).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).reshape(count, -1)
        for site in guide.locals.sites:
            picked[site.name].append(_pick(site, local[site.name], choice))
    log_w = torch.cat(log_w)
    if torch.isinf(log_w).all():
        raise NoFiniteWeights(
            "importance_resample: every globals draw was outside the model's support, had a "
            "non-finite density there, or rounded its members' draws onto a few values (a "
            "local scale below float resolution); the guide is far from the posterior"
        )
    result = PSISResult.from_log_weights(log_w)
    count = num_draws or num_samples
    index = torch.multinomial(
        result.log_weights.exp(), count, replacement=True, generator=generator
    )
    samples = guide.latent_to_sites(torch.cat(latents)[index])
    for name, values in picked.items():
        samples[name] = torch.cat(values)[index.to(values[0].device)]
    # the model's deterministic sites at each draw, as the joint guide's draws have them
    probe = draw(model, guide, args, kwargs, 1)
    samples.update(evaluate_at(model, args, kwargs, probe, samples)["values"])
    return samples, result, index


def _batch_size(guide, member_draws: int) -> int:
    """Globals draws per run: about a million member draws a run (few members: many globals
    draws at once, where each run's fixed cost of Pyro's handlers dominates)."""
    members = sum(site.members for site in guide.locals.sites)
    return max(BATCH, min(MAX_BATCH, MEMBER_DRAWS_PER_RUN // (members * member_draws)))


def _collapsed(guide, values: dict) -> Tensor:
    """Per globals draw: some member's draws spread less than a thousand floating-point steps
    of their value: its local scale is near the float resolution of its location (a global
    scale far in the tail), its draws are rounded onto a few values and its weight is a
    rounding artefact. ``values``: ``{site: (draws, K, ...)}``."""
    out = None
    for site in guide.locals.sites:
        value = values[site.name]
        resolution = torch.finfo(value.dtype).eps * value.abs().mean(1)
        narrow = (value.std(1) < RESOLUTION_STEPS * resolution).flatten(1).any(-1)
        out = narrow if out is None else out | narrow
    return out


def _draws_of(site, trace, dim: int, count: int) -> Tensor:
    """A local site's values for every globals draw: ``(count, K, ...)``, the globals draws
    first, then the ``K`` draws of every member."""
    value = trace.nodes[site.name]["value"]
    position = value.dim() + dim - site.event_dim
    if position < 0:  # the same for every globals draw
        return value.expand(count, *value.shape)
    return value.movedim(position, 0)


def _representable(guide, latents: Tensor) -> Tensor:
    """Per draw: every global's constrained value maps back to its unconstrained one (the exp
    of a log scale far in the tail is 0 or inf in floating point: the model cannot use it)."""
    values = guide.latent_to_sites(latents)
    back = [
        biject_to(site["fn"].support).inv(values[name]).reshape(len(latents), -1)
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    ]
    back = torch.cat(back, dim=-1)
    close = torch.isclose(back, latents, rtol=1e-4, atol=1e-4) & torch.isfinite(back)
    return close.all(-1)


def _pick(site, value: Tensor, choice: Tensor) -> Tensor:
    """Each globals draw's member ``i``'s draw number ``choice[:, i]`` of ``K``: ``value`` is
    ``(draws, K, ...)``, the result ``(draws, *site's shape)``."""
    dims = site.batch_ndim + site.event_dim
    value = value.reshape(value.shape[0], value.shape[1], *value.shape[value.dim() - dims :])
    (local,) = site.local_dims
    shape = [value.shape[0]] + [1] * (value.dim() - 1)
    shape[2 + local] = -1
    index = choice.to(value.device).reshape(shape).expand(value.shape[0], 1, *value.shape[2:])
    return value.gather(1, index)[:, 0]
