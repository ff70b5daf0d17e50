"""Householder Sylvester flow (van den Berg, Hasenclever, Tomczak & Welling 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import VectorTransformModule
from .householder import default_count, reflect
from .registry import register

__all__ = ["Sylvester", "sylvester"]


class Sylvester(VectorTransformModule):
    r"""``y = x + Q R tanh(R_tilde Q^T x + b)`` (arXiv:1803.05649), ``Q`` orthogonal.

    ``Q`` is a product of Householder reflections; ``R`` and ``R_tilde`` are upper triangular
    with diagonals ``tanh(.)`` in ``(-1, 1)``, so ``1 + r_ii r~_ii tanh'(.) > 0`` and the map is
    invertible with ``log|det J| = sum_i log(1 + r_ii r~_ii tanh'(z_i))`` (Sylvester's
    determinant identity). ``R`` starts at zero, which makes the layer the exact identity
    while ``R_tilde``, ``Q`` and ``b`` start random so gradients reach ``R`` at once.
    No analytic inverse.

    Example:
        >>> t = Sylvester(3)
        >>> x = torch.randn(4, 3)
        >>> torch.equal(t(x), x)
        True
    """

    mixes_all_pairs = True

    def __init__(self, input_dim: int, count: int = 2):
        super().__init__()
        self.input_dim = input_dim
        bound = 1.0 / math.sqrt(input_dim)
        self.vectors = nn.Parameter(torch.empty(count, input_dim).uniform_(-bound, bound))
        self.r = nn.Parameter(torch.zeros(input_dim, input_dim))
        self.r_tilde = nn.Parameter(torch.empty(input_dim, input_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))

    @staticmethod
    def _triangular(raw: Tensor) -> Tensor:
        return raw.triu(1) + torch.diag(torch.tanh(raw.diagonal()))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Q is formed once (reflecting the identity's rows gives Q^T), then used in two matmuls:
        # fewer and larger ops than reflecting every batch row through every vector twice.
        eye = torch.eye(self.input_dim, dtype=x.dtype, device=x.device)
        q_t = reflect(eye, self.vectors)
        preactivation = x @ (self._triangular(self.r_tilde) @ q_t).T + self.bias
        activation = torch.tanh(preactivation)
        y = x + activation @ (q_t.T @ self._triangular(self.r)).T
        diag = torch.tanh(self.r.diagonal()) * torch.tanh(self.r_tilde.diagonal())
        return y, torch.log1p((1.0 - activation**2) * diag).sum(-1)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, reflections={len(self.vectors)}"


@register("sylvester", num_layers=4, identity_init=True, analytic_inverse=False)
def sylvester(input_dim, *, layer=0, context_dim=0, count_transforms=None):
    """Build a ``Sylvester`` layer with ``count_transforms`` reflections in ``Q``.

    Example:
        >>> sylvester(4)
        Sylvester(input_dim=4, reflections=4)
    """
    return Sylvester(input_dim, count_transforms or default_count(input_dim))
