"""Bijections to supports that torch's ``biject_to`` does not cover.

Pyro's autoguides cannot handle a latent site with a positive-definite (``Wishart``) or
lower-Cholesky support: torch registers no bijection for them. The ones added here map a
real vector of ``D (D + 1) / 2`` numbers one-to-one onto the support (no redundant
coordinates, which would leave the ELBO unbounded), and are registered with ``biject_to``
and ``transform_to`` only where torch has none.

Example:
    >>> from torch.distributions import biject_to, constraints
    >>> t = biject_to(constraints.positive_definite)
    >>> m = t(torch.zeros(3))           # 3 numbers -> a 2 x 2 positive-definite matrix
    >>> m
    tensor([[1., 0.],
            [0., 1.]])
    >>> torch.allclose(t.inv(m), torch.zeros(3))
    True
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.transforms import CholeskyTransform
from torch import Tensor
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import ComposeTransform, Transform

__all__ = ["LowerCholeskyFromVector", "positive_definite_from_vector"]


def _side(n: int) -> int:
    side = round((math.sqrt(8 * n + 1) - 1) / 2)
    if side * (side + 1) // 2 != n:
        raise ValueError(f"{n} is not a triangular number D (D + 1) / 2")
    return side


class LowerCholeskyFromVector(Transform):
    """Fill a lower-triangular matrix from a vector; ``exp`` makes the diagonal positive."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other):
        return isinstance(other, LowerCholeskyFromVector)

    def _indices(self, side: int, device):
        rows, cols = torch.tril_indices(side, side, device=device)
        return rows, cols, (rows == cols).nonzero().flatten()

    def _call(self, x: Tensor) -> Tensor:
        side = _side(x.shape[-1])
        rows, cols, diag = self._indices(side, x.device)
        values = x.clone()
        values[..., diag] = x[..., diag].exp()
        out = x.new_zeros(*x.shape[:-1], side, side)
        out[..., rows, cols] = values
        return out

    def _inverse(self, y: Tensor) -> Tensor:
        rows, cols, diag = self._indices(y.shape[-1], y.device)
        x = y[..., rows, cols].clone()
        x[..., diag] = x[..., diag].log()
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        _, _, diag = self._indices(_side(x.shape[-1]), x.device)
        return x[..., diag].sum(-1)

    def forward_shape(self, shape):
        side = _side(shape[-1])
        return (*shape[:-1], side, side)

    def inverse_shape(self, shape):
        return (*shape[:-2], shape[-1] * (shape[-1] + 1) // 2)


def positive_definite_from_vector() -> Transform:
    """``vector -> L -> L L^T``: a bijection onto positive-definite matrices."""
    return ComposeTransform([LowerCholeskyFromVector(), CholeskyTransform().inv])


def _register(constraint, factory) -> None:
    for registry in (biject_to, transform_to):
        try:
            registry(constraint)
        except NotImplementedError:
            registry.register(type(constraint), lambda c: factory())


_register(constraints.lower_cholesky, LowerCholeskyFromVector)
_register(constraints.positive_definite, positive_definite_from_vector)
