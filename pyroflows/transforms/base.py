"""Small shared pieces of the transform modules."""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

__all__ = ["Stack", "VectorTransformModule"]


class _Memo(NamedTuple):
    x: Tensor
    y: Tensor
    log_det: Tensor
    x_version: int
    y_version: int
    param_version: int
    grad: bool


class VectorTransformModule(TransformModule):
    """A learnable bijection of vectors (event dim 1) with a cache that cannot go stale.

    Subclasses implement ``forward_and_log_det`` (and ``inverse_and_log_det`` where
    the inverse is analytic): one pass gives the output and ``log |det dy/dx|``.

    Like Pyro's flows, the last ``(x, y, log_det)`` is remembered, so a
    ``TransformedDistribution`` scores its own samples without inverting them. Unlike them,
    the memo is used only while it is still true: the same input object, unmodified, with
    unchanged parameters, and computed with gradients if gradients are wanted now. A training
    loop that passes the same data tensor every step therefore never gets last step's
    result back.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    #: Whether one layer can link every pair of dimensions by a learnable linear dependence
    #: (LU, Householder, Sylvester, BNAF, an autoregressive layer); a guide then gains nothing
    #: from a full-rank affine beside it. Rank-one updates (planar, radial) do not count.
    mixes_all_pairs: bool = False

    @property
    def sign(self):
        # torch defines sign for univariate bijections only, and raises NotImplementedError
        # otherwise, which breaks hasattr() (torch.jit.trace inspects every attribute).
        raise AttributeError(f"{type(self).__name__} acts on vectors: its Jacobian has no sign")

    @property
    def has_analytic_inverse(self) -> bool:
        """Whether ``inverse_and_log_det`` is implemented (planar, radial, ... have none)."""
        return type(self).inverse_and_log_det is not VectorTransformModule.inverse_and_log_det

    def __init__(self):
        super().__init__(cache_size=1)
        self._memo: _Memo | None = None

    __repr__ = nn.Module.__repr__  # torch's Transform.__repr__ would hide the module's contents

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` and ``log |det dy/dx|`` (shape ``x.shape[:-1]``)."""
        raise NotImplementedError

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and the *forward* ``log |det dy/dx|`` at that ``x``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no analytic inverse: it can score only the values it has "
            "just produced (cached). Use a coupling or autoregressive flow (e.g. 'nsf', "
            "'realnvp', 'iaf') to evaluate densities at arbitrary points."
        )

    def log_det_from(self, x: Tensor, y: Tensor) -> Tensor:
        """``log |det dy/dx|`` when the memo cannot answer; by default one forward pass."""
        return self.forward_and_log_det(x)[1]

    def _param_version(self) -> int:
        # In-place updates (optimizer steps, load_state_dict, .to()) bump a tensor's version.
        params = self.__dict__.get("_param_tuple")
        if params is None:  # collected once: walking the module tree every call is slow
            params = tuple(self.parameters())
            # Not while torch.func.functional_call has swapped plain tensors in.
            if all(isinstance(p, nn.Parameter) for p in params):
                self.__dict__["_param_tuple"] = params
        return sum(p._version for p in params)

    def _valid(self, memo: _Memo) -> bool:
        return memo.param_version == self._param_version() and (
            memo.grad or not torch.is_grad_enabled()
        )

    def _remember(self, x: Tensor, y: Tensor, log_det: Tensor) -> None:
        self._memo = _Memo(
            x, y, log_det, x._version, y._version, self._param_version(), torch.is_grad_enabled()
        )

    def __call__(self, x: Tensor) -> Tensor:
        memo = self._memo
        if memo is not None and memo.x is x and memo.x_version == x._version and self._valid(memo):
            return memo.y
        y, log_det = self.forward_and_log_det(x)
        self._remember(x, y, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        memo = self._memo
        if memo is not None and memo.y is y and memo.y_version == y._version and self._valid(memo):
            return memo.x
        x, log_det = self.inverse_and_log_det(y)
        self._remember(x, y, log_det)
        return x

    def _call(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        memo = self._memo
        if memo is not None and memo.x is x and memo.y is y and self._valid(memo):
            return memo.log_det
        return self.log_det_from(x, y)

    def clear_cache(self) -> None:
        """Forget the remembered ``(x, y)`` pair (never needed for correctness)."""
        self._memo = None


class Stack(ComposeTransformModule, TransformModule):
    """A stack of flows applied in order: one ``TransformModule`` with all parts' parameters.

    Example:
        >>> from pyroflows.transforms import ActNorm, LULinear
        >>> stack = Stack([ActNorm(2), LULinear(2)])
        >>> isinstance(stack, TransformModule), len(list(stack.parameters()))
        (True, 6)
    """

    def __init__(self, parts, cache_size: int = 0):
        super().__init__(parts, cache_size=cache_size)
        # torch recomputes a compose's (co)domain recursively on every access, and every
        # TransformedDistribution asks several times per SVI step; the parts are fixed here.
        self._fixed_domain = super().domain
        self._fixed_codomain = super().codomain

    @property
    def domain(self):
        return self._fixed_domain

    @property
    def codomain(self):
        return self._fixed_codomain

    __repr__ = nn.Module.__repr__
