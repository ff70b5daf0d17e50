"""Radial flow (Rezende & Mohamed 2015, arXiv:1505.05770)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from .base import VectorTransformModule
from .registry import register

__all__ = ["Radial", "radial"]


class Radial(VectorTransformModule):
    r"""``y = x + beta * (x - x0) / (alpha + |x - x0|)``, invertible because ``beta > -alpha``.

    ``alpha = softplus(a)`` and ``beta = softplus(b) - alpha`` enforce the constraint. With
    ``a = b = 0`` both softplus values are ``log 2``, so ``beta`` is exactly 0 and the layer
    starts as the exact identity; ``x0`` starts random. No analytic inverse.

    Example:
        >>> t = Radial(3)
        >>> x = torch.randn(4, 3)
        >>> torch.equal(t(x), x)
        True
    """

    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        bound = 1.0 / math.sqrt(input_dim)
        self.x0 = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.alpha_raw = nn.Parameter(torch.zeros(()))
        self.beta_raw = nn.Parameter(torch.zeros(()))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha = softplus(self.alpha_raw)
        beta = softplus(self.beta_raw) - alpha
        diff = x - self.x0
        r = diff.norm(dim=-1)
        h = 1.0 / (alpha + r)
        y = x + (beta * h)[..., None] * diff
        # d/dr [beta r h(r)] = beta h - beta r h^2.
        log_det = (self.input_dim - 1) * torch.log1p(beta * h) + torch.log1p(
            beta * h - beta * r * h * h
        )
        return y, log_det

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


@register("radial", num_layers=8, identity_init=True, analytic_inverse=False)
def radial(input_dim, *, layer=0, context_dim=0):
    """Build a ``Radial`` layer.

    Example:
        >>> radial(2)
        Radial(input_dim=2)
    """
    return Radial(input_dim)
