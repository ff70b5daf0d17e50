"""Planar flow (Rezende & Mohamed 2015, arXiv:1505.05770)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from .base import VectorTransformModule
from .registry import register

__all__ = ["Planar", "planar"]

_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_INV_1) == 1


class Planar(VectorTransformModule):
    r"""``y = x + u_hat * tanh(w^T x + b)``, invertible because ``w^T u_hat > -1``.

    The constraint is enforced by Rezende & Mohamed's parametrisation
    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(a) = softplus(a) - 1``, so
    ``log|det J| = log(1 + tanh'(w^T x + b) w^T u_hat)`` is always finite. Starts as the
    identity up to float rounding: ``u`` is set to ``softplus^{-1}(1) w / |w|^2``, which
    makes ``u_hat = 0``, while ``w`` is random so that gradients reach ``u`` at once.
    No analytic inverse.

    Example:
        >>> t = Planar(3)
        >>> x = torch.randn(4, 3)
        >>> (t(x) - x).abs().max() < 1e-6
        tensor(True)
    """

    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        bound = 1.0 / math.sqrt(input_dim)
        w = torch.empty(input_dim).uniform_(-bound, bound)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(_SOFTPLUS_INV_1 * w / w.dot(w))
        self.bias = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        wu = self.w.dot(self.u)
        return self.u + (softplus(wu) - 1.0 - wu) * self.w / self.w.dot(self.w)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        activation = torch.tanh(x @ self.w + self.bias)
        y = x + u_hat * activation[..., None]
        return y, torch.log1p((1.0 - activation**2) * self.w.dot(u_hat))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


@register("planar", num_layers=8, identity_init=True, analytic_inverse=False)
def planar(input_dim, *, layer=0, context_dim=0):
    """Build a ``Planar`` layer.

    Example:
        >>> planar(2)
        Planar(input_dim=2)
    """
    return Planar(input_dim)
