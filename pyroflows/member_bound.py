r"""The importance-weighted bound member by member, for a guide with local latents.

``MemberImportanceELBO`` trains (``fit(..., loss="iwae", num_particles=K)`` on a guide with
local latents) and weighs globals draws with each member integrated out
(``globals_diagnostic``, ``importance_resample`` through ``pyroflows.member_resample``).

Example (ten globals draws weighed in one run, each member integrated out by 8 draws):
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyroflows import AutoFlowGuide
    >>> def model(y):
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", len(y)):
    ...         pyro.sample("y", dist.Normal(pyro.sample("u", dist.Normal(0.0, tau)), 1.0), obs=y)
    >>> y = torch.zeros(30)
    >>> guide = AutoFlowGuide(model, local_plates=["groups"]).setup(y)
    >>> latents = guide.get_posterior().sample((10,))
    >>> bounds, _, weights = MemberImportanceELBO(8).weigh_many(model, guide, (y,), {}, latents)
    >>> bounds.shape, weights.shape
    (torch.Size([10]), torch.Size([10, 8, 30]))
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

from .locals import MEMBER_DRAWS, member_draws
from .member_owners import observation_owners

__all__ = ["GLOBALS_DRAWS", "MemberImportanceELBO", "MembersNotSeparable"]

GLOBALS_DRAWS = "_globals_draws"  # the plate of several globals draws (weigh_many)


class MembersNotSeparable(ValueError):
    """The model cannot be weighed member by member: a term that depends on several
    members, or a log-density that does not broadcast over the draws' plates (the message
    names the site)."""


class MemberImportanceELBO(ELBO):
    r"""The importance-weighted bound member by member, for a guide with local latents.

    With one draw ``g`` of the globals and ``K = num_particles`` draws ``u_ik`` of each
    minibatch member's locals given it, the bound is::

        log p(g) - log q(g)
            + (N / B) sum_{i in batch} log (1/K) sum_k p(y_i, u_ik | g) / q(u_ik | g)

    (the model's terms in member ``i``'s plate over the guide's). It is a lower bound on
    ``log p(y)`` for every ``K``, the ELBO at ``K = 1``, tighter as ``K`` grows, and a
    minibatch's value is unbiased for the full-data one, so it trains with subsampling where
    the whole-draw bound (``ImportanceWeightedELBO``) cannot. What it changes: the ELBO
    charges ``q(globals)`` every member's conditional KL, so ``q(globals)`` shrinks to where
    the conditionals are already right (``benchmarks/RESULTS.md``, "Local latents: the trap,
    and the bound member by member"); here each member's cost is the smaller gap of its own K-draw
    estimate of ``log p(y_i | g)``. Gradients are the standard IWAE ones. ``fit(...,
    loss="iwae", num_particles=K)`` uses it for a guide with local latents.

    The model must broadcast over one more plate left of its own (as for vectorised
    particles), keep every term that depends on a member's locals inside the member's plate,
    and have its local latents in one local plate.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
        ...     with pyro.plate("groups", 50, subsample_size=10):
        ...         theta = pyro.sample("theta", dist.Normal(0.0, tau))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.zeros(10))
        >>> guide = AutoFlowGuide(model)
        >>> loss = MemberImportanceELBO(num_particles=8).loss(model, guide)
        >>> bool(loss > 0)
        True
    """

    def __init__(self, num_particles: int = 16, max_plate_nesting=float("inf")):
        if num_particles < 1:
            raise ValueError(f"num_particles must be at least 1, got {num_particles}")
        super().__init__(num_particles=1, max_plate_nesting=max_plate_nesting)
        self.member_particles = num_particles
        # {site outside the local plate: each element's member}, where the model indexes
        # the members from another plate (pyroflows.member_owners; full data only)
        self.owners: dict = {}

    def find_owners(self, model, guide, args, kwargs) -> MemberImportanceELBO:
        """Find, for these full-data arguments, which member each element of a site outside
        the local plate belongs to (``pyroflows.member_owners``), for a model that indexes
        the members from another plate; returns ``self``.

        Raises ``ValueError`` where such a site's elements do not each belong to one member.
        """
        owners, why = observation_owners(model, guide, args, kwargs)
        if why:
            raise MembersNotSeparable(
                f"MemberImportanceELBO: {why}; the members cannot be integrated out one by one"
            )
        self.owners = owners
        return self

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("MemberImportanceELBO draws its own traces (bound)")

    def bound(self, model, guide, args, kwargs) -> torch.Tensor:
        """The bound for one globals draw, as a tensor with its gradient."""
        return self.weigh(model, guide, args, kwargs)[0]

    def _local_plate(self, model, guide, args, kwargs) -> str:
        """The one local plate of the guide's locals (set up first; plate nesting guessed)."""
        if getattr(guide, "prototype_trace", None) is None:
            guide.setup(*args, **kwargs)
        sites = getattr(guide, "locals", None)
        plates = {site.local_plates for site in (sites.sites if sites is not None else [])}
        if len(plates) != 1 or len(next(iter(plates))) != 1:
            raise ValueError(
                "MemberImportanceELBO: the guide's local latents must all be in one local "
                f"plate (found {sorted(plates) or 'no local latents'})"
            )
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return next(iter(plates))[0]

    def _nesting(self, model, guide, args, kwargs) -> int:
        self._local_plate(model, guide, args, kwargs)  # sets up; guesses the nesting
        return self.max_plate_nesting

    def _weighed_sites(self, model, guide, args, kwargs, given, draws=None):
        """Run the guide (``K`` draws of each member; its latent ``given``) and the model
        replaying it, inside a plate of ``draws`` globals draws where given: ``(guide_trace,
        [(name, log_prob, sign, members' frame or None, owners or None)], the members'
        draws' dim)``."""
        plate = self._local_plate(model, guide, args, kwargs)
        k, dim = self.member_particles, -(self.max_plate_nesting + 1)

        def globals_draws():
            return pyro.plate(GLOBALS_DRAWS, draws, dim=dim - 1) if draws else nullcontext()

        with globals_draws(), member_draws(guide.locals, k, dim, draws or 1):
            guide_trace = poutine.trace(poutine.condition(guide, given)).get_trace(*args, **kwargs)
        with globals_draws(), pyro.plate(MEMBER_DRAWS, k, dim=dim):
            replayed = poutine.replay(model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        sites = []
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                _check_broadcast(name, site)
                frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
                owners = self.owners.get(name) if sign > 0 and frame is None else None
                sites.append((name, site["log_prob"], sign, frame, owners))
        return guide_trace, sites, dim

    def weigh(self, model, guide, args, kwargs, latent=None):
        """``(bound, guide_trace, member_log_weights)``: the bound for one globals draw (the
        guide's, or its unconstrained ``latent`` where given), the guide's trace (the
        globals and ``K`` draws of each member), and each draw's log weight
        ``log p(y_i, u_ik | g) - log q(u_ik | g)``, ``(K, members)`` (``None`` without
        members)."""
        given = {} if latent is None else {guide.latent_site_name: latent}
        guide_trace, sites, dim = self._weighed_sites(model, guide, args, kwargs, given)
        total, members, factor = self._sums(sites, dim)
        if factor is None:
            return total[0], guide_trace, None
        return total[0] + factor * _log_mean_exp(members[0], 0).sum(), guide_trace, members[0]

    def _sums(self, sites, dim, draws=None):
        """``(totals (G,), members (G, K, M), factor)``: each globals draw's terms outside
        the members and its member draws' log weights, for ``draws`` globals draws in a
        plate left of the members' draws (``None``: one, ``G = 1``); ``factor`` is the
        local plate's subsample scale, ``None`` without members."""
        totals, members, factor = 0.0, 0.0, None
        size = next((site[3].size for site in sites if site[3] is not None), 0)  # members
        for name, log_prob, sign, frame, owners in sites:
            x = _per_globals_draw(log_prob, dim - 1, draws or 1)
            if owners is not None:
                members = members + sign * _owned_by_member(x, dim, owners, size)
                # what no member owns must not vary with them (a where: -inf * 0 is NaN)
                x = torch.where(owners < 0, x, torch.zeros_like(x))
            if frame is None:
                totals = totals + sign * _same_for_every_draw(name, x, dim)
                continue
            factor = (frame.full_size or frame.size) / frame.size
            members = members + sign * _per_draw_and_member(x / factor, dim, frame.dim)
        return totals, members, factor

    @torch.no_grad()
    def weigh_many(self, model, guide, args, kwargs, latents):
        """``weigh`` for ``G`` globals draws ``latents (G, D)`` in one run of the guide and
        the model (a plate of the draws left of the members' draws; the model must
        broadcast over both): ``(bounds (G,), guide_trace, member_log_weights (G, K,
        members))``, without gradients."""
        g = len(latents)
        shape = (g,) + (1,) * (self._nesting(model, guide, args, kwargs) + 1) + latents.shape[-1:]
        given = {guide.latent_site_name: latents.reshape(shape)}
        guide_trace, sites, dim = self._weighed_sites(model, guide, args, kwargs, given, g)
        totals, members, factor = self._sums(sites, dim, g)
        bounds = totals + (factor or 1.0) * _log_mean_exp(members, 1).sum(-1)
        return bounds, guide_trace, members

    def loss(self, model, guide, *args, **kwargs):
        """The negative bound, without gradients."""
        with torch.no_grad():
            return -self.bound(model, guide, args, kwargs).item()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return -self.bound(model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = -self.bound(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _check_broadcast(name, site):
    """Every dimension of a site's log-density longer than one must be one of its plates'
    (a model that does not broadcast over the draws' plate puts them elsewhere)."""
    dims = {frame.dim for frame in site["cond_indep_stack"] if frame.vectorized}
    shape = torch.as_tensor(site["log_prob"]).shape
    stray = [i - len(shape) for i, size in enumerate(shape) if size > 1]
    stray = [d for d in stray if d not in dims]
    if stray:
        raise MembersNotSeparable(
            f"MemberImportanceELBO: at site {name!r} the log-density has shape "
            f"{tuple(shape)}, whose dimension {stray[0]} is in no plate: the model must "
            "broadcast over a plate left of its own (as for vectorised particles)"
        )


def _same_for_every_draw(name, x, dim):
    """A term outside the members' plate, ``(globals draws, ...)``: the same for every draw
    of the members' locals, or the model does not factorise over members and the bound would
    be wrong. Returns it per globals draw."""
    per = _per_draw_and_member(x, dim, None)[:, :, 0]
    if per.shape[1] > 1 and not torch.allclose(per, per[:, :1].expand_as(per), 1e-5, 1e-5):
        raise MembersNotSeparable(
            f"MemberImportanceELBO: site {name!r} is outside the local plate but its "
            "log-density changes with the members' locals; the member-by-member bound needs "
            "every term that depends on a member's locals inside that member's plate"
        )
    return per.mean(1)


def _per_globals_draw(log_prob, dim, count):
    """A log-density as ``(count, ...)``: its slices along the globals draws' plate at
    ``dim`` first (expanded where it does not vary with them), the dims right of it kept."""
    x = torch.as_tensor(log_prob)
    x = x.reshape((1,) * max(0, -dim - x.dim()) + tuple(x.shape))
    x = x.expand(*x.shape[: x.dim() + dim], count, *x.shape[x.dim() + dim + 1 :])
    return x.movedim(x.dim() + dim, 0)


def _per_draw_and_member(x, draw_dim, member_dim):
    """``(globals draws, member draws or 1, members or 1)`` from ``x`` of shape ``(globals
    draws, ...)``, whose dims ``draw_dim`` and ``member_dim`` (from the right) are kept and
    every other one summed."""
    count, rest = x.shape[0], tuple(x.shape[1:])
    n = max(len(rest), -draw_dim)
    x = x.reshape((count,) + (1,) * (n - len(rest)) + rest)
    keep = [1 + n + draw_dim] + ([1 + n + member_dim] if member_dim is not None else [])
    other = [i for i in range(1, n + 1) if i not in keep]
    if other:
        x = x.sum(other)
    return x.reshape(count, x.shape[1], -1)


def _owned_by_member(x, draw_dim, owners, members: int):
    """``(globals draws, member draws, members)``: the elements of ``x`` (``(globals draws,
    ...)``, the site's own dims rightmost, shaped as ``owners``) summed into the member each
    belongs to; every other dim except ``draw_dim`` summed."""
    count, rest = x.shape[0], tuple(x.shape[1:])
    n = max(len(rest), -draw_dim)
    x = x.reshape((count,) + (1,) * (n - len(rest)) + rest)
    k = 1 + n + draw_dim
    own_dims = range(1 + n - owners.dim(), 1 + n)
    other = [i for i in range(1, n + 1) if i != k and i not in own_dims]
    if other:
        x = x.sum(other, keepdim=True)
    x = x.movedim(k, 1)
    x = x.expand(*x.shape[: x.dim() - owners.dim()], *owners.shape).reshape(count, x.shape[1], -1)
    flat = owners.reshape(-1).to(x.device)
    owned = flat >= 0
    out = x.new_zeros(count, x.shape[1], members)
    return out.index_add_(2, flat[owned], x[..., owned])


def _log_mean_exp(log_w, dim):
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])
