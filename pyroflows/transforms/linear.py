"""Linear flows: Glow's LU-parametrised invertible linear map and fixed permutations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import VectorTransformModule
from .registry import register

__all__ = ["LULinear", "Permutation", "lu", "permute", "reverse"]


class LULinear(VectorTransformModule):
    r"""``y = W x + b`` with ``W = P L U``: Glow's invertible 1x1 convolution on vectors.

    ``L`` is unit lower-triangular, ``U`` upper-triangular with positive diagonal
    ``exp(log_diag)``, and ``P`` a fixed permutation (Kingma & Dhariwal 2018,
    arXiv:1807.03039), so ``log |det W| = sum(log_diag)`` costs ``O(D)`` and the inverse is
    two triangular solves. Starts as the identity.

    Example:
        >>> t = LULinear(3)
        >>> x = torch.randn(2, 3)
        >>> torch.equal(t(x), x)
        True
    """

    mixes_all_pairs = True

    def __init__(self, input_dim: int, permutation: Tensor | None = None, bias: bool = True):
        super().__init__()
        self.input_dim = input_dim
        self.lower = nn.Parameter(torch.zeros(input_dim, input_dim))
        self.upper = nn.Parameter(torch.zeros(input_dim, input_dim))
        self.log_diag = nn.Parameter(torch.zeros(input_dim))
        self.bias = nn.Parameter(torch.zeros(input_dim)) if bias else None
        perm = torch.arange(input_dim) if permutation is None else torch.as_tensor(permutation)
        self.register_buffer("permutation", perm)

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.input_dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.log_diag.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix ``W = P L U``."""
        lower, upper = self._factors()
        return (lower @ upper)[self.permutation]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.weight().T
        if self.bias is not None:
            y = y + self.bias
        return y, self.log_diag.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        if self.bias is not None:
            y = y - self.bias
        # W x = y  <=>  L U x = P^T y, solved as row vectors: x^T U^T L^T = (P^T y)^T.
        z = y[..., self.permutation.argsort()]
        shape = z.shape
        z = z.reshape(-1, self.input_dim)
        z = torch.linalg.solve_triangular(lower.T, z, upper=True, left=False, unitriangular=True)
        z = torch.linalg.solve_triangular(upper.T, z, upper=False, left=False)
        return z.reshape(shape), self.log_diag.sum().expand(shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bias={self.bias is not None}"


class Permutation(VectorTransformModule):
    """A fixed permutation of the last dimension: ``y = x[..., permutation]``.

    The permutation is a buffer, so it is saved in ``state_dict`` and moves with ``.to()``.

    Example:
        >>> Permutation(torch.tensor([2, 0, 1]))(torch.tensor([10.0, 11.0, 12.0]))
        tensor([12., 10., 11.])
    """

    volume_preserving = True

    def __init__(self, permutation: Tensor):
        super().__init__()
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if not torch.equal(permutation.sort().values, torch.arange(len(permutation))):
            raise ValueError(f"not a permutation of 0..{len(permutation) - 1}: {permutation}")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", permutation.argsort())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(-1, self.permutation), x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y.index_select(-1, self.inverse_permutation), y.new_zeros(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"permutation={self.permutation.tolist()}"


@register("lu", identity_init=True)
def lu(input_dim, *, layer=0, context_dim=0, bias=True):
    """Glow's invertible linear map (``LULinear``), starting at the identity.

    Example:
        >>> lu(4).log_diag.shape
        torch.Size([4])
    """
    return LULinear(input_dim, bias=bias)


@register("permute", identity_init=False)
def permute(input_dim, *, layer=0, context_dim=0, permutation=None):
    """A fixed random permutation (drawn from torch's generator, so ``manual_seed`` fixes it).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> permute(4).permutation.tolist()
        [0, 1, 3, 2]
    """
    if permutation is None:
        permutation = torch.randperm(input_dim)
    return Permutation(permutation)


@register("reverse", identity_init=False)
def reverse(input_dim, *, layer=0, context_dim=0):
    """Reverse the order of the dimensions.

    Example:
        >>> reverse(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """
    return Permutation(torch.arange(input_dim).flip(0))
