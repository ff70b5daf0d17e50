"""Checks of a model's sites, the latent layout, and a start that needs no sampling.

``AutoFlowGuide`` maps every continuous latent site to one unconstrained vector with
``biject_to``. That is sound only for sites it can guide: continuous, in plates of fixed
size, with a support that does not move with other latents. These checks refuse the rest at
setup, naming the site and the fix, rather than fitting them silently wrong.
"""

from __future__ import annotations

import math
import warnings

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from pyro.infer.autoguide.initialization import init_to_median as pyro_init_to_median
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to, constraints

__all__ = [
    "Layout",
    "arguments_signature",
    "check_dependent_supports",
    "check_latent_site",
    "check_layout",
    "check_plate_sizes",
    "check_vectorised_density",
    "describe_layout",
    "enumerated",
    "init_to_median",
    "split_latent",
    "structure_signature",
    "unconstrained_energy",
    "unpack_latent",
    "unpack_with_log_det",
]

Layout = list[tuple[str, tuple[int, ...]]]  # (site name, unconstrained shape) in latent order


def init_to_unconstrained_zero(site):
    """The constrained image of 0 (Pyro's ``init_to_feasible``), flat priors too, in the
    prior's dtype. A discrete site (enumerated, never guided) has no such image: a draw."""
    fn = site["fn"]
    if fn.support.is_discrete:
        return fn.sample().detach()
    transform = biject_to(fn.support)
    try:
        zero = torch.zeros_like(transform.inv(fn.sample().detach()))  # its shape and dtype
    except NotImplementedError:  # a flat prior (ImproperUniform) cannot be sampled
        shape = transform.inverse_shape(fn.shape())
        zero = torch.zeros(shape, dtype=torch.get_default_dtype())
    return transform(zero).detach()


def init_to_median(site=None, num_samples: int = 15):
    """Pyro's ``init_to_median``, falling back to a point needing no sampling.

    Pyro's own fallback samples from the prior, which fails for ``ImproperUniform`` flat
    priors; this one uses the constrained image of zero.

    Example:
        >>> import pyro.distributions as dist
        >>> from torch.distributions import constraints
        >>> flat = dist.ImproperUniform(constraints.positive, (), (2,))
        >>> site = {"fn": flat, "is_observed": False, "type": "sample", "value": None,
        ...         "name": "s", "infer": {}}
        >>> init_to_median(site)
        tensor([1., 1.])
    """
    if site is None:
        return lambda site: init_to_median(site, num_samples)
    try:
        return pyro_init_to_median(site, num_samples, fallback=init_to_unconstrained_zero)
    except NotImplementedError:  # Pyro's multivariate path samples even where it cannot
        return init_to_unconstrained_zero(site)


def log_joint(model, trace, args, kwargs) -> float:
    """The model's log joint (observations included) at the latent values of ``trace``;
    ``-inf`` where it is not finite.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     pyro.sample("y", dist.Normal(pyro.sample("x", dist.Normal(0.0, 1.0)), 1.0),
        ...                 obs=torch.tensor(0.0))
        >>> trace = poutine.trace(model).get_trace()
        >>> trace.nodes["x"]["value"] = torch.tensor(0.0)
        >>> round(log_joint(model, trace, (), {}), 4)  # two unit normals at their centre
        -1.8379
    """
    # unvalidated: bad data (NaN) is for the fit's own checks to name, not for a comparison
    with torch.no_grad(), pyro.validation_enabled(False):
        replay = poutine.trace(poutine.replay(model, trace=trace)).get_trace
        replayed = poutine.block(replay)(*args, **kwargs)  # unseen by any outer handler
        value = float(replayed.log_prob_sum())
    return value if math.isfinite(value) else -math.inf


def enumerated(msg) -> bool:
    """Whether a site is a discrete site marginalised by enumeration (not guided)."""
    return msg["type"] == "sample" and msg["infer"].get("enumerate") in ("parallel", "sequential")


def check_latent_site(name: str, site) -> None:
    """Refuse a latent site a flow cannot guide: discrete, or without a bijection."""
    fn = site["fn"]
    if fn.support.is_discrete:
        raise ValueError(
            f"AutoFlowGuide: latent site {name!r} is discrete ({fn.support}); flows need "
            "continuous latents. Enumerate it (infer={'enumerate': 'parallel'} with "
            "TraceEnum_ELBO) so that it is marginalised, or give it its own guide; see "
            "https://pyro.ai/examples/enumeration.html"
        )
    try:
        biject_to(fn.support)
    except NotImplementedError:
        raise ValueError(
            f"AutoFlowGuide: latent site {name!r} has support {fn.support}, which no "
            "registered bijection maps to unconstrained space (torch.distributions.biject_to "
            "has none for it). Reparametrise it (e.g. a unit vector as x / |x| with x "
            "unconstrained), or register a transform with biject_to.register."
        ) from None


