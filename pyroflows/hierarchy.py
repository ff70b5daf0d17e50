r"""Which whole plates of a model hold a hierarchy's local latents (``infer``'s ``locals``).

A plate is a hierarchy's level when latent sites live in it, each with a prior that is
Gaussian in unconstrained space (``Normal``, ``LogNormal``: ``AutoFlowGuide``'s
``local_prior="model"`` then uses that prior as it is, ``pyroflows.model_prior``), and latent
sites outside it (the globals) remain for the flow. Such plates can be declared
``local_plates``: the flow then carries only the globals, and each member's conditional
follows them as the model says, which is where a centred hierarchy's funnel lives. Weighing
the members one by one (``pyroflows.member_resample``) also needs each observation to belong
to one member: inside the plate, or indexing it from another plate
(``pyroflows.member_owners`` checks that by running the model).

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(y):
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", len(y)):
    ...         theta = pyro.sample("theta", dist.Normal(0.0, tau))
    ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y)
    >>> trace = pyro.poutine.trace(model).get_trace(torch.zeros(5))
    >>> hierarchy_plates(trace)
    (('groups',), '')
"""

from __future__ import annotations

from pyro.poutine.util import site_is_subsample

from .model_prior import gaussian_prior

__all__ = ["hierarchy_plates"]


def hierarchy_plates(trace) -> tuple[tuple[str, ...], str]:
    """The plates of ``trace`` (a model's trace) that can be ``local_plates`` (see the
    module docstring), and, where there are none, why, in words."""
    sites = [
        s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
    ]
    latent = [s for s in sites if not s["is_observed"]]

    def plates_of(site) -> set[str]:
        return {f.name for f in site["cond_indep_stack"] if f.vectorized and f.size > 1}

    candidates = sorted({p for s in latent for p in plates_of(s)})
    if not candidates:
        return (), "no latent site is in a plate"
    reasons = []
    for plate in candidates:
        inside = [s for s in latent if plate in plates_of(s)]
        not_gaussian = [s["name"] for s in inside if gaussian_prior(s["fn"]) is None]
        if not_gaussian:
            reasons.append(f"plate {plate!r}: the prior of {not_gaussian[0]!r} is not Gaussian")
        elif len(inside) == len(latent):
            reasons.append(f"plate {plate!r}: no latent site outside it to be the globals")
        else:
            return (plate,), ""
    return (), "; ".join(reasons)
