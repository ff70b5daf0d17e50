r"""Local latents of ``AutoFlowGuide``: per-member parameters and a learned prior.

A latent site in a *local plate* (one the model subsamples, or one named in
``AutoFlowGuide(..., local_plates=[...])``) is kept out of the global flow's vector. Its
guide is ``q(globals) * prod_i q(local_i | globals)``. Every element of a member ``i`` has
its own Gaussian ``N(m_i, s_i^2)``, indexed by the plate's subsample (a step touches only the
minibatch's members), and a network shared by all members of the site gives a learned prior
given the globals draw ``g``; the member's conditional is their product::

    q(u_i | g) ∝ N(u_i; prior_mean(g), 1 / prior_precision(g)) * N(u_i; m_i, s_i^2)
    (log prior_precision, prior_mean) = linear(g) + mlp(g standardised, m_i, log s_i)

in unconstrained space, then ``biject_to(support)``: a Gaussian of precision
``prior_precision + 1 / s_i^2``. This is the form of the exact conditional of a normal
hierarchy (``theta_i | mu, tau, y_i``: the prior ``N(mu, tau)`` times the likelihood's
``N(y_i, sigma_i)``), which the linear part represents exactly (``-2 log tau``, ``mu``), so
that a member's location and spread follow the globals without having to be learned from
them: as the global scale shrinks, every member's spread shrinks with it (the funnel of
hierarchical models). The members' Gaussians start wide (``s_i = 1``), so the prior leads.
Within one member the elements are conditionally independent given ``g``.
``docs/guide/local-latents.md`` has the measurements behind this choice.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 1000, subsample_size=10):
    ...         pyro.sample("theta", dist.Normal(0.0, tau))
    >>> guide = AutoFlowGuide(model).setup()
    >>> guide.local_sites, guide.latent_dim
    (('theta',), 1)
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import broadcast_shape, sum_rightmost
from torch import Tensor, nn
from torch.distributions import biject_to

from .model_prior import gaussian_prior

__all__ = [
    "MEMBER_DRAWS",
    "LocalLatents",
    "LocalSite",
    "check_local_sites",
    "find_local_sites",
    "member_draws",
    "sparse_gradients",
    "take_local_sites",
]

HIDDEN = 16  # the prior network's width (benchmarks/RESULTS.md, "Local latents")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# The learned prior's precision within e^(+-30): room for a global scale near zero (the
# funnel's neck), finite in float32; a clamp: within it the linear part stays exact.
LOG_PRECISION_BOUND = 30.0
MEMBER_SCALE = 1.0  # the members' Gaussians start this wide: the prior, not they, leads
MEMBER_DRAWS = "_member_draws"  # the plate of several draws per member (member_draws)


@dataclass(frozen=True)
class LocalSite:
    """A local latent site: its unconstrained shape at the plates' full sizes, which of
    its dimensions are local plates (members), and every plate it sits in."""

    name: str
    shape: tuple[int, ...]
    local_dims: tuple[int, ...]  # positions in ``shape``, ascending
    local_plates: tuple[str, ...]  # the plates of ``local_dims``, same order
    batch_ndim: int  # leading dimensions of ``shape`` that are batch (not event) dims
    event_dim: int  # the site's own event_dim (constrained)
    frames: tuple[str, ...] = ()  # every plate of the site, to enter when sampling
    support: object = None

    @property
    def members(self) -> int:
        return math.prod(self.shape[d] for d in self.local_dims)

    @property
    def other_dims(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.shape)) if d not in self.local_dims)

    def key(self) -> tuple:
        """What a saved state records and must agree on (all but the support)."""
        return (
            self.name,
            self.shape,
            self.local_dims,
            self.local_plates,
            self.batch_ndim,
            self.event_dim,
            self.frames,
        )


def check_local_sites(local_latents, found) -> None:
    """A guide's local sites (saved, or made at setup) must be ``found`` (the model's sites,
    or a saved state's keys); model sites then lend the guide their supports."""
    have = [] if local_latents is None else [site.key() for site in local_latents.sites]
    now = [site.key() if isinstance(site, LocalSite) else tuple(site) for site in found]
    if have != now:
        raise ValueError(
            "AutoFlowGuide: the state dict's local latents differ from the model's: "
            f"{_describe(have)} against {_describe(now)}"
        )
    if local_latents is not None and found and isinstance(found[0], LocalSite):
        local_latents.sites = list(found)


