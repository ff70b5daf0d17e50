"""Glow's activation normalisation (ActNorm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import VectorTransformModule
from .registry import register

__all__ = ["ActNorm", "actnorm"]


class ActNorm(VectorTransformModule):
    r"""``y = x * exp(log_scale) + shift`` per dimension (Kingma & Dhariwal 2018, arXiv:1807.03039).

    Starts as the identity. With ``data_init=True`` the first batch of at least two inputs
    passed forward sets ``log_scale`` and ``shift`` so that this batch comes out with zero
    mean and unit variance per dimension (Glow's data-dependent initialisation); the flag
    that records it is saved in ``state_dict``, so a loaded module is not re-initialised.

    Example:
        >>> t = ActNorm(2, data_init=True)
        >>> y = t(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> y.mean(0).abs().max() < 1e-6, torch.allclose(y.std(0), torch.ones(2))
        (tensor(True), True)
    """

    def __init__(self, input_dim: int, data_init: bool = False):
        super().__init__()
        self.input_dim = input_dim
        self.log_scale = nn.Parameter(torch.zeros(input_dim))
        self.shift = nn.Parameter(torch.zeros(input_dim))
        self.register_buffer("initialized", torch.tensor(not data_init))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, self.input_dim)
        std = flat.std(0).clamp(min=1e-6)
        self.log_scale.copy_(-std.log())
        self.shift.copy_(-flat.mean(0) / std)
        self.initialized.fill_(True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.initialized and x.reshape(-1, self.input_dim).shape[0] > 1:
            self._initialize(x)
        y = x * self.log_scale.exp() + self.shift
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (y - self.shift) * (-self.log_scale).exp()
        return x, self.log_scale.sum().expand(y.shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, initialized={bool(self.initialized)}"


@register("actnorm")
def actnorm(input_dim, *, layer=0, context_dim=0, data_init=False):
    """Build an ``ActNorm`` block.

    Example:
        >>> actnorm(3).log_scale.tolist()
        [0.0, 0.0, 0.0]
    """
    return ActNorm(input_dim, data_init=data_init)
