r"""Training objectives beyond Pyro's ``Trace_ELBO``: the importance-weighted bound with
standard or doubly-reparametrised gradients, and its form member by member for guides
with local latents (``MemberImportanceELBO``).

The "sticking the landing" gradient of the plain ELBO needs no objective of its own: it is
``AutoFlowGuide(..., stl=True)`` (or ``fit(..., loss="stl")``) under ``Trace_ELBO``.
"""

from __future__ import annotations

import math

import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_identically_zero
from pyro.util import warn_if_nan

from .draws import sum_per_draw
from .member_bound import MemberImportanceELBO
from .scoring import check_stopped_scoring, scoring

__all__ = [
    "LOSSES",
    "FlowELBO",
    "ImportanceWeightedELBO",
    "MemberImportanceELBO",
    "for_local_latents",
    "objective",
]

LOSSES = ("elbo", "stl", "iwae", "dreg")


class _PlateNesting:
    def guess_plate_nesting(self, model, guide, args, kwargs) -> None:
        """Find ``max_plate_nesting`` now (Pyro's ELBOs guess it at their first step), so
        that a trace of one step has its particle plate where every later step has it."""
        if self.vectorize_particles and self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)


class ImportanceWeightedELBO(_PlateNesting, ELBO):
    r"""The importance-weighted ELBO (IWAE bound) with ``K = num_particles`` draws.

    ``log (1/K) sum_k p(x, z_k) / q(z_k)`` is a tighter bound than the ELBO for ``K > 1`` and
    equals it for ``K = 1``; maximising it fits a more mass-covering guide. The particles are
    vectorised (the model must broadcast over a leading plate, as for
    ``Trace_ELBO(vectorize_particles=True)``).

    With ``dreg=True`` (the default) the guide's gradient is the doubly-reparametrised one
    (DReG, Tucker et al. 2019, arXiv:1810.04152): ``sum_k w_k^2 d log w_k / dz_k dz_k/dphi``
    with normalised weights ``w_k``, which is unbiased and whose variance does not grow with
    ``K``, where the standard IWAE gradient's signal-to-noise ratio for the guide decays as
    ``1/sqrt(K)`` (Rainforth et al. 2018). Plain "sticking the landing" would be biased here.
    DReG scores each draw with the guide's parameters stopped, an inverse pass of the flow, so
    it needs a guide that supports it (``AutoFlowGuide`` with an invertible flow). Model
    parameters get the standard IWAE gradient.

    Arguments:
        num_particles: ``K``, the number of importance samples per step.
        dreg: doubly-reparametrised guide gradients (else the standard IWAE gradient).
        max_plate_nesting: as for Pyro's ELBOs (guessed if not given).

    References:
        Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders, arXiv:1509.00519.
        Tucker, Lawson, Gu & Maddison (2019), Doubly Reparameterized Gradient Estimators for
        Monte Carlo Objectives, arXiv:1810.04152.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoFlowGuide(model, flow="realnvp")
        >>> loss = ImportanceWeightedELBO(num_particles=8).loss(model, guide)
        >>> bool(loss > -1.0)
        True
    """

    def __init__(self, num_particles: int = 8, dreg: bool = True, max_plate_nesting=float("inf")):
        if num_particles < 1:
            raise ValueError(f"num_particles must be at least 1, got {num_particles}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )
        self.dreg = dreg

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _log_weights(self, model, guide, args, kwargs):
        """``(K,)`` log p(x, z_k) - log q(z_k) and the guide trace that drew the ``z_k``."""
        if self.vectorize_particles and self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        model_trace, guide_trace = self._get_vectorized_trace(model, guide, args, kwargs)
        # The particle plate sits at dim -max_plate_nesting (none for a single particle).
        k = self.num_particles
        mpn = self.max_plate_nesting - 1 if k > 1 else None
        log_p = sum(sum_per_draw(s["log_prob"], k, mpn) for s in _samples(model_trace))
        log_q = sum(sum_per_draw(s["log_prob"], k, mpn) for s in _samples(guide_trace))
        return log_p - log_q, guide_trace

    def loss(self, model, guide, *args, **kwargs):
        """The negative bound, without gradients."""
        with torch.no_grad():
            log_w, _ = self._log_weights(model, guide, args, kwargs)
            return -_log_mean_exp(log_w).item()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The negative bound as a tensor with the standard IWAE gradient (no DReG)."""
        log_w, guide_trace = self._log_weights(model, guide, args, kwargs)
        weights = torch.softmax(log_w.detach(), dim=0)
        self._guard_draws(guide, guide_trace, weights, squared=False)
        return -_log_mean_exp(log_w)

    def _guard_draws(self, guide, guide_trace, weights, squared: bool):
        """Hook the guide's latent draws: their gradient (times its weight once more if
        ``squared``, DReG's squared weights) for draws of positive weight, exactly zero for
        the rest. A draw whose weight underflows to zero adds nothing to
        either estimator, but its own backward pass can still be 0 * inf = NaN (a scale that
        underflowed in the model, say); one such draw must not poison the step."""
        name = getattr(guide, "latent_site_name", None)
        site = guide_trace.nodes.get(name) if name is not None else None
        if site is None or self.num_particles == 1 or not site["value"].requires_grad:
            return
        z = site["value"]
        w = weights.reshape((-1,) + (1,) * (z.dim() - 1))
        z.register_hook(lambda grad: torch.where(w > 0, grad * w if squared else grad, 0.0))

    def surrogate(self, model, guide, args, kwargs):
        """``(loss, surrogate)``: the negative bound (detached) and a scalar whose gradient
        is the estimator's (DReG or IWAE). ``fit``'s compiled step traces this function."""
        if not self.dreg:
            log_w, guide_trace = self._log_weights(model, guide, args, kwargs)
            weights = torch.softmax(log_w.detach(), dim=0)
            self._guard_draws(guide, guide_trace, weights, squared=False)
            loss = -_log_mean_exp(log_w)
            return loss.detach(), loss
        with scoring(guide, stopped=True):
            log_w, guide_trace = self._log_weights(model, guide, args, kwargs)
        loss = -_log_mean_exp(log_w.detach())
        weights = torch.softmax(log_w.detach(), dim=0)
        # -sum_k w_k log w_k gives model parameters the IWAE gradient and each z_k the
        # gradient w_k dlog w_k/dz_k; the hook multiplies the latter by w_k once more
        # (DReG's squared weights) on its way back to the guide's parameters.
        self._guard_draws(guide, guide_trace, weights, squared=True)
        return loss, -torch.where(weights > 0, weights * log_w, 0.0).sum()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss, surrogate = self.surrogate(model, guide, args, kwargs)
        warn_if_nan(surrogate, "surrogate loss")
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return loss.item()


class FlowELBO(_PlateNesting, Trace_ELBO):
    """Pyro's ``Trace_ELBO``, with the loss and its surrogate also as tensors (``surrogate``)
    for ``fit``'s compiled step; as Pyro's everywhere else."""

    def surrogate(self, model, guide, args, kwargs):
        """``(loss, surrogate)`` as ``Trace_ELBO`` computes them, as tensors (no ``.item()``):
        the model's scaled and masked log densities less the guide's entropy terms. Guides
        with non-reparametrised sites (score-function terms) are refused."""
        loss = surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = surrogate_elbo = _log_prob_sum(model_trace)
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                _, score_function, entropy = site["score_parts"]
                if not is_identically_zero(score_function):
                    raise NotImplementedError(
                        f"FlowELBO.surrogate: guide site {name!r} is not reparametrised"
                    )
                elbo = elbo - site["log_prob_sum"]
                if not is_identically_zero(entropy):
                    surrogate_elbo = surrogate_elbo - entropy.sum()
            loss = loss - elbo.detach() / self.num_particles
            surrogate = surrogate - surrogate_elbo / self.num_particles
        return loss, surrogate


def _log_prob_sum(trace):
    return sum(site["log_prob_sum"] for site in _samples(trace))


def _samples(trace):
    return (s for s in trace.nodes.values() if s["type"] == "sample")


def _log_mean_exp(log_w):
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def objective(loss, num_particles: int, guide) -> tuple[ELBO, bool]:
    """``fit``'s objective for ``loss`` (a name in ``LOSSES`` or a Pyro ``ELBO``), and
    whether the guide must score with stopped parameters (STL).

    Example:
        >>> objective("iwae", 8, None)[0].num_particles
        8
    """
    if isinstance(loss, ELBO):
        return loss, False
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a Pyro ELBO instance, got {loss!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    if loss in ("stl", "dreg"):
        check_stopped_scoring(guide)  # fail now, with a clear message
    if loss in ("iwae", "dreg"):
        return ImportanceWeightedELBO(num_particles, dreg=loss == "dreg"), False
    vectorize = num_particles > 1
    return FlowELBO(num_particles=num_particles, vectorize_particles=vectorize), loss == "stl"


def for_local_latents(elbo: ELBO, loss, guide) -> ELBO:
    """A guide with local latents (known once it is set up) takes the importance-weighted
    bound member by member; DReG, which needs whole draws' inverse passes, is refused."""
    if getattr(guide, "locals", None) is None or not isinstance(elbo, ImportanceWeightedELBO):
        return elbo
    if elbo.dreg:
        raise ValueError(
            f"fit: loss={loss!r} weighs whole draws of the guide, and this guide has local "
            f"latents ({', '.join(guide.local_sites)}), drawn per member outside the flow; "
            "use loss='iwae' (the bound member by member: MemberImportanceELBO), "
            "'elbo' or 'stl'"
        )
    return MemberImportanceELBO(elbo.num_particles)
