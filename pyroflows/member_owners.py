r"""Which member of a local plate each element of a site outside that plate belongs to.

A hierarchical regression often keeps its observations in a plate of their own and indexes
the members' latents: ``a[group]`` in a plate of data points, with ``a`` in a plate of groups.
Each observation then still depends on one member only, but the plates do not say which, and
weighing members one by one (``pyroflows.member_bound``) needs every member's own terms. This
module finds out by running the model: with the members' latents moved in unconstrained
space, by bits of their index (member ``j`` moved in run ``b`` if bit ``b`` of ``j`` is set),
an element that changes in exactly the runs of ``j``'s bits is ``j``'s. ``ceil(log2 M) + 1``
runs (at the flow's centre) for ``M`` members, and three more with random sets of members
moved, which must change exactly the elements the map says: an element that depends on two
members, or on none but changes anyway, fails them and the site is reported as not separable.

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyroflows import AutoFlowGuide
    >>> group = torch.tensor([0, 0, 1, 2, 2, 2])
    >>> def model(y):
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 3):
    ...         a = pyro.sample("a", dist.Normal(0.0, tau))
    ...     with pyro.plate("data", 6):
    ...         pyro.sample("y", dist.Normal(a[..., group], 1.0), obs=y)
    >>> guide = AutoFlowGuide(model, local_plates=["groups"]).setup(torch.zeros(6))
    >>> owners, why = observation_owners(model, guide, (torch.zeros(6),), {})
    >>> owners["y"], why
    (tensor([0, 0, 1, 2, 2, 2]), '')
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .subsampling import trace_at_guide_draw

__all__ = ["observation_owners"]

MOVE = 1.0  # how far a member's latents move (unconstrained) in a probing run
CHECKS = 3  # probing runs with random sets of members, to verify the map


@torch.no_grad()
def observation_owners(model, guide, args, kwargs) -> tuple[dict[str, Tensor], str]:
    """``({site: owners}, why_not)`` for the sample sites outside the guide's one local
    plate whose log-density depends on its members: ``owners`` has the shape of the site's
    log-density, each element the index of the member it belongs to (``-1``: none). Where a
    site's elements do not each belong to one member, ``({}, why)``."""
    (plate,) = {p for site in guide.locals.sites for p in site.local_plates}
    members = guide.locals.sites[0].shape[guide.locals.sites[0].local_dims[0]]
    # At the globals the flow maps its base's centre to, with members drawn given them: at a
    # draw from the flow's tail every observation's log-density can be -inf, which no
    # member's move changes (rats, held-out set: the map came out empty)
    centre = guide.get_transform()(torch.zeros_like(guide.loc)).detach()
    at_centre = poutine.condition(guide, data={guide.latent_site_name: centre})
    trace = trace_at_guide_draw(model, at_centre, args, kwargs)
    values = {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    outside = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and plate not in {f.name for f in site["cond_indep_stack"]}
    ]
    base = _log_densities(model, args, kwargs, values, outside)

    def changed(moved: Tensor) -> dict[str, Tensor]:
        probed = _move(guide.locals.sites, values, moved)
        log_p = _log_densities(model, args, kwargs, probed, outside)
        return {name: log_p[name] != base[name] for name in outside}

    depends = changed(torch.ones(members, dtype=torch.bool))
    if not any(bool(d.any()) for d in depends.values()):  # the usual case: data in the plate
        return {}, ""
    owners = {name: torch.zeros_like(base[name], dtype=torch.long) for name in outside}
    for bit in range(max(1, math.ceil(math.log2(members)))):
        moved = (torch.arange(members) >> bit) & 1 == 1
        for name, change in changed(moved).items():
            owners[name] += change.long() << bit
    owners = {name: torch.where(depends[name], owners[name], -1) for name in outside}
    generator = torch.Generator().manual_seed(0)
    for _ in range(CHECKS):
        moved = torch.rand(members, generator=generator) < 0.5
        for name, change in changed(moved).items():
            expected = (owners[name] >= 0) & moved[owners[name].clamp(min=0, max=members - 1)]
            if not torch.equal(change, expected) or bool((owners[name] >= members).any()):
                return {}, (
                    f"site {name!r} lies outside plate {plate!r} and its elements do not each "
                    "depend on one member of it"
                )
    return {name: o for name, o in owners.items() if bool(depends[name].any())}, ""


def _move(sites, values: dict, moved: Tensor) -> dict:
    """``values`` with the latents of the ``moved`` members shifted by ``MOVE`` in
    unconstrained space."""
    out = dict(values)
    for site in sites:
        value = values[site.name]
        transform = biject_to(site.support)
        u = transform.inv(value)
        (local,) = site.local_dims
        shape = [1] * (u.dim() - (len(site.shape) - local)) + [-1]
        shape += [1] * (len(site.shape) - local - 1)
        out[site.name] = transform(u + MOVE * moved.to(u).reshape(shape))
    return out


def _log_densities(model, args, kwargs, values: dict, names) -> dict[str, Tensor]:
    """Each site of ``names``'s elementwise log-density (its batch shape) at ``values``."""
    with poutine.block(), pyro.validation_enabled(False):
        conditioned = poutine.condition(model, data=values)
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
    out = {}
    for name in names:
        site = trace.nodes[name]
        log_p = site["fn"].log_prob(site["value"])
        out[name] = log_p.expand(site["fn"].batch_shape) if log_p.dim() else log_p
    return out
