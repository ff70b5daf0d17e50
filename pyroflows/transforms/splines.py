r"""Monotone rational-quadratic splines with linear tails, as pure functions.

The spline (Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032) maps
``[-bound, bound]`` onto itself through ``K`` bins and is the identity outside, with
derivative 1 at both ends so that value and slope are continuous. Unconstrained parameters
of zero give uniform bins with unit derivatives: the identity map.

Numerical care (the lessons of earlier implementations): inputs are clamped into the interval
*before* the bin arithmetic and the tail is selected with ``where`` *after* it, so the
arithmetic never sees a value outside a bin and gradients stay finite for any finite input;
the inverse takes the quadratic root as ``2c / (-b - sqrt(b^2 - 4ac))``, which has no
cancellation.

Example:
    >>> x = torch.tensor([-10.0, 0.3, 2.0])
    >>> knots = spline_knots(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 7), bound=3.0)
    >>> y, ladj = spline_forward(x, knots)      # zero parameters: the identity
    >>> torch.allclose(y, x), torch.allclose(ladj, torch.zeros(3), atol=1e-6)
    (True, True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import softmax, softplus

__all__ = ["SplineKnots", "spline_forward", "spline_inverse", "spline_knots"]


class SplineKnots(NamedTuple):
    """Knot positions ``xs``, ``ys`` (``K + 1`` each) and knot derivatives (``K + 1``)."""

    xs: Tensor
    ys: Tensor
    derivatives: Tensor
    bound: float


def _cumulative_knots(unnormalized: Tensor, bound: float, min_bin: float) -> Tensor:
    k = unnormalized.shape[-1]
    widths = min_bin + (1.0 - min_bin * k) * softmax(unnormalized, dim=-1)
    knots = torch.nn.functional.pad(torch.cumsum(widths, dim=-1), (1, 0))
    knots = 2.0 * bound * knots - bound
    # Pin the ends exactly, so rounding in the cumsum cannot leave a gap at the boundary.
    return torch.cat(
        [
            knots.new_full(knots[..., :1].shape, -bound),
            knots[..., 1:-1],
            knots.new_full(knots[..., :1].shape, bound),
        ],
        dim=-1,
    )


def spline_knots(
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    bound: float = 3.0,
    min_bin: float = 1e-3,
    min_derivative: float = 1e-3,
) -> SplineKnots:
    """Turn unconstrained network outputs into a valid monotone spline.

    Arguments:
        unnormalized_widths: shape ``(..., K)``.
        unnormalized_heights: shape ``(..., K)``.
        unnormalized_derivatives: shape ``(..., K - 1)``, the interior knots' slopes;
            the two boundary slopes are 1 (linear tails).
        bound: the spline acts on ``[-bound, bound]``.
        min_bin: smallest bin width and height, as a fraction of the interval.
        min_derivative: smallest knot slope.
    """
    k = unnormalized_widths.shape[-1]
    if min_bin * k >= 1.0:
        raise ValueError(f"min_bin={min_bin} is too large for {k} bins")
    xs = _cumulative_knots(unnormalized_widths, bound, min_bin)
    ys = _cumulative_knots(unnormalized_heights, bound, min_bin)
    # Shift so that a zero input gives slope exactly 1: softplus(0 + c) = 1 - min_derivative.
    shift = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + softplus(unnormalized_derivatives + shift)
    ones = inner.new_ones(inner[..., :1].shape)
    return SplineKnots(xs, ys, torch.cat([ones, inner, ones], dim=-1), bound)


def _bin_parameters(knots: SplineKnots, index: Tensor):
    """Gather left edge, width, bottom, height and both slopes of the selected bin."""

    def take(t: Tensor, offset: int = 0) -> Tensor:
        t = t.expand(*index.shape[:-1], t.shape[-1])
        return torch.gather(t, -1, index + offset).squeeze(-1)

    x0, x1 = take(knots.xs), take(knots.xs, 1)
    y0, y1 = take(knots.ys), take(knots.ys, 1)
    return x0, x1 - x0, y0, y1 - y0, take(knots.derivatives), take(knots.derivatives, 1)


def _search(edges: Tensor, value: Tensor) -> Tensor:
    # Number of interior edges at or below the value = the bin index, in [0, K - 1].
    return (value[..., None] >= edges[..., 1:-1]).sum(dim=-1, keepdim=True)


def spline_forward(x: Tensor, knots: SplineKnots) -> tuple[Tensor, Tensor]:
    """Apply the spline elementwise: returns ``y`` and ``log |dy/dx|`` (same shape as ``x``)."""
    bound = knots.bound
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    x0, w, y0, h, d0, d1 = _bin_parameters(knots, _search(knots.xs, xc))
    s = h / w
    t = ((xc - x0) / w).clamp(0.0, 1.0)
    t1 = t * (1.0 - t)
    denom = s + (d0 + d1 - 2.0 * s) * t1
    y = y0 + h * (s * t * t + d0 * t1) / denom
    slope = s * s * (d1 * t * t + 2.0 * s * t1 + d0 * (1.0 - t) ** 2) / (denom * denom)
    return torch.where(inside, y, x), torch.where(inside, torch.log(slope), torch.zeros_like(x))


def spline_inverse(y: Tensor, knots: SplineKnots) -> tuple[Tensor, Tensor]:
    """Invert the spline elementwise: returns ``x`` and ``log |dx/dy|``."""
    bound = knots.bound
    inside = (y > -bound) & (y < bound)
    yc = y.clamp(-bound, bound)
    x0, w, y0, h, d0, d1 = _bin_parameters(knots, _search(knots.ys, yc))
    s = h / w
    dy = yc - y0
    skew = d0 + d1 - 2.0 * s
    a = h * (s - d0) + dy * skew
    b = h * d0 - dy * skew
    c = -s * dy
    disc = (b * b - 4.0 * a * c).clamp(min=0.0)
    t = (2.0 * c / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
    t1 = t * (1.0 - t)
    denom = s + skew * t1
    slope = s * s * (d1 * t * t + 2.0 * s * t1 + d0 * (1.0 - t) ** 2) / (denom * denom)
    x = x0 + t * w
    return torch.where(inside, x, y), torch.where(inside, -torch.log(slope), torch.zeros_like(y))