def _describe(keys) -> str:
    return ", ".join(f"{k[0]}{list(k[1])} local in {list(k[3])}" for k in keys) or "none"


def find_local_sites(prototype_trace, local_plates=()) -> list[LocalSite]:
    """The latent sites in a subsampled plate or a plate named in ``local_plates``.

    Raises ``ValueError`` naming a plate of ``local_plates`` that no latent site is in, and
    a local site that does not span its plate (broadcast along it instead).
    """
    sites, seen = [], set()
    for name, site in prototype_trace.iter_stochastic_nodes():
        fn = site["fn"]
        unconstrained = biject_to(fn.support).inv(site["value"])
        batch_ndim = site["value"].dim() - fn.event_dim
        shape = list(unconstrained.shape)
        local = []
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized:
                continue
            seen.add(frame.name)
            full = frame.full_size or frame.size
            if full == frame.size and frame.name not in local_plates:
                continue
            pos = batch_ndim + frame.dim
            if pos < 0 or shape[pos] != frame.size:
                raise ValueError(
                    f"AutoFlowGuide: local latent site {name!r} is in plate {frame.name!r} "
                    f"but its value of shape {tuple(site['value'].shape)} does not span "
                    f"the plate's dimension {frame.dim}; give it the plate's size there"
                )
            shape[pos] = full
            local.append((pos, frame.name))
        if local:
            local.sort()
            sites.append(
                LocalSite(
                    name=name,
                    shape=tuple(shape),
                    local_dims=tuple(p for p, _ in local),
                    local_plates=tuple(n for _, n in local),
                    batch_ndim=batch_ndim,
                    event_dim=fn.event_dim,
                    frames=tuple(f.name for f in site["cond_indep_stack"]),
                    support=fn.support,
                )
            )
    unknown = sorted(set(local_plates) - seen)
    if unknown:
        raise ValueError(
            f"AutoFlowGuide: local_plates names {unknown}, but no latent site of the model is "
            f"in such a plate (its latent sites' plates: {sorted(seen) or 'none'})"
        )
    return sites


def take_local_sites(prototype_trace, sites) -> dict[str, Tensor]:
    """Remove the local sites from a guide's prototype trace (the flow's vector holds the
    globals); their unconstrained values, the members' start."""
    init = {}
    for site in sites:
        node = prototype_trace.nodes[site.name]
        init[site.name] = biject_to(node["fn"].support).inv(node["value"]).detach()
        prototype_trace.remove_node(site.name)
    return init


@contextmanager
def sparse_gradients(local_latents):
    """Within this context the per-member parameters get sparse gradients (``fit``'s
    default optimizer then updates only the touched rows, ``pyroflows.adam``)."""
    local_latents.sparse_gradients = True
    try:
        yield local_latents
    finally:
        local_latents.sparse_gradients = False


@contextmanager
def member_draws(local_latents, draws: int, dim: int, globals_draws: int = 1):
    """Within this context the guide draws every member's locals ``draws`` times (a plate
    ``MEMBER_DRAWS`` at ``dim``) for each of ``globals_draws`` globals draws (at ``dim - 1``),
    fresh for each: ``pyroflows.member_bound.MemberImportanceELBO``'s bound."""
    local_latents.member_draws = (draws, dim, globals_draws)
    try:
        yield local_latents
    finally:
        local_latents.member_draws = None


def periodic_repeat(value: Tensor, size: int, dim: int) -> Tensor:
    """Tile ``value`` along ``dim`` to ``size``: a start for members the prototype did not see."""
    index = torch.arange(size, device=value.device) % value.shape[dim]
    return value.index_select(dim, index)


class PriorNet(nn.Module):
    """A member's learned prior given the globals: ``(log precision, mean)``, linear in the
    globals' unconstrained values (exact for a normal hierarchy: ``-2 log tau`` and ``mu``)
    plus a small network of the standardised globals and the member's own parameters."""

    def __init__(self, global_dim: int):
        super().__init__()
        self.linear = nn.Linear(global_dim, 2)
        self.hidden = nn.Linear(global_dim + 2, HIDDEN)
        self.out = nn.Linear(HIDDEN, 2)
        for layer in (self.linear, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, g: Tensor, g_std: Tensor, loc: Tensor, scale: Tensor):
        shape = broadcast_shape(tuple(g_std.shape[:-1]), tuple(loc.shape))  # (no sympy)
        features = torch.cat(
            [
                g_std.expand(shape + g_std.shape[-1:]),
                loc.expand(shape).unsqueeze(-1),
                scale.log().expand(shape).unsqueeze(-1),
            ],
            dim=-1,
        )
        return (self.linear(g) + self.out(torch.tanh(self.hidden(features)))).unbind(-1)


