r"""The model's own prior of its local latents, read by running the model inside the guide.

A local latent's exact conditional is ``p(u_i | g, y_i) ∝ p(u_i | g) p(y_i | u_i, g)``. Where
the model's prior ``p(u_i | g)`` is Gaussian in unconstrained space (``Normal`` on the real
line, ``LogNormal`` on the positive one), ``AutoFlowGuide(..., local_prior="model")`` uses it
as it is, times each member's Gaussian (the likelihood's share), instead of learning it:
the conditional then follows the globals exactly as the model says, everywhere, not only
where the globals' guide has been (``docs/guide/local-latents.md``, "the trap"). This module
runs the model up to its last local site with the globals' values and the guide's indices
(as Pyro's effect-based autoguides run the model inside the guide), asking at each local
site for its value, and stops there: the likelihood is not evaluated twice.

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 10, subsample_size=3):
    ...         pyro.sample("theta", dist.Normal(0.0, tau))
    >>> seen = {}
    >>> def draw(name, fn):
    ...     seen[name] = gaussian_prior(fn)
    ...     return fn.sample()
    >>> run_to_locals(model, (), {}, {"tau": torch.tensor(2.0)},
    ...               {"groups": torch.tensor([0, 4, 7])}, draw, ["theta"])
    >>> seen["theta"][1]  # the prior's precision, 1 / tau^2, per member
    tensor([0.2500, 0.2500, 0.2500])
"""

from __future__ import annotations

import itertools
import math

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

__all__ = [
    "base_distribution",
    "draw_members",
    "gaussian_prior", "run_to_locals", "start_all_members", "start_members"]


class _Stop(Exception):
    pass