def check_dependent_supports(model, prototype_trace, args, kwargs) -> None:
    """Re-run the model at a perturbed point; a site whose support moved depends on others.

    ``b ~ Uniform(0, 1 - a)`` cannot be guided by a fixed ``biject_to`` per site (Pyro's
    autoguides silently draw outside the support), so it is refused naming the site.
    """
    generator = torch.Generator().manual_seed(0)
    moved = {}
    for name, site in prototype_trace.iter_stochastic_nodes():
        transform = biject_to(site["fn"].support)
        u = transform.inv(site["value"].detach())
        noise = torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)
        moved[name] = transform(u + 0.5 * noise)
    try:
        conditioned = poutine.condition(model, data=moved)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
    except (ValueError, RuntimeError) as error:  # the model refuses the moved point
        warnings.warn(
            "AutoFlowGuide: could not check whether a latent's support depends on other "
            f"latents: the model raised at a moved point ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0]}). If one does (b ~ Uniform(0, 1 - a)), "
            "the guide will draw outside it; reparametrise such a site.",
            stacklevel=5,
        )
        return
    for name, site in prototype_trace.iter_stochastic_nodes():
        before = _support_key(site["fn"].support)
        after = _support_key(trace.nodes[name]["fn"].support)
        same = len(before) == len(after) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after, strict=True)
        )
        if not same:
            raise ValueError(
                f"AutoFlowGuide: the support of latent site {name!r} ({site['fn'].support}) "
                "depends on other latent variables, so no fixed transform maps the flow "
                "into it. Reparametrise, e.g. b = (1 - a) * u with u ~ Uniform(0, 1) (add "
                "pyro.factor(..., log(1 - a)) if the density of b must be kept)."
            )


def _support_key(support) -> tuple:
    """The tensors that define a constraint (e.g. an interval's bounds), for comparison."""
    parts = []
    for value in vars(support).values():
        if isinstance(value, Tensor):
            parts.append(value.detach())
        elif isinstance(value, constraints.Constraint):
            parts.extend(_support_key(value))
    return tuple(parts)


def arguments_signature(args, kwargs) -> tuple:
    """What of a model's arguments can change its plates' sizes: tensor shapes, and the
    values of plain numbers and strings (other objects count by type)."""

    def key(value):
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape))
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, len(value))
        return type(value).__name__

    return tuple(key(a) for a in args), tuple(sorted((k, key(v)) for k, v in kwargs.items()))


def check_plate_sizes(model, prototype_trace, args, kwargs) -> None:
    """Refuse arguments under which a latent site's plate has another full size."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    for name, site in prototype_trace.iter_stochastic_nodes():
        now = trace.nodes.get(name)
        if now is None:
            continue
        sizes = {f.name: f.full_size or f.size for f in now["cond_indep_stack"] if f.vectorized}
        for frame in site["cond_indep_stack"]:
            size = frame.full_size or frame.size
            if frame.vectorized and sizes.get(frame.name, size) != size:
                raise ValueError(
                    f"AutoFlowGuide: latent site {name!r} is in plate {frame.name!r} of size "
                    f"{size} for this guide, but of size {sizes[frame.name]} for these "
                    "arguments. A guide's parameters are made for its plates' sizes: create "
                    "a new guide for the new data."
                )


def structure_signature(trace) -> tuple:
    """What a compiled step freezes of one run: per sample site its name, distribution,
    shapes, support, observed or not, plates (name, dim, size), and whether it is scaled or
    masked, in the order the sites ran."""

    def plates(site):
        return tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"])

    return tuple(
        (
            name,
            type(site["fn"]).__name__,
            tuple(site["fn"].batch_shape),
            tuple(site["fn"].event_shape),
            str(site["fn"].support),
            site["is_observed"],
            tuple(site["value"].shape) if isinstance(site["value"], Tensor) else None,
            plates(site),
            isinstance(site["scale"], Tensor) or site["scale"] != 1.0,
            site["mask"] is not None,
        )
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    )


def check_layout(expected: Layout, actual: Layout) -> None:
    """A saved state's latent layout must be the model's."""
    if list(expected) != list(actual):
        raise ValueError(
            "the state dict belongs to a model with other latent sites: it has "
            f"{describe_layout(expected)}, this model has {describe_layout(actual)}"
        )


def describe_layout(layout: Layout) -> str:
    """``"mu[], theta[8]"``: the sites and unconstrained shapes of a layout."""
    return ", ".join(f"{name}{list(shape)}" for name, shape in layout)


def split_latent(prototype_trace, unconstrained_shapes: dict, latent: Tensor):
    """``(name, biject_to transform, unconstrained piece (*batch, *shape))`` per latent site
    of one unconstrained vector (or a batch of them), in the trace's order."""
    batch, pos = latent.shape[:-1], 0
    for name, site in prototype_trace.iter_stochastic_nodes():
        shape = unconstrained_shapes[name]
        size = math.prod(shape)
        piece = latent[..., pos : pos + size].reshape(batch + tuple(shape))
        yield name, biject_to(site["fn"].support), piece
        pos += size


