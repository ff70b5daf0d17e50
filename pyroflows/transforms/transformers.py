r"""Elementwise monotone bijections ("transformers") whose parameters a conditioner sets.

Each transformer maps ``x`` with parameters ``params`` of shape ``(..., num_params, D)`` to
``y`` and the elementwise ``log |dy/dx|``, and back. Zero parameters give the identity, so a
zero-initialised conditioner makes the whole layer the identity.

Example:
    >>> t = Affine()
    >>> y, ladj = t.forward(torch.ones(2), torch.zeros(t.num_params, 2))
    >>> y.tolist(), ladj.tolist()
    ([1.0, 1.0], [0.0, 0.0])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .splines import spline_forward, spline_inverse, spline_knots

__all__ = ["Additive", "Affine", "RationalQuadraticSpline", "Transformer", "soft_clip"]


def soft_clip(x: Tensor, bound: float) -> Tensor:
    """A smooth clip into ``(-bound, bound)`` with slope 1 at zero: ``x / (1 + |x / bound|)``."""
    return x / (x.abs() * (1.0 / bound) + 1.0)


class Transformer:
    """Interface: ``num_params`` per dimension, ``forward`` and ``inverse`` with log-dets."""

    num_params: int

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "num_params")
        return f"{type(self).__name__}({args})"


class Additive(Transformer):
    """``y = x + t`` (NICE, Dinh et al. 2014, arXiv:1410.8516): volume preserving."""

    num_params = 1

    def forward(self, x, params):
        y = x + params[..., 0, :]
        return y, torch.zeros_like(y)

    def inverse(self, y, params):
        x = y - params[..., 0, :]
        return x, torch.zeros_like(x)


class Affine(Transformer):
    """``y = x * exp(s) + t`` with ``s`` soft-clipped into ``(-scale_bound, scale_bound)``.

    The bounded log-scale (RealNVP, Dinh et al. 2017, arXiv:1605.08803) keeps a single layer
    from blowing up or collapsing a dimension early in training, and unlike a hard clamp its
    gradient never vanishes. The autoregressive flows (iaf, maf) use bound 6 (a funnel's neck
    needs log-scales beyond 3); coupling flows (realnvp, glow) keep 3, with which they do not
    diverge early (``benchmarks/RESULTS.md``, "Design measurements").
    """

    num_params = 2

    def __init__(self, scale_bound: float = 6.0):
        self.scale_bound = scale_bound

    def forward(self, x, params):
        log_scale = soft_clip(params[..., 0, :], self.scale_bound)
        return torch.addcmul(params[..., 1, :], x, log_scale.exp()), log_scale

    def inverse(self, y, params):
        log_scale = soft_clip(params[..., 0, :], self.scale_bound)
        return (y - params[..., 1, :]) * (-log_scale).exp(), -log_scale


class RationalQuadraticSpline(Transformer):
    """A monotone rational-quadratic spline on ``[-bound, bound]`` with identity tails."""

    def __init__(self, count_bins: int = 8, bound: float = 3.0):
        if count_bins < 2:
            raise ValueError(f"count_bins must be at least 2, got {count_bins}")
        self.count_bins = count_bins
        self.bound = float(bound)
        self.num_params = 3 * count_bins - 1

    def _knots(self, params):
        # the spline kernels want each dimension's bins last
        bins = params.transpose(-1, -2)
        widths, heights, slopes = bins.split([self.count_bins] * 2 + [self.count_bins - 1], -1)
        return spline_knots(widths, heights, slopes, self.bound)

    def forward(self, x, params):
        return spline_forward(x, self._knots(params))

    def inverse(self, y, params):
        return spline_inverse(y, self._knots(params))