class LocalLatents(nn.Module):
    """Per-member parameters and the conditional networks of a guide's local sites.

    Arguments:
        sites: the local sites (``find_local_sites``).
        global_dim: dimensions of the globals draw the networks condition on.
        init: ``{site: unconstrained value}`` at the prototype's sizes (tiled to all
            members), or ``None`` for zeros (a state dict then fills them).
        init_scale: every member's starting scale.
    """

    def __init__(self, sites, global_dim: int, init: dict | None, init_scale: float, like):
        super().__init__()
        self.sites = list(sites)
        self.sparse_gradients = False
        self.member_draws: tuple | None = None  # (draws, plate dim, globals draws): member_draws
        self.loc = nn.ParameterList()
        self.scale_raw = nn.ParameterList()
        self.nets = nn.ModuleList()
        raw = math.log(math.expm1(MEMBER_SCALE))  # softplus(raw) == MEMBER_SCALE
        for site in self.sites:
            value = like.new_zeros(site.shape) if init is None else self._tiled(site, init)
            self.loc.append(nn.Parameter(self._rows(site, value).to(like)))
            self.scale_raw.append(nn.Parameter(torch.full_like(self.loc[-1], raw)))
            self.nets.append(PriorNet(global_dim).to(like))

    @staticmethod
    def _tiled(site: LocalSite, init: dict) -> Tensor:
        value = init[site.name]
        for dim in site.local_dims:
            value = periodic_repeat(value, site.shape[dim], dim)
        return value

    @staticmethod
    def _rows(site: LocalSite, value: Tensor) -> Tensor:
        """``shape`` -> ``(members, rest)``: the local plates' dimensions first."""
        order = site.local_dims + site.other_dims
        return value.permute(order).reshape(site.members, -1).contiguous()

    def _gather(self, k: int, param: Tensor, indices: list[Tensor]) -> Tensor:
        """The members ``indices`` (one index tensor per local plate) of a row parameter,
        in the site's own layout."""
        site = self.sites[k]
        flat = self.flat_members(k, indices)
        picked = [len(i) for i in indices]
        rows = nn.functional.embedding(flat, param, sparse=self.sparse_gradients)
        rows = rows.reshape(picked + [site.shape[d] for d in site.other_dims])
        order = site.local_dims + site.other_dims
        return rows.permute([order.index(d) for d in range(len(order))])

    def conditional(self, k: int, g: Tensor, g_std: Tensor, indices: list[Tensor], prior=None):
        """The mean and sd of site ``k``'s members ``indices`` (unconstrained, elementwise)
        given the globals draw ``g`` and its standardised ``g_std`` (batch dims aligned
        with the site's from the right): a prior times the member's Gaussian. The prior is
        ``prior`` (``(mean, precision)``, the model's own: ``pyroflows.model_prior``) where
        given, else the learned one."""
        site = self.sites[k]
        loc = self._gather(k, self.loc[k], indices)
        scale = nn.functional.softplus(self._gather(k, self.scale_raw[k], indices))
        if prior is None:
            event = (1,) * (len(site.shape) - site.batch_ndim)
            g = g.reshape(g.shape[:-1] + event + g.shape[-1:])
            g_std = g_std.reshape(g_std.shape[:-1] + event + g_std.shape[-1:])
            log_prior_precision, prior_mean = self.nets[k](g, g_std, loc, scale)
        else:
            prior_mean, log_prior_precision = prior[0], prior[1].log()
        bound = LOG_PRECISION_BOUND
        prior_precision = log_prior_precision.clamp(-bound, bound).exp()
        precision = prior_precision + scale.pow(-2)
        mean = (prior_precision * prior_mean + loc / scale.square()) / precision
        return mean, precision.rsqrt()

    def draw(self, k: int, g: Tensor, g_std: Tensor, indices: list[Tensor], shape=(), prior=None):
        """Unconstrained draws of site ``k``'s members ``indices`` (see ``conditional``),
        broadcast with ``shape`` (several draws per member), and their elementwise log
        densities."""
        mean, sd = self.conditional(k, g, g_std, indices, prior)
        shape = broadcast_shape(tuple(shape), tuple(mean.shape))
        eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        return mean + sd * eps, -0.5 * eps.square() - HALF_LOG_2PI - sd.log()

    def _draws_shape(self, site: LocalSite) -> tuple:
        if getattr(self, "member_draws", None) is None:  # (older pickles lack it)
            return ()
        draws, dim, globals_draws = self.member_draws
        return (globals_draws, draws) + (1,) * (-dim - 1 + len(site.shape) - site.batch_ndim)

    def sample(self, g: Tensor, g_std: Tensor, plates: dict, run_model=None) -> dict:
        """Sample every local site inside its plates (the guide's, so subsampled as the
        model is) as Pyro sample sites whose density is ``q(local | globals)``; within
        ``member_draws`` each member is drawn that many times, in a plate of its own.
        ``run_model(indices, draw)``, where given, runs the model to its local sites
        (``pyroflows.model_prior.run_to_locals``): the model's own priors are then used."""
        drawn, shape = {}, self._draws_shape
        if run_model is not None:
            indices = {name: plate.indices for name, plate in plates.items()}

            def draw(name, fn):
                k = self.names.index(name)
                site = self.sites[k]
                picked = [indices[plate] for plate in site.local_plates]
                drawn[name] = self.draw(k, g, g_std, picked, shape(site), gaussian_prior(fn))
                return biject_to(site.support)(drawn[name][0])

            run_model(indices, draw)
        values, k_draws = {}, getattr(self, "member_draws", None)  # one plate, for every site
        member_plate = k_draws and pyro.plate(MEMBER_DRAWS, k_draws[0], dim=k_draws[1])
        for k, site in enumerate(self.sites):
            with ExitStack() as stack:
                entered = {name: stack.enter_context(plates[name]) for name in site.frames}
                if member_plate is not None:
                    stack.enter_context(member_plate)
                indices = [entered[name] for name in site.local_plates]
                u, log_q = drawn.get(site.name) or self.draw(k, g, g_std, indices, shape(site))
                values[site.name] = pyro.sample(site.name, self.delta(site, u, log_q))
        return values

    @property
    def names(self) -> list[str]:  # the sites' names, in model order
        return [site.name for site in self.sites]

    @staticmethod
    def delta(site: LocalSite, u: Tensor, log_q: Tensor):
        """The constrained value as a ``Delta`` carrying ``log q`` of the site's value."""
        transform = biject_to(site.support)
        value = transform(u)
        event = len(site.shape) - site.batch_ndim
        log_q = sum_rightmost(log_q, event)
        log_det = transform.log_abs_det_jacobian(u, value)
        log_det = sum_rightmost(log_det, log_det.dim() - log_q.dim())
        return dist.Delta(value, log_density=log_q - log_det, event_dim=site.event_dim)

    @torch.no_grad()
    def draw_all(self, g: Tensor, g_std: Tensor) -> dict[str, Tensor]:
        """Every member of every local site at each of ``S`` standardised globals draws
        ``g_std (S, D)``: ``{site: (S, *shape)}`` in constrained space (the learned prior;
        the model's: ``pyroflows.model_prior.draw_members``)."""
        out = {}
        for k, site in enumerate(self.sites):
            device = g_std.device
            indices = [torch.arange(site.shape[d], device=device) for d in site.local_dims]
            shape = g_std.shape[:1] + (1,) * site.batch_ndim + g_std.shape[-1:]
            u, _ = self.draw(k, g.reshape(shape), g_std.reshape(shape), indices)
            out[site.name] = biject_to(site.support)(u)
        return out

    def flat_members(self, k: int, indices: list[Tensor]) -> Tensor:
        site = self.sites[k]
        sizes = [site.shape[d] for d in site.local_dims]
        flat = torch.zeros((), dtype=torch.long, device=indices[0].device)
        for j, index in enumerate(indices):
            view = [1] * len(indices)
            view[j] = -1
            flat = flat * sizes[j] + index.reshape(view)
        return flat.reshape(-1)

    def describe(self) -> list[tuple]:
        """The sites' ``key()``s, saved with the state."""
        return [site.key() for site in self.sites]