def base_distribution(fn):
    """``fn`` without its ``Independent``, expanded and masked wrappers."""
    while isinstance(fn, (dist.Independent, ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def gaussian_prior(fn) -> tuple[Tensor, Tensor] | None:
    """``(mean, precision)`` of ``fn`` in unconstrained space, elementwise over its shape,
    where it is Gaussian there (``Normal``, ``LogNormal``, wrapped in ``Independent`` or
    expanded), else ``None``."""
    base = base_distribution(fn)
    if type(base) not in (dist.Normal, dist.LogNormal):
        return None
    shape = fn.batch_shape + fn.event_shape
    return base.loc.expand(shape), base.scale.pow(-2).expand(shape)


class _RunToLocals(Messenger):
    def __init__(self, values, indices, draw, local_names):
        super().__init__()
        self.values, self.indices, self.draw = values, indices, draw
        self.remaining = set(local_names)

    def _pyro_sample(self, msg):
        name = msg["name"]
        if site_is_subsample(msg):
            if name in self.indices:
                msg["value"] = self.indices[name]
                msg["done"] = True
            return
        if msg["is_observed"]:
            return
        if name in self.values:
            msg["value"] = self.values[name]
        elif name in self.remaining:
            msg["value"] = self.draw(name, msg["fn"])
            self.remaining.discard(name)
        else:
            raise ValueError(
                f"AutoFlowGuide: the model's latent site {name!r} is neither one of the "
                "guide's globals nor one of its local sites (a model whose latent sites "
                "change between calls cannot run inside the guide)"
            )
        msg["done"] = True
        if not self.remaining:
            raise _Stop


def run_to_locals(model, args, kwargs, values, indices, draw, local_names) -> None:
    """Run ``model`` with the latent ``values`` (``{site: constrained value}``, the globals)
    and the plates' ``indices`` (``{plate: index tensor}``), calling ``draw(name, fn)`` at
    each site of ``local_names`` for its value; stop after the last of them. Nothing is
    recorded in an enclosing trace.

    Raises ``ValueError`` if the model ends before reaching every local site.
    """
    runner = _RunToLocals(values, indices, draw, local_names)
    try:
        with poutine.block(), runner:
            model(*args, **kwargs)
    except _Stop:
        return
    raise ValueError(
        f"AutoFlowGuide: the model ended without reaching the local sites "
        f"{sorted(runner.remaining)}"
    )


class _Indices(Messenger):
    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def _pyro_sample(self, msg):
        if site_is_subsample(msg) and msg["name"] in self.indices:
            msg["value"] = self.indices[msg["name"]]
            msg["done"] = True


NEWTON_STEPS = 8
NEWTON_TOLERANCE = 1e-3  # done when no element moved more (unconstrained)
MAX_NEWTON_STEP = 3.0  # a Newton step's largest move (unconstrained), for a safe start
LEAST_PRECISION = 1e-4  # a member whose likelihood is flatter starts 100 wide


@torch.enable_grad()  # (setup may run under no_grad: the start needs derivatives)
def start_members(model, args, kwargs, values, indices, sites, members) -> dict:
    """A start for each member's Gaussian (the likelihood's share of its conditional): a
    few elementwise Newton steps on ``log p(locals, data | globals)`` at the globals
    ``values`` for the members ``indices``, then the Laplace precision less the model's
    prior precision. ``members`` is ``{site: unconstrained start}``; returns
    ``{site: (loc, scale)}``, elementwise as the site's members are laid out."""
    u = {name: value.detach().clone().requires_grad_(True) for name, value in members.items()}

    def log_joint():
        constrained, log_det = {}, 0.0
        for site in sites:
            transform = biject_to(site.support)
            constrained[site.name] = transform(u[site.name])
            log_det = (
                log_det + transform.log_abs_det_jacobian(u[site.name], constrained[site.name]).sum()
            )
        with poutine.block(), _Indices(indices):
            conditioned = poutine.condition(model, data={**values, **constrained})
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        total = log_det + sum(  # unscaled: a member's own density, not the minibatch's
            scale_and_mask(site["unscaled_log_prob"], mask=site["mask"]).sum()
            for site in trace.nodes.values()
            if site["type"] == "sample"
        )
        priors = {site.name: gaussian_prior(trace.nodes[site.name]["fn"]) for site in sites}
        return total, priors

    largest = math.inf  # the largest move of the last Newton step
    for step in range(NEWTON_STEPS + 1):  # the last pass: the curvature at the mode
        total, priors = log_joint()
        grads = torch.autograd.grad(total, list(u.values()), create_graph=True)
        curvature = _diagonal_hessian(grads, list(u.values()), sites)
        if step == NEWTON_STEPS or largest < NEWTON_TOLERANCE:
            break
        largest = 0.0
        with torch.no_grad():
            for value, grad, curv in zip(u.values(), grads, curvature, strict=True):
                move = grad / (-curv).clamp(min=LEAST_PRECISION)
                value += move.clamp(-MAX_NEWTON_STEP, MAX_NEWTON_STEP)
                largest = max(largest, float(move.abs().max()))
    out = {}
    for (name, value), curv in zip(u.items(), curvature, strict=True):
        if priors[name] is None:  # not Gaussian: the learned prior's members start as they are
            continue
        prior_mean, prior_precision = priors[name]
        share = -curv.detach() - prior_precision
        mode = value.detach()
        # where the likelihood is flat (or not concave) the member starts wide at the mode
        flat = share <= LEAST_PRECISION
        share = share.clamp(min=LEAST_PRECISION)
        loc = torch.where(flat, mode, mode + prior_precision * (mode - prior_mean) / share)
        out[name] = (loc, share.rsqrt())
    return out


def _diagonal_hessian(grads, values, sites):
    """The diagonal of the Hessian of a log density separable over members: one pass per
    site and element position within a member (the other members' elements at that
    position do not interact with it). Cross-site terms are left out."""
    out = []
    for grad, value, site in zip(grads, values, sites, strict=True):
        shape = [value.shape[d] for d in site.other_dims]
        positions = torch.arange(math.prod(shape), device=value.device).reshape(shape)
        for d in site.local_dims:  # broadcast over the members' dimensions
            positions = positions.unsqueeze(d)
        curvature = torch.zeros_like(value)
        for p in range(math.prod(shape)):
            at = positions == p
            (hv,) = torch.autograd.grad((grad * at).sum(), value, retain_graph=True)
            curvature = torch.where(at, hv, curvature)
        out.append(curvature)
    return out


def start_all_members(local_latents, model, args, kwargs, values, chunks) -> None:
    """``start_members`` for every member of every local site whose model prior is
    Gaussian, ``chunks`` (``{plate: [index tensors]}``) at a time, written into the
    members' parameters."""
    sites = local_latents.sites
    for combination in itertools.product(*chunks.values()):
        indices = dict(zip(chunks, combination, strict=True))
        picked = {site.name: [indices[p] for p in site.local_plates] for site in sites}
        members = {}
        for k, site in enumerate(sites):
            flat = local_latents.flat_members(k, picked[site.name])
            members[site.name] = _layout(site, local_latents.loc[k][flat], picked[site.name])
        started = start_members(model, args, kwargs, values, indices, sites, members)
        with torch.no_grad():
            for k, site in enumerate(sites):
                if site.name not in started:
                    continue
                flat = local_latents.flat_members(k, picked[site.name])
                loc, scale = started[site.name]
                order = site.local_dims + site.other_dims
                for param, value in (
                    (local_latents.loc[k], loc),
                    (local_latents.scale_raw[k], _inverse_softplus(scale)),
                ):
                    value = value.expand(loc.shape).permute(order).reshape(len(flat), -1)
                    param.index_copy_(0, flat, value.to(param))


def _inverse_softplus(x: Tensor) -> Tensor:
    # log(expm1(x)) overflows float32 from x = 89 (a flat member starts 100 wide)
    return x + torch.log(-torch.expm1(-x))


def _layout(site, rows: Tensor, indices) -> Tensor:
    """Member rows ``(members, rest)`` -> the site's layout at these members."""
    order = site.local_dims + site.other_dims
    shape = [len(i) for i in indices] + [site.shape[d] for d in site.other_dims]
    return rows.reshape(shape).permute([order.index(d) for d in range(len(order))])


@torch.no_grad()
def draw_members(local_latents, g: Tensor, g_std: Tensor, run_model, chunks) -> dict:
    """Every member of every local site at each of ``S`` globals draws (``g``, ``g_std``
    broadcast left of the model's plates): ``{site: (S, *shape)}``, constrained, drawn in
    runs of the model (``run_model(indices, draw)``) over ``chunks`` of members
    (``{plate: [index tensors]}``, each as the model subsamples it)."""
    sites, rows = local_latents.sites, {}
    for combination in itertools.product(*chunks.values()):
        indices = dict(zip(chunks, combination, strict=True))
        drawn = {}

        def draw(name, fn, indices=indices, drawn=drawn):
            k = local_latents.names.index(name)
            picked = [indices[plate] for plate in sites[k].local_plates]
            u, _ = local_latents.draw(k, g, g_std, picked, (), gaussian_prior(fn))
            drawn[name] = biject_to(sites[k].support)(u)
            return drawn[name]

        run_model(indices, draw)
        for k, site in enumerate(sites):
            value = drawn[site.name]
            value = value.reshape(len(g_std), *value.shape[value.dim() - len(site.shape) :])
            flat = local_latents.flat_members(k, [indices[p] for p in site.local_plates])
            order = [0] + [1 + d for d in site.local_dims + site.other_dims]
            value = value.permute(order).reshape(len(value), len(flat), -1)
            if site.name not in rows:
                rows[site.name] = value.new_zeros(len(value), site.members, value.shape[-1])
            rows[site.name].index_copy_(1, flat, value)
    out = {}
    for site in sites:
        order = site.local_dims + site.other_dims
        value = rows[site.name].reshape(-1, *(site.shape[d] for d in order))
        inverse = [order.index(d) for d in range(len(order))]
        out[site.name] = value.permute([0] + [1 + d for d in inverse])
    return out
