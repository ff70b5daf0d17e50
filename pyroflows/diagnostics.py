r"""Can I trust this fit? ``psis_diagnostic``, ``importance_resample``, ``log_evidence``.

A guide ``q`` weighted by ``p(x, z) / q(z)`` is an importance sampler of the exact posterior;
PSIS k-hat (``pyroflows.psis``) says how far that can be trusted. Every function here draws
from the guide, re-runs the model at each draw and needs a model whose log density can be
evaluated (all latents either guided or drawn by the model from its prior). Draws are
vectorised over a leading plate when the model broadcasts (as for
``Trace_ELBO(vectorize_particles=True)``: write ``(x * beta).sum(-1)`` rather than
``x @ beta``); otherwise the model runs once per draw, with a warning, which is slower.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .draws import NOT_VECTORISED_HINT, Draws, draw, is_shape_error
from .guides import AutoFlowGuide
from .member_resample import resample_members
from .moment_matching import moment_match
from .objectives import MemberImportanceELBO
from .proposal import defensive_draws
from .psis import PSISResult, khat_threshold, psis
from .subsampling import SubsampledModel, subsampled_plate, trace_at_guide_draw

__all__ = [
    "Evidence",
    "ImportanceResample",
    "PSISResult",
    "globals_diagnostic",
    "importance_resample",
    "khat_threshold",
    "log_evidence",
    "psis",
    "psis_diagnostic",
]


def psis_diagnostic(model, guide, *args, num_samples: int = 1000, **kwargs) -> PSISResult:
    """The Pareto k-hat of the importance weights ``p(x, z) / q(z)`` of guide draws.

    Arguments:
        model, guide: a Pyro model and a guide fitted to it (any guide).
        args, kwargs: the model's arguments.
        num_samples: guide draws ``S`` (the threshold depends on it: ``khat_threshold``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> from pyro.infer.autoguide import init_to_value
        >>> at_zero = init_to_value(values={"x": torch.tensor(0.0)})
        >>> guide = AutoFlowGuide(model, init_loc_fn=at_zero, init_scale=1.0)  # exact
        >>> result = psis_diagnostic(model, guide, num_samples=2000)
        >>> result.ok, round(result.ess)
        (True, 2000)
    """
    draws = draw(model, guide, args, kwargs, num_samples)
    return PSISResult.from_log_weights(draws.log_weights)


def globals_diagnostic(
    model, guide, *args, num_samples: int = 1000, member_draws: int = 16, **kwargs
) -> PSISResult:
    """The Pareto k-hat of a local-latent guide's globals, each member integrated out.

    For a guide with local latents (``AutoFlowGuide``'s ``pyroflows.locals``) the joint
    weights ``p(x, z) / q(z)`` over the globals and every member degenerate as members are
    added, even for a good guide (their log variance grows with the number of members), so
    their k-hat says little. Here each of ``num_samples`` globals draws ``g`` is weighted by
    ``p(g) prod_i p̂(y_i | g) / q(g)``, where ``p̂(y_i | g)`` averages ``member_draws`` draws
    of member ``i``'s locals from its conditional (``MemberImportanceELBO``'s estimate,
    unbiased, so the weights are valid importance weights of the globals' marginal).

    What it tells: whether ``q(globals)`` can be trusted as (or importance-weighted into)
    the globals' marginal posterior; a poor conditional shows up too, as noisier weights.
    What it does not: how close each member's conditional is to its exact one. The model
    must see every member (call it with the full data), as for ``psis_diagnostic``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
        ...     with pyro.plate("groups", 20):
        ...         pyro.sample("theta", dist.Normal(0.0, tau))
        >>> guide = AutoFlowGuide(model, local_plates=["groups"])
        >>> result = globals_diagnostic(model, guide, num_samples=200)
        >>> result.num_samples
        200
    """
    if getattr(guide, "prototype_trace", None) is None:
        guide.setup(*args, **kwargs)
    if getattr(guide, "locals", None) is None:
        raise ValueError("globals_diagnostic: the guide has no local latents; use psis_diagnostic")
    why = subsampled_plate(trace_at_guide_draw(model, guide, args, kwargs))
    if why:
        raise SubsampledModel(
            f"globals_diagnostic: {why}; the weights need every member. Call it with "
            "arguments under which the plate is whole (e.g. subsample_size=None)"
        )
    bound = MemberImportanceELBO(member_draws).find_owners(model, guide, args, kwargs)
    with torch.no_grad():
        log_w = [bound.bound(model, guide, args, kwargs) for _ in range(num_samples)]
    return PSISResult.from_log_weights(torch.stack(log_w))


@dataclass
class ImportanceResample:
    """Guide draws importance-resampled towards the posterior.

    Attributes:
        samples: ``{site: (num_draws, *shape)}``, latent and deterministic sites.
        diagnostic: the PSIS diagnostic of the final proposal (after adaptation).
        num_adaptations: moment-matching transformations that were accepted.
        draws: the weighted draws before resampling.
        index: which of ``draws`` each resampled draw is, ``(num_draws,)``.
    """

    samples: dict[str, Tensor]
    diagnostic: PSISResult
    num_adaptations: int
    draws: Draws = field(repr=False)
    index: Tensor = field(repr=False, default=None)

    @property
    def ess(self) -> float:
        """Effective sample size of the importance weights the resampling used."""
        return self.diagnostic.ess

    def to_inference_data(self):
        """The draws as ``arviz.InferenceData`` (posterior, observed_data, sample_stats)."""
        # ArviZ is imported on demand, as pyroflows.to_inference_data is (it takes a second).
        from .arviz import from_importance_resample

        return from_importance_resample(self)


def importance_resample(
    model,
    guide,
    *args,
    num_samples: int = 4000,
    num_draws: int | None = None,
    adapt: bool = True,
    max_adaptations: int = 10,
    seed: int | None = None,
    predictive: bool = False,
    warn: bool = True,
    defensive: bool = False,
    **kwargs,
) -> ImportanceResample:
    """PSIS-weighted resampling of guide draws: draws closer to the exact posterior.

    ``num_samples`` draws are taken from the guide, weighted by ``p/q`` (Pareto-smoothed)
    and ``num_draws`` of them resampled with replacement. If the weights' k-hat is above
    the threshold and ``adapt`` is on, the draws are first moved by implicitly adaptive
    importance sampling (Paananen et al. 2021, arXiv:1906.08850, the "moment matching" of
    R's ``loo``): affine maps of the draws in the model's unconstrained space, matching
    the weighted mean, then the marginal scales, then the covariance, each kept only if it
    lowers k-hat. This repairs what a mean-field guide typically gets wrong (too narrow,
    missing correlations) at the cost of one model evaluation per draw per try.

    Arguments:
        model, guide, args, kwargs: as for ``psis_diagnostic``.
        num_samples: proposals drawn from the guide.
        num_draws: draws returned (default ``num_samples``).
        adapt: allow moment matching (only when every latent site is guided).
        max_adaptations: most moment-matching transformations to accept.
        seed: seeds the resampling (the guide draws use Pyro's random state).
        predictive: also draw the observed sites afresh at each proposal (``draws.predictive``).
        warn: warn when k-hat says the weights cannot be trusted (off for a caller that
            reports k-hat itself, as ``infer`` does).
        defensive: draw half the proposals through the flow from a heavy-tailed base
            (``pyroflows.proposal``): regions the guide covers thinly get draws, and no
            weight exceeds twice its ratio to that half (``AutoFlowGuide`` without local
            latents, a model that broadcasts over draws; ``infer`` weighs so). A guide with
            local latents always weighs its globals this way.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 2.0))
        >>> guide = AutoNormal(model, init_scale=0.5)   # an unfitted, too-narrow guide
        >>> out = importance_resample(model, guide, num_samples=4000, seed=0)
        >>> x = out.samples["x"]
        >>> bool(abs(x.mean() - 1.0) < 0.2 and abs(x.std() - 2.0) < 0.2)
        True
    """
    if getattr(guide, "locals", None) is not None:
        return _resample_members(model, guide, args, kwargs, num_samples, num_draws, seed, warn)
    if defensive:
        if not isinstance(guide, AutoFlowGuide):
            name = type(guide).__name__
            raise TypeError(
                f"importance_resample: defensive=True needs an AutoFlowGuide, not {name}"
            )
        try:
            draws = defensive_draws(model, guide, args, kwargs, num_samples, predictive=predictive)
        except (RuntimeError, ValueError, IndexError) as error:
            if not is_shape_error(error):
                raise
            raise ValueError(
                "importance_resample: defensive=True evaluates the model at all draws at once, "
                f"and this model does not run vectorised over them ({error}); to have it, "
                f"{NOT_VECTORISED_HINT}"
            ) from error
    else:
        draws = draw(model, guide, args, kwargs, num_samples, predictive=predictive)
    log_w = draws.log_weights
    result = PSISResult.from_log_weights(log_w)
    accepted = 0
    can_adapt = all(s.in_guide for s in draws.sites.values() if s.kind == "latent")
    if adapt and can_adapt and not result.ok:
        draws, result, accepted = moment_match(model, args, kwargs, draws, result, max_adaptations)
    if warn and not result.ok:
        warnings.warn(
            f"importance_resample: {result.summary()} The {num_draws or num_samples} resampled "
            f"draws repeat about {result.ess:.0f} distinct proposals.",
            stacklevel=2,
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    probs = result.log_weights.exp()
    count = num_draws or num_samples
    index = torch.multinomial(probs, count, replacement=True, generator=generator)
    index = index.to(draws.log_joint.device)
    samples = {name: value[index] for name, value in draws.values.items()}
    return ImportanceResample(samples, result, accepted, draws, index)


def _resample_members(model, guide, args, kwargs, num_samples, num_draws, seed, warn):
    samples, result, index = resample_members(
        model, guide, args, kwargs, num_samples, num_draws, seed=seed
    )
    if warn and not result.ok:
        warnings.warn(
            f"importance_resample (the globals, members integrated out): {result.summary()}",
            stacklevel=3,
        )
    return ImportanceResample(samples, result, 0, None, index)


@dataclass
class Evidence:
    """An importance-sampling estimate of ``log p(data)``.

    Attributes:
        log_evidence: ``log (1/S) sum_s p(x, z_s) / q(z_s)``.
        mcse: its Monte Carlo standard error (delta method on the raw weights).
        diagnostic: the PSIS diagnostic of the weights; if it is not ``ok`` the estimate and
            its standard error are unreliable (a warning was raised).
    """

    log_evidence: float
    mcse: float
    diagnostic: PSISResult

    def __float__(self) -> float:
        return self.log_evidence

    def __str__(self) -> str:
        return f"log evidence {self.log_evidence:.4f} +- {self.mcse:.4f} (MCSE)"


def log_evidence(model, guide, *args, num_samples: int = 10000, **kwargs) -> Evidence:
    """Estimate ``log p(data)`` by importance sampling from the guide, with its MCSE.

    The estimator is unbiased for ``p(data)`` (its log is biased low by about ``mcse^2 / 2``);
    a guide close to the posterior makes it precise. Use it to compare models fitted to the
    same data (Bayes factors). Flat priors (``ImproperUniform``) make the evidence undefined:
    that is an error.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> from pyro.infer.autoguide import init_to_value
        >>> at_zero = init_to_value(values={"mu": torch.tensor(0.0)})
        >>> guide = AutoFlowGuide(model, init_loc_fn=at_zero, init_scale=0.5**0.5)  # exact
        >>> exact = dist.Normal(0.0, 2.0 ** 0.5).log_prob(torch.tensor(0.0))
        >>> est = log_evidence(model, guide, torch.tensor(0.0), num_samples=1000)
        >>> abs(est.log_evidence - float(exact)) < 1e-5
        True
    """
    draws = draw(model, guide, args, kwargs, num_samples)
    _refuse_improper(draws)
    log_w = draws.log_weights.double()
    diagnostic = PSISResult.from_log_weights(log_w)
    estimate = float(torch.logsumexp(log_w, 0) - math.log(num_samples))
    w = torch.exp(log_w - log_w.max())
    mcse = float(w.std() / (w.mean() * math.sqrt(num_samples)))
    if not diagnostic.ok:
        warnings.warn(
            f"log_evidence: {diagnostic.summary()} The estimate {estimate:.4f} and its MCSE "
            "are not reliable.",
            stacklevel=2,
        )
    return Evidence(estimate, mcse, diagnostic)


def _refuse_improper(draws: Draws):
    for name, site in draws.sites.items():
        if site.improper:
            raise ValueError(
                f"log_evidence: latent site {name!r} has an improper (flat) prior; the "
                "evidence p(data) is undefined. Give it a proper prior to compare models by "
                "evidence."
            )