def unpack_latent(prototype_trace, unconstrained_shapes: dict, latent: Tensor):
    """``(site, unconstrained value)`` per latent site, as Pyro's
    ``AutoContinuous._unpack_latent`` yields them (the batch dims of ``latent`` left of the
    model's plate dims, for vectorised inference), but without ``torch.broadcast_shapes``,
    whose first call imports sympy: about 0.5 s of every fresh process."""
    batch, pos = tuple(latent.shape[:-1]), 0
    for name, site in prototype_trace.iter_stochastic_nodes():
        shape = tuple(unconstrained_shapes[name])
        size = math.prod(shape)
        event_dim = site["fn"].event_dim + len(shape) - len(site["value"].shape)
        full = broadcast_shape(shape, batch + (1,) * event_dim)
        yield site, latent[..., pos : pos + size].view(full)
        pos += size
    if pos != latent.shape[-1] and not torch.jit.is_tracing():
        raise ValueError(f"a latent vector of {latent.shape[-1]} elements for {pos} latent ones")


def unpack_with_log_det(prototype_trace, unconstrained_shapes: dict, u: Tensor):
    """Unconstrained vectors ``(*batch, D)`` -> ``{site: constrained value (*batch, *shape)}``
    and ``log|dz/du|`` of each ``(*batch,)``."""
    values, log_det, batch = {}, 0.0, u.shape[:-1]
    for name, transform, piece in split_latent(prototype_trace, unconstrained_shapes, u):
        values[name] = transform(piece)
        jacobian = transform.log_abs_det_jacobian(piece, values[name])
        log_det = log_det + jacobian.reshape((*batch, -1)).sum(-1)
    return values, log_det


def unconstrained_energy(model, prototype_trace, unconstrained_shapes: dict, args, kwargs):
    """``u -> -log p(x, z(u)) - log|dz/du|``: the model's energy over one unconstrained vector."""

    def energy(u):
        values, log_det = unpack_with_log_det(prototype_trace, unconstrained_shapes, u)
        conditioned = poutine.condition(model, data=values)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        return -(trace.log_prob_sum() + log_det)

    return energy


def check_vectorised_density(model, args, kwargs, trace, values: dict, log_joint) -> None:
    """The log density of a run over a plate of draws (``trace``; ``values`` holds each
    site's draws, ``log_joint`` each draw's total) must be the model's own at the
    first draw: a model can broadcast over the draws without an error and still wrongly
    (``x[..., None, :]`` on a batched ``x`` adds a dimension, and the densities are summed
    over the wrong cells). Raises ``ValueError`` (a shape error: callers then run one draw
    at a time) where they differ. Skipped for a subsampled run (another would draw other
    members)."""
    for site in trace.nodes.values():
        if any(f.full_size not in (None, f.size) for f in site.get("cond_indep_stack", ())):
            return
    with poutine.block():
        latent = {n: v[0] for n, v in values.items() if not trace.nodes[n]["is_observed"]}
        conditioned = poutine.condition(model, data=latent)
        one = poutine.trace(conditioned).get_trace(*args, **kwargs).log_prob_sum().detach()
    vectorised = log_joint[0].detach()
    if torch.isfinite(one) and not torch.isclose(vectorised, one.to(vectorised), 1e-4, 1e-3):
        raise ValueError(
            f"run over a plate of draws, the model's log density has the wrong shape: "
            f"{float(vectorised):.6g} at a draw where the model alone gives {float(one):.6g}"
        )
