r"""PSIS: Pareto-smoothed importance weights and their k-hat (a leaf anyone may import).

Drawing ``z_s ~ q`` and weighting each draw by ``w_s = p(x, z_s) / q(z_s)`` turns a guide into
an importance sampler of the exact posterior; the Pareto shape ``k`` fitted to the largest
weights (PSIS, Vehtari et al. 2024, arXiv:1507.02646) says how far that can be trusted (Yao
et al. 2018, arXiv:1802.02538):

- ``k < min(1 - 1/log10(S), 0.7)`` (``S`` draws; 0.7 from ``S`` = 2200 on, 0.57 at ``S`` =
  200): the weights have enough finite moments for importance-weighted estimates to be
  reliable, and the guide is close to the posterior in the directions that matter;
- above that threshold: importance-weighted estimates are unreliable and the guide should
  not be trusted (fit longer, choose a richer flow, refit with the mass-covering
  ``fit(..., loss="dreg", num_particles=8)`` and draw with ``importance_resample``, or run
  ``neutra``; ``benchmarks/RESULTS.md`` measures the refit-and-resample route).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

__all__ = ["NoFiniteWeights", "PSISResult", "effective_sample_size", "khat_threshold", "psis"]

MIN_TAIL_DRAWS = 25  # the fewest draws whose largest fifth holds the 5 a Pareto fit needs

# Weights within 1e-4 nats (0.01%) of each other are equal for every estimate they serve:
# an exact proposal evaluated in float32 differs from a constant only by rounding, a few
# distinct values, on which a Pareto fit degenerates.
NO_SPREAD = 1e-4


def khat_threshold(num_samples: int) -> float:
    """The sample-size dependent k-hat threshold ``min(1 - 1/log10(S), 0.7)``.

    Example:
        >>> round(khat_threshold(1000), 3), khat_threshold(10000)
        (0.667, 0.7)
    """
    if num_samples <= 10:
        return 0.0
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


class NoFiniteWeights(ValueError):
    """Every proposal has zero (or a non-finite) posterior density: there is nothing to
    weigh. The proposal is far from the posterior, or the model refuses all of it."""


def psis(log_weights: Tensor) -> tuple[Tensor, float]:
    """Pareto-smoothed log weights and the Pareto shape ``k`` of their upper tail.

    The ``M = min(S / 5, 3 sqrt(S))`` largest weights are replaced by the expected order
    statistics of a generalised Pareto distribution fitted to them (Zhang & Stephens 2009,
    with the weakly informative prior of Vehtari et al. as in ArviZ and ``loo``), capped at
    the largest raw weight. The returned log weights are normalised (``logsumexp = 0``).

    Example:
        >>> log_w = torch.distributions.StudentT(3.0).sample((4000,)).abs().log()
        >>> smoothed, k = psis(log_w)
        >>> round(float(smoothed.logsumexp(0)), 6), 0.1 < k < 0.6
        (0.0, True)
    """
    log_w = torch.as_tensor(log_weights, dtype=torch.float64).flatten()
    if not torch.isfinite(log_w).any():
        raise NoFiniteWeights("psis: no finite log weight (every draw has zero posterior density)")
    log_w = torch.where(torch.isnan(log_w), torch.tensor(-math.inf, dtype=log_w.dtype), log_w)
    num = log_w.shape[0]
    log_w = log_w - log_w.max()
    tail_len = math.ceil(min(0.2 * num, 3.0 * math.sqrt(num)))
    k = math.inf
    if tail_len >= 5 and num > tail_len + 1:
        order = torch.argsort(log_w)
        tail_idx = order[-tail_len:]
        cutoff = log_w[order[-tail_len - 1]]
        if torch.isfinite(cutoff) and float(log_w[tail_idx].max() - cutoff) < NO_SPREAD:
            k = -math.inf  # the tail has no spread: bounded weights, nothing to smooth
        elif torch.isfinite(cutoff):
            exceed = log_w[tail_idx].exp() - cutoff.exp()
            if bool((exceed > 0).any()):
                try:
                    k, sigma = fit_generalized_pareto(exceed)
                except ZeroDivisionError:  # a degenerate fit: no finite shape to report
                    k, sigma = math.inf, 0.0
                if math.isfinite(k) and sigma > 0:
                    p = (torch.arange(1, tail_len + 1, dtype=log_w.dtype) - 0.5) / tail_len
                    quantiles = _gpd_quantile(p, k, sigma) + cutoff.exp()
                    smoothed = torch.clamp(quantiles, max=1.0).log()  # 1 = the largest raw
                    log_w = log_w.clone()
                    log_w[tail_idx] = smoothed
    return log_w - torch.logsumexp(log_w, 0), float(k)


def _gpd_quantile(p, k, sigma):
    if abs(k) < 1e-10:
        return -sigma * torch.log1p(-p)
    return sigma * torch.expm1(-k * torch.log1p(-p)) / k


def effective_sample_size(log_weights: Tensor) -> float:
    """Kish's effective sample size ``1 / sum w^2`` of normalised log weights."""
    return float(1.0 / torch.exp(torch.logsumexp(2 * log_weights, 0)))


@dataclass
class PSISResult:
    """The PSIS diagnostic of a guide.

    Attributes:
        k_hat: the Pareto shape of the importance weights' upper tail.
        threshold: ``min(1 - 1/log10(S), 0.7)``; below it the fit can be trusted.
        num_samples: ``S``, the number of guide draws.
        ess: effective sample size of the smoothed importance weights.
        log_weights: the normalised smoothed log weights, ``(S,)``.
        elbo: the mean raw log weight: a Monte Carlo estimate of the ELBO (log p(data) minus
            KL(q || posterior)), comparable between guides of the same model.
    """

    k_hat: float
    threshold: float
    num_samples: int
    ess: float
    log_weights: Tensor = field(repr=False)
    elbo: float

    @property
    def ok(self) -> bool:
        """``k_hat`` is below the threshold."""
        return self.k_hat < self.threshold

    def summary(self) -> str:
        if self.num_samples < MIN_TAIL_DRAWS:
            return (
                f"PSIS k-hat cannot be estimated from {self.num_samples} draws (a Pareto tail "
                f"needs {MIN_TAIL_DRAWS} at least, and k-hat is reliable from about 1000): "
                "draw more."
            )
        if self.ok:
            return (
                f"PSIS k-hat {self.k_hat:.2f} < {self.threshold:.2f} ({self.num_samples} draws): "
                "the guide is close to the posterior; importance-weighted estimates are "
                f"reliable (ESS {self.ess:.0f})."
            )
        return (
            f"PSIS k-hat {self.k_hat:.2f} >= {self.threshold:.2f} ({self.num_samples} draws): "
            "the guide cannot be trusted as the posterior, nor can importance weighting fix it "
            f"(ESS {self.ess:.0f}). Fit longer, use a richer flow, refit with "
            "loss='dreg', num_particles=8 and draw with pyroflows.importance_resample, or "
            "run pyroflows.neutra."
        )

    def __str__(self) -> str:
        return self.summary()

    @classmethod
    def from_log_weights(cls, log_weights: Tensor) -> PSISResult:
        """The diagnostic of raw (unnormalised) log weights ``log p - log q``, ``(S,)``."""
        smoothed, k = psis(log_weights)
        num = log_weights.shape[0]
        elbo = log_weights.mean().item()
        return cls(k, khat_threshold(num), num, effective_sample_size(smoothed), smoothed, elbo)
