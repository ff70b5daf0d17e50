r"""Implicitly adaptive importance sampling (Paananen et al. 2021, arXiv:1906.08850), the
"moment matching" of R's ``loo``: affine maps of weighted draws in the model's unconstrained
space, matching the weighted mean, then the marginal scales, then the covariance, each kept
only if it lowers PSIS k-hat. It repairs what a mean-field guide typically gets wrong (too
narrow, missing correlations) at one model evaluation per draw per try.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.distributions import biject_to

from .draws import NOT_VECTORISED_HINT, Draws, evaluate_at, is_shape_error
from .psis import PSISResult

__all__ = ["moment_match"]


def moment_match(model, args, kwargs, draws: Draws, result: PSISResult, max_adaptations: int = 10):
    """``(draws, result, accepted)``: ``draws`` moved by up to ``max_adaptations`` affine
    maps in the unconstrained latent space, each kept only if it lowers k-hat (module
    docstring); ``result`` is the PSIS diagnostic of the draws returned.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.draws import draw
        >>> def model():
        ...     pyro.sample("x", dist.Normal(3.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=0.1)  # far too narrow, and off centre
        >>> draws = draw(model, guide, (), {}, 2000)
        >>> before = PSISResult.from_log_weights(draws.log_weights)
        >>> moved, result, accepted = moment_match(model, (), {}, draws, before)
        >>> accepted > 0, bool(result.k_hat < before.k_hat)
        (True, True)
    """
    names = draws.latent_names()
    transforms = {n: biject_to(draws.sites[n].support) for n in names}
    unconstrained = {n: transforms[n].inv(draws.values[n]) for n in names}
    shapes = {n: unconstrained[n].shape[1:] for n in names}
    u = torch.cat([unconstrained[n].reshape(draws.num_samples, -1) for n in names], -1).double()
    # log q_U(u) = log q_X(x) + log|dx/du|: the proposal's density in unconstrained space.
    log_q_u = draws.log_q.double() + _log_jacobian(transforms, unconstrained)
    log_det = torch.zeros((), dtype=torch.float64)  # of the accumulated affine map
    accepted = 0

    def evaluate(new_u):
        values, pos = {}, 0
        for n in names:
            size = math.prod(shapes[n])
            un = new_u[:, pos : pos + size].reshape((-1, *tuple(shapes[n])))
            un = un.to(draws.values[n].dtype)
            values[n] = transforms[n](un)
            pos += size
        parts = {n: transforms[n].inv(values[n]) for n in names}
        at = evaluate_at(model, args, kwargs, draws, values, predictive=bool(draws.predictive))
        at["values"].update(values)
        return at, at["log_joint"].double() + _log_jacobian(transforms, parts)

    # Past the threshold, adapt while it helps, down to k = 0.5 (finite weight variance)
    target = min(result.threshold, 0.5)
    for _ in range(max_adaptations):
        if result.k_hat < target:
            break
        weights = result.log_weights.exp().unsqueeze(-1)
        for kind in ("mean", "scale", "covariance"):
            mapped = _affine_step(u, weights, kind)
            if mapped is None:
                continue
            new_u, step_log_det = mapped
            try:
                moved, log_p_u = evaluate(new_u)
            except (ValueError, RuntimeError) as error:
                if is_shape_error(error):  # not vectorised: no map can be tried, say so
                    warnings.warn(
                        "importance_resample: moment matching evaluates the model at all "
                        "draws at once, and this model does not run vectorised over them; "
                        f"resampling without it. To have it, {NOT_VECTORISED_HINT}.",
                        stacklevel=3,
                    )
                    return draws, result, accepted
                continue  # the map moved draws where the model refuses them: try the next
            log_w = log_p_u - (log_q_u - (log_det + step_log_det))
            if not torch.isfinite(log_w).any():  # every draw moved to zero density
                continue
            candidate = PSISResult.from_log_weights(log_w)
            if candidate.k_hat < result.k_hat:
                u, log_det, result = new_u, log_det + step_log_det, candidate
                draws = _replace(draws, moved, log_w)
                accepted += 1
                break
        else:
            break
    return draws, result, accepted


def _affine_step(u, weights, kind):
    mean = u.mean(0)
    w_mean = (weights * u).sum(0)
    if kind == "mean":
        return u - mean + w_mean, torch.zeros((), dtype=u.dtype)
    centred, w_centred = u - mean, u - w_mean
    if kind == "scale":
        ratio = ((weights * w_centred**2).sum(0) / (centred**2).mean(0)).sqrt()
        if not torch.isfinite(ratio).all() or (ratio <= 0).any():
            return None
        return centred * ratio + w_mean, ratio.log().sum()
    cov = centred.T @ centred / u.shape[0]
    w_cov = (weights * w_centred).T @ w_centred
    eye = torch.eye(u.shape[1], dtype=u.dtype) * 1e-10
    try:
        chol, w_chol = torch.linalg.cholesky(cov + eye), torch.linalg.cholesky(w_cov + eye)
    except RuntimeError:
        return None
    matrix = w_chol @ torch.linalg.inv(chol)
    log_det = w_chol.diagonal().log().sum() - chol.diagonal().log().sum()
    return centred @ matrix.T + w_mean, log_det


def _log_jacobian(transforms, unconstrained):
    """``log|dx/du|`` per draw, summed over every site."""
    total = 0.0
    for name, u in unconstrained.items():
        t = transforms[name]
        ld = t.log_abs_det_jacobian(u, t(u))
        total = total + ld.reshape(u.shape[0], -1).sum(-1).double()
    return total


def _replace(draws, moved, log_w):
    """The draws moved by an accepted affine map, with the model evaluated there."""
    return Draws(
        draws.sites,
        moved["values"],
        moved["log_likelihood"],
        draws.observed,
        log_w.to(draws.log_joint.dtype),  # stored as log p - log q with log q = 0
        torch.zeros_like(draws.log_q),
        moved["predictive"],
        draws.max_plate_nesting,
    )
