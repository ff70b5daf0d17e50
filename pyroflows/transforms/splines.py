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
from torch.nn.functional import softplus

__all__ = ["SplineKnots", "spline_forward", "spline_inverse", "spline_knots"]


class SplineKnots(NamedTuple):
    """Knots of a batch of splines: ``table[..., 0/1/2, k]`` holds x, y and slope of knot ``k``.

    ``K`` bins have ``K + 1`` knots; the first and last are ``(-bound, -bound)`` and
    ``(bound, bound)`` with slope 1.
    """

    table: Tensor
    bound: float

    @property
    def xs(self) -> Tensor:
        return self.table[..., 0, :]

    @property
    def ys(self) -> Tensor:
        return self.table[..., 1, :]

    @property
    def derivatives(self) -> Tensor:
        return self.table[..., 2, :]


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
    u = torch.stack([unnormalized_widths, unnormalized_heights], dim=-2)
    centre, cumulate = _bin_matrices(k, min_bin, u)
    # Bin sizes are min_bin + (1 - K min_bin) softmax(u). Row sums and cumulative sums over K
    # are done as tiny matmuls: torch's CPU reductions over a short last dimension are several
    # times slower. Centring (not max-subtraction) keeps exp in range; clamping at 80 only
    # matters where logits differ by more than 80, where the softmax is one-hot anyway.
    e = (u @ centre).clamp(max=80.0).exp()
    cumulative = e @ cumulate  # (..., K + 1): 0, then running sums with the min_bin floor
    # Dividing by the last entry (c_K / c_K == 1 exactly) pins the last knot at +bound.
    knots = (cumulative / cumulative[..., -1:]) * (2.0 * bound) - bound
    # Shift so that a zero input gives slope exactly 1: softplus(0 + c) = 1 - min_derivative.
    shift = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + softplus(unnormalized_derivatives.contiguous() + shift)
    slopes = torch.nn.functional.pad(inner, (1, 1), value=1.0)
    return SplineKnots(torch.cat([knots, slopes[..., None, :]], dim=-2), bound)


_MATRICES: dict = {}


def _bin_matrices(k: int, min_bin: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """Constant matrices: centring, and the cumulative sum of ``e + c sum(e)``."""
    key = (k, min_bin, like.dtype, like.device)
    if key not in _MATRICES:
        eye = torch.eye(k, dtype=like.dtype, device=like.device)
        centre = eye - 1.0 / k  # u @ centre = u - mean(u)
        # column j sums e_i for i < j, plus c * j * sum(e) for the min_bin floor
        c = min_bin / (1.0 - min_bin * k)
        j = torch.arange(k + 1, dtype=like.dtype, device=like.device)
        below = (torch.arange(k, device=like.device)[:, None] < j[None, :]).to(like.dtype)
        _MATRICES[key] = (centre, below + c * j)
    return _MATRICES[key]


def _bin_parameters(knots: SplineKnots, edges: Tensor, value: Tensor):
    """Left edge, width, bottom, height and both slopes of the bin holding ``value``."""
    # The bin index is the number of interior edges at or below the value, in [0, K - 1].
    index = (value[..., None] >= edges[..., 1:-1]).sum(dim=-1)
    table = knots.table.expand(*index.shape, *knots.table.shape[-2:])
    index = index[..., None, None].expand(*index.shape, 3, 1)
    left = torch.gather(table, -1, index).squeeze(-1)
    right = torch.gather(table, -1, index + 1).squeeze(-1)
    x0, y0, d0 = left.unbind(-1)
    x1, y1, d1 = right.unbind(-1)
    return x0, x1 - x0, y0, y1 - y0, d0, d1


def spline_forward(x: Tensor, knots: SplineKnots) -> tuple[Tensor, Tensor]:
    """Apply the spline elementwise: returns ``y`` and ``log |dy/dx|`` (same shape as ``x``)."""
    # Outside the interval the spline is the identity. The end slopes are 1 and the end knots
    # are pinned, so ``spline(clamp(x)) + (x - clamp(x))`` is exact everywhere and the
    # log-slope at a clamped point is log(1) = 0: no masks or ``where`` needed.
    xc = x.clamp(-knots.bound, knots.bound)
    x0, w, y0, h, d0, d1 = _bin_parameters(knots, knots.xs, xc)
    s = h / w
    t = ((xc - x0) / w).clamp(0.0, 1.0)
    t1 = t * (1.0 - t)
    denom = s + (d0 + d1 - 2.0 * s) * t1
    y = y0 + h * (s * t * t + d0 * t1) / denom
    slope = s * s * (d1 * t * t + 2.0 * s * t1 + d0 * (1.0 - t) ** 2) / (denom * denom)
    return y + (x - xc), torch.log(slope)


def spline_inverse(y: Tensor, knots: SplineKnots) -> tuple[Tensor, Tensor]:
    """Invert the spline elementwise: returns ``x`` and ``log |dx/dy|``."""
    yc = y.clamp(-knots.bound, knots.bound)
    x0, w, y0, h, d0, d1 = _bin_parameters(knots, knots.ys, yc)
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
    return x0 + t * w + (y - yc), -torch.log(slope)
