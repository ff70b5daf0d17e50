"""Householder reflections (Tomczak & Welling 2016; van den Berg et al. 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import VectorTransformModule
from .registry import register

__all__ = ["Householder", "householder", "reflect"]


def reflect(x: Tensor, vectors: Tensor) -> Tensor:
    """Apply ``H_K ... H_1 x`` with ``H_k = I - 2 v_k v_k^T / |v_k|^2`` (rows of ``vectors``)."""
    units = vectors / vectors.norm(dim=-1, keepdim=True)
    for v in units:
        x = x - 2.0 * (x @ v)[..., None] * v
    return x


class Householder(VectorTransformModule):
    r"""An orthogonal map as a product of ``count`` Householder reflections (volume preserving).

    A reflection is its own inverse, so reflections are initialised in equal pairs and an
    even ``count`` starts as the exact identity (up to rounding) while each vector is free
    to move. The inverse applies the reflections in reverse order.

    Example:
        >>> t = Householder(3, count=2)
        >>> x = torch.randn(4, 3)
        >>> (t(x) - x).abs().max() < 1e-6
        tensor(True)
    """

    volume_preserving = True

    mixes_all_pairs = True

    def __init__(self, input_dim: int, count: int = 2):
        super().__init__()
        self.input_dim = input_dim
        bound = 1.0 / math.sqrt(input_dim)
        half = torch.empty((count + 1) // 2, input_dim).uniform_(-bound, bound)
        self.vectors = nn.Parameter(half.repeat_interleave(2, dim=0)[:count].clone())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return reflect(x, self.vectors), x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return reflect(y, self.vectors.flip(0)), y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count={len(self.vectors)}"


def default_count(input_dim: int) -> int:
    """Pyro's default (``input_dim // 2 + 1``) rounded up to an even number."""
    count = input_dim // 2 + 1
    return count + count % 2


@register("householder", identity_init=True)
def householder(input_dim, *, layer=0, context_dim=0, count_transforms=None):
    """Build a ``Householder`` block (``count_transforms`` reflections; even by default).

    Example:
        >>> householder(4)
        Householder(input_dim=4, count=4)
    """
    return Householder(input_dim, count_transforms or default_count(input_dim))
