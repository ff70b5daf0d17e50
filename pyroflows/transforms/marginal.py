r"""The sinh-arcsinh transform: each dimension's own skew and tail weight.

The affine and autoregressive flows of this package move and stretch a Gaussian, and their
tails stay Gaussian. A posterior whose marginal is skewed with one long tail (a hierarchy's
scale ``tau``, whose density stays positive as ``tau -> 0``: in ``log tau`` an exponential
left tail) is then fitted too narrow, and reverse KL gives no reason to reach the tail
(``benchmarks/results/design.md``, "The default flow's marginals"). One elementwise
sinh-arcsinh layer (Jones and Pewsey 2009, Biometrika 96:761) gives every dimension a
learnable skew ``s`` and tail weight ``k``::

    y = sinh(k (asinh(x) + s)) - sinh(k s)

the identity at ``s = 0, k = 1``, with an analytic inverse
``x = sinh(asinh(y + sinh(k s)) / k - s)``. The shift keeps ``x = 0`` at ``y = 0``, so the
skew cannot also move the location: from a start far from the posterior the location
gradient would otherwise skew the layer as the guide travels (a conjugate normal from the
prior's start, 300 steps: sd 45% too wide; with the shift and half-rate parameters 4%, as two
IAF blocks, 6%).

Example:
    >>> t = SinhArcsinh(2)
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(t(x), x)
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import VectorTransformModule
from .registry import register

__all__ = ["SinhArcsinh", "sinh_arcsinh"]

# log k within (-1, 1) and s within (-3, 3), reached smoothly (tanh): the inverse of a point
# far out, asinh(y) / k, stays finite in float32 (k >= 1/e), and an outlying gradient cannot
# throw the layer to a tail weight no draw could come back from.
TAIL_BOUND = 1.0
SKEW_BOUND = 3.0
LOG_2 = math.log(2.0)
# The raw parameters are scaled by this (Adam's steps are then this much smaller for them): the
# layer's shape changes slowly, so a guide travelling from a far start does not bend its
# tails to do so, and settles with the location and scale first. At 1.0 a conjugate normal
# from a far start was 12% too wide after 300 steps; at 0.25 a hierarchy's scale no longer
# reached its tail (benchmarks/results/design.md, "The default flow's marginals").
RATE = 0.5


def _log_cosh(a: Tensor) -> Tensor:
    # log cosh a = log(e^a + e^-a) - log 2, without overflow for large |a|
    return torch.logaddexp(a, -a) - LOG_2


class SinhArcsinh(VectorTransformModule):
    """``y = sinh(k * (asinh(x) + s)) - sinh(k * s)`` per dimension (module docstring);
    ``s`` and ``log k`` start at zero (the identity) and stay within ``SKEW_BOUND`` and
    ``TAIL_BOUND``."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.skew_raw = nn.Parameter(torch.zeros(input_dim))
        self.tail_raw = nn.Parameter(torch.zeros(input_dim))

    @property
    def skew(self) -> Tensor:
        return SKEW_BOUND * torch.tanh(RATE * self.skew_raw / SKEW_BOUND)

    @property
    def log_tail(self) -> Tensor:
        return TAIL_BOUND * torch.tanh(RATE * self.tail_raw / TAIL_BOUND)

    def _log_det(self, x: Tensor, a: Tensor, log_tail: Tensor) -> Tensor:
        # dy/dx = k cosh(a) / sqrt(1 + x^2); hypot keeps x^2 from overflowing
        return (_log_cosh(a) + log_tail - torch.hypot(x, torch.ones_like(x)).log()).sum(-1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_tail, skew = self.log_tail, self.skew
        tail = log_tail.exp()
        a = tail * (torch.asinh(x) + skew)
        return torch.sinh(a) - torch.sinh(tail * skew), self._log_det(x, a, log_tail)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        log_tail, skew = self.log_tail, self.skew
        tail = log_tail.exp()
        a = torch.asinh(y + torch.sinh(tail * skew))
        x = torch.sinh(a / tail - skew)
        return x, self._log_det(x, a, log_tail)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


@register("sinh_arcsinh")
def sinh_arcsinh(input_dim, *, layer=0, context_dim=0):
    """Build a ``SinhArcsinh`` layer (elementwise skew and tail weight).

    Example:
        >>> from pyroflows import transforms
        >>> transforms.build("sinh_arcsinh", 3)
        SinhArcsinh(input_dim=3)
    """
    return SinhArcsinh(input_dim)
