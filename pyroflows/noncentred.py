r"""A mode-search start for centred hierarchies: members first, then the non-centred model.

In a centred hierarchy (``theta_i ~ Normal(mu, tau)`` in a plate), the joint density grows
without bound as ``tau -> 0`` with every ``theta_i = mu``, so a mode search from a poor
start runs into that spike: on rats (posteriordb) L-BFGS from the prior's start ended with
both group scales at ``exp(-20)``, every member equal and the likelihood's scale at 330,
where the Hessian is not positive definite. ``hierarchy_search_start`` finds a point from
which the search reaches the model's own local mode instead, where it has one:

1. the members' latents given the globals, then the globals given the members (each a
   search over part of the vector): the globals come near the data;
2. the same model written non-centred (``theta_i = mu + tau * eta_i``, ``eta_i ~ N(0, 1)``:
   Pyro's ``LocScaleReparam``), which has no spike, searched from there: each member where
   its data are (the globals may stay on a plateau, a scale far out with every ``eta_i``
   near 0, which the centred search then corrects).

On rats the centred search from that point reaches the mode that it reaches from the
reference posterior's mean (log density 599.28 at both), in about 1 s; from step 1 alone,
or from the non-centred search alone (started at the prior, it overflows), it falls into
the spike.

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 100.0))
    ...     tau = pyro.sample("tau", dist.HalfCauchy(10.0))
    ...     with pyro.plate("groups", len(y)):
    ...         theta = pyro.sample("theta", dist.Normal(mu, tau))
    ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
    >>> y = torch.tensor([48.0, 50.0, 52.0, 55.0, 45.0])
    >>> values = noncentred_descent(model, {"mu": torch.tensor(0.0), "tau": torch.tensor(1.0)},
    ...                             ["theta"], (y,), {})
    >>> torch.allclose(values["theta"], y, atol=0.5)  # each member at its data, none at mu
    True
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .hierarchy import hierarchy_plates
from .laplace import Energy, descend
from .model_prior import base_distribution
from .sites import unconstrained_energy, unpack_with_log_det

__all__ = ["hierarchy_search_start", "noncentred_descent"]


def hierarchy_search_start(model, trace, shapes: dict, energy: Energy, init: Tensor, args, kwargs):
    """An unconstrained point (the layout of ``init``: ``trace``'s latent sites, ``shapes``
    their unconstrained shapes) to start the mode search of ``energy`` from, for a model
    with a centred hierarchy of ``Normal`` members (see the module docstring); ``None``
    where the model has none or a search fails. It runs the model, which can draw from
    torch's random stream: fork it to keep the caller's."""
    members = _centred(model, trace, _normal_members(trace), args, kwargs)
    if not members:
        return None
    is_member = torch.cat(
        [torch.full((math.prod(shape),), name in members) for name, shape in shapes.items()]
    )
    point = _descend_part(energy, init, is_member)
    point = None if point is None else _descend_part(energy, point, ~is_member)
    if point is None:
        return None
    values, _ = unpack_with_log_det(trace, shapes, point.to(init))
    try:
        values = noncentred_descent(model, values, members, args, kwargs)
    except (RuntimeError, ValueError, NotImplementedError):  # a model the reparametrisation
        return None  # cannot take: no such start (the caller's search result stands)
    if values is None:
        return None
    return torch.cat(
        [
            biject_to(trace.nodes[name]["fn"].support).inv(values[name]).reshape(-1)
            for name in shapes
        ]
    ).to(init)


def noncentred_descent(model, values: dict, members, args, kwargs) -> dict[str, Tensor] | None:
    """The constrained values of every latent site after a mode search of ``model`` made
    non-centred at ``members`` (``LocScaleReparam``), started at ``values`` (each member
    at its prior's centre), or ``None`` where the search fails."""
    noncentred = poutine.reparam(model, {name: LocScaleReparam(0.0) for name in members})
    start = {n: v for n, v in values.items() if n not in members}
    with poutine.block(), torch.no_grad():
        prototype = poutine.trace(InitMessenger(init_to_value(values=start))(noncentred)).get_trace(
            *args, **kwargs
        )
    for name in [n for n, site in prototype.nodes.items() if site_is_subsample(site)]:
        prototype.remove_node(name)  # (the energy's layout holds the latent sites only)
    latent = {n: s for n, s in prototype.nodes.items() if s["type"] == "sample"}
    latent = {n: s for n, s in latent.items() if not s["is_observed"]}
    unconstrained = {n: biject_to(s["fn"].support).inv(s["value"]) for n, s in latent.items()}
    for name in members:  # eta_i = 0: each member at its prior's centre
        unconstrained[f"{name}_decentered"] = torch.zeros_like(unconstrained[f"{name}_decentered"])
    shapes = {n: u.shape for n, u in unconstrained.items()}
    energy = unconstrained_energy(noncentred, prototype, shapes, args, kwargs)
    init = torch.cat([u.reshape(-1) for u in unconstrained.values()])
    point = descend(energy, init)
    if isinstance(point, str):
        return None
    found, _ = unpack_with_log_det(prototype, shapes, point.to(init))
    with poutine.block(), torch.no_grad():
        run = poutine.trace(poutine.condition(noncentred, data=found)).get_trace(*args, **kwargs)
    names = list(values) + [name for name in members if name not in values]
    out = {n: run.nodes[n]["value"].detach() for n in names if n in run.nodes}
    if len(out) < len(names) or not all(torch.isfinite(v).all() for v in out.values()):
        return None
    return out


def _normal_members(trace) -> list[str]:
    """The latent sites in a hierarchy's plate (``pyroflows.hierarchy``) with a ``Normal``
    prior: those ``LocScaleReparam`` makes non-centred."""
    plates, _ = hierarchy_plates(trace)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and set(plates) & {f.name for f in site["cond_indep_stack"]}
        and type(base_distribution(site["fn"])) is dist.Normal
    ]


def _centred(model, trace, members, args, kwargs) -> list[str]:
    """The ``members`` whose prior moves with the globals: the others are non-centred
    already (``eta ~ Normal(0, 1)``), with no spike to avoid (centred eight schools' search
    fails at a saddle of its non-centred form too: 0.4 s spared)."""
    if not members:
        return []
    moved = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in members:
            if not site_is_subsample(site):
                to = biject_to(site["fn"].support)
                moved[name] = to(to.inv(site["value"]) + 1.0)
    try:
        with poutine.block(), torch.no_grad():
            other = poutine.trace(poutine.condition(model, data=moved)).get_trace(*args, **kwargs)
    except (RuntimeError, ValueError):  # the model refuses the moved globals: keep them all
        return members

    def prior(run, name):
        base = base_distribution(run.nodes[name]["fn"])
        return base.loc, base.scale

    def same(name) -> bool:
        pairs = zip(prior(trace, name), prior(other, name), strict=True)
        return all(torch.equal(a, b) for a, b in pairs)

    return [name for name in members if not same(name)]


def _descend_part(energy: Energy, point: Tensor, part: Tensor) -> Tensor | None:
    """``point`` with its ``part`` coordinates moved to a minimum of ``energy`` over them."""

    def energy_of_part(x):
        return energy(point.to(x).masked_scatter(part, x))

    found = descend(energy_of_part, point[part])
    if isinstance(found, str):
        return None
    return point.to(found).masked_scatter(part, found)
