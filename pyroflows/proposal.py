r"""Defensive proposals: a flow guide mixed with a heavy-tailed copy of itself.

Importance weights correct a guide only where it draws. A flow fitted by reverse KL is
narrower than the posterior where it is unsure: a lobe or a tail it covers with a few draws
gets a few large weights, and one it covers with almost none is invisible (U4's second
ridge: k-hat 0.45, means 0.21 sd off). Half the proposals drawn through the same flow from a
Student-t base (2 degrees of freedom, 3 times as wide) reach those regions, and the
mixture's density bounds every weight by twice its ratio to the heavy part (Hesterberg's
defensive importance sampling; ``benchmarks/RESULTS.md``, "infer: the route").

Both parts share the flow, so the mixture's density at a draw needs no inverse: at ``u =
T(e)``, ``q_mix(u) = (b(e) + h(e)) / 2 |det dT/de|`` for the two bases ``b`` and ``h``.
Gaussian components at modes the guide misses (``pyroflows.modes``) can join the mixture;
their draws are scored by inverting the flow.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     pyro.sample("x", dist.StudentT(2.0, 0.0, 1.0))
    >>> guide = AutoFlowGuide(model, init_scale=0.5).setup()  # a guide far too narrow
    >>> draws = defensive_draws(model, guide, (), {}, 4000)
    >>> draws.num_samples, bool((draws.values["x"].abs() > 10).any())  # the tails reached
    (4000, True)
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions.transforms import ComposeTransform

from .draws import Draws, draw, evaluate_at

__all__ = ["HEAVY_TAIL_DF", "HEAVY_TAIL_SCALE", "MIN_SHARE", "defensive_draws", "heavy_tailed"]

# A global scale's posterior often keeps mass near zero, a long tail in log space that a
# reverse-KL fit misses (RESULTS.md, "Local latents": the guide alone left the scale's sd
# 0.17-0.18 too small in log, a Normal base twice as wide 0.09-0.1, this one 0.03-0.04).
HEAVY_TAIL_DF, HEAVY_TAIL_SCALE = 2.0, 3.0
MIN_SHARE = 0.1  # every component of a mixture with modes draws at least this share
CHUNK = 1000  # draws the model is evaluated at in one run


def heavy_tailed(guide, df: float = HEAVY_TAIL_DF, scale: float = HEAVY_TAIL_SCALE):
    """The guide's posterior over its latent vector with a Student-t base (``df`` degrees of
    freedom, ``scale`` times as wide): the same shape, far heavier tails."""
    posterior = guide.get_posterior()
    zeros = torch.zeros(guide.latent_dim, dtype=guide.loc.dtype, device=guide.loc.device)
    base = dist.StudentT(df, zeros, torch.full_like(zeros, scale)).to_event(1)
    return dist.TransformedDistribution(base, posterior.transforms)


@torch.no_grad()
def defensive_draws(
    model,
    guide,
    args,
    kwargs,
    num_samples: int,
    modes=(),
    log_evidence: float = 0.0,
    predictive: bool = False,
) -> Draws:
    """``num_samples`` draws from the guide mixed with its heavy-tailed copy (equal shares),
    the model evaluated at each; ``Draws.log_q`` is the mixture's density.

    ``modes`` (``pyroflows.modes.Mode``, Laplace approximations the caller has widened) join
    the mixture in proportion to their Laplace mass against the flow's ``exp(log_evidence)``,
    each component at least ``MIN_SHARE``; scoring their draws needs the flow's inverse. A
    draw the flow maps beyond float range, or where the model's density is not finite,
    weighs zero (PSIS treats a NaN log weight so). ``predictive``: the observed sites drawn
    afresh at each draw too, as ``draws.draw`` does."""
    if getattr(guide, "prototype_trace", None) is None:
        guide.setup(*args, **kwargs)
    posterior, heavy = guide.get_posterior(), heavy_tailed(guide)
    like = guide.loc.detach()
    masses = [log_evidence - math.log(2)] * 2 + [m.log_mass for m in modes]
    shares = torch.softmax(torch.tensor(masses, dtype=torch.float64), 0)
    if modes:
        shares = shares.clamp(min=MIN_SHARE)
    counts = (shares / shares.sum() * num_samples).round().long().clamp(min=1)
    log_share = (counts.double() / counts.sum()).log().to(like)

    push = ComposeTransform(posterior.transforms)
    base = torch.cat([posterior.base_dist.sample((int(counts[0]),)), heavy.base_dist.sample(
        (int(counts[1]),))])  # fmt: skip
    u = push(base)
    log_q = posterior.log_prob(u)  # the flow's caches hold base: no inverse is computed
    if modes:
        pieces = [
            mode.point + torch.randn(int(count), len(mode.point)).to(mode.point) @ mode.precond.T
            for mode, count in zip(modes, counts[2:], strict=True)
        ]
        at_modes = torch.cat(pieces).to(like)
        base_modes = push.inv(at_modes)  # the flow's inverse, cached for the next line
        log_q = torch.cat([log_q, posterior.log_prob(at_modes)])
        u, base = torch.cat([u, at_modes]), torch.cat([base, base_modes])
    # both flow parts at every draw: they differ only in the base's density
    parts = [log_q, log_q + heavy.base_dist.log_prob(base) - posterior.base_dist.log_prob(base)]
    parts += [m.log_prob(u).to(like) for m in modes]
    log_q = torch.logsumexp(torch.stack(parts) + log_share[:, None], 0)

    finite = torch.isfinite(u).all(-1) & torch.isfinite(log_q)
    log_q = torch.where(finite, log_q, log_q.new_zeros(()))
    stand_in = posterior.sample()  # evaluated in place of a draw beyond float
    u = torch.where(finite[:, None], u, stand_in)
    values, log_det = guide.latent_to_sites(u, log_det=True)
    probe = draw(model, guide, args, kwargs, 1)
    # in chunks, as draws.draw runs them: 10,000 rows at once took diamonds' Laplace stage
    # (a 5000 x 26 regression) 13.4 s, ten runs of 1,000 4.4 s (intermediates fit the cache)
    runs = [
        evaluate_at(model, args, kwargs, probe, {k: v[i : i + CHUNK] for k, v in values.items()},
                    predictive=predictive)
        for i in range(0, len(u), CHUNK)
    ]  # fmt: skip
    at = {key: _cat([run[key] for run in runs]) for key in runs[0]}
    log_joint = torch.where(finite, at["log_joint"].to(like), like.new_tensor(-math.inf))
    # the Draws' log_q is the density of the constrained values: that of u less log|dz/du|
    return Draws(
        probe.sites,
        {**values, **at["values"]},
        at["log_likelihood"],
        probe.observed,
        log_joint,
        log_q - log_det,
        at.get("predictive", {}),
        probe.max_plate_nesting,
    )


def _cat(parts):
    """Runs' results joined along their draws: tensors, or dicts of them."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)
