"""Block neural autoregressive flow (De Cao, Titov & Aziz 2019, arXiv:1904.04676)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import logsigmoid

from .base import VectorTransformModule
from .registry import register

__all__ = ["BlockAutoregressive", "bnaf"]


class BlockLinear(nn.Module):
    r"""A block lower-triangular linear map with positive diagonal blocks and weight norm.

    Maps ``D * in_factor`` features to ``D * out_factor``; block ``(i, j)`` is zero above the
    diagonal, ``exp(raw)`` on it and ``raw`` below it, and each row is rescaled to norm
    ``exp(log_norm)``. Returns the output and the log of the diagonal blocks, shape
    ``(D, out_factor, in_factor)``, which carry the Jacobian's diagonal.
    """

    def __init__(self, dim: int, in_factor: int, out_factor: int):
        super().__init__()
        self.dim, self.in_factor, self.out_factor = dim, in_factor, out_factor
        blocks = torch.eye(dim).repeat_interleave(out_factor, 0).repeat_interleave(in_factor, 1)
        lower = torch.tril(torch.ones(dim, dim), -1)
        lower = lower.repeat_interleave(out_factor, 0).repeat_interleave(in_factor, 1)
        self.register_buffer("diag_mask", blocks)
        self.register_buffer("lower_mask", lower)
        bound = 1.0 / math.sqrt(in_factor)
        raw = torch.empty(dim * out_factor, dim * in_factor).uniform_(-bound, bound)
        self.raw = nn.Parameter(raw)
        self.log_norm = nn.Parameter(torch.zeros(dim * out_factor, 1))
        self.bias = nn.Parameter(torch.empty(dim * out_factor).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.raw.exp() * self.diag_mask + self.raw * self.lower_mask
        log_row_norm = 0.5 * (weight * weight).sum(-1, keepdim=True).log()
        weight = weight * (self.log_norm - log_row_norm).exp()
        # log of the diagonal entries: raw + log_norm - log|row|, picked from the diagonal blocks.
        log_weight = (self.raw + self.log_norm - log_row_norm).view(
            self.dim, self.out_factor, self.dim, self.in_factor
        )
        log_diag = log_weight.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return x @ weight.T + self.bias, log_diag


class BlockAutoregressive(VectorTransformModule):
    r"""``y = (1 - g) x + g f(x)`` with ``f`` a block neural autoregressive network.

    ``f`` interleaves ``BlockLinear`` layers (``hidden_factors[k]`` units per dimension)
    with ``tanh``; it is strictly increasing in each ``x_i`` given ``x_{<i}``, so its Jacobian
    is triangular with the positive diagonal tracked in log space. ``f`` alone maps onto a
    bounded box; the gated residual with ``g = sigmoid(gate)`` in ``(0, 1)`` (De Cao et al.'s
    "gated" residual) makes the layer a bijection of all of ``R^D``.

    BNAF has no identity parametrisation: ``g`` starts at ``sigmoid(gate_init)`` (default
    ``sigmoid(-4) = 0.018``), so the layer starts within ``g |f(x) - x|`` of the identity.
    No analytic inverse.

    Example:
        >>> t = BlockAutoregressive(3)
        >>> x = torch.randn(1000, 3)
        >>> float((t(x) - x).abs().mean().detach()) < 0.05
        True
    """

    mixes_all_pairs = True

    def __init__(
        self, input_dim: int, hidden_factors: Sequence[int] = (8, 8), gate_init: float = -4.0
    ):
        super().__init__()
        self.input_dim = input_dim
        factors = [1, *hidden_factors, 1]
        self.layers = nn.ModuleList(
            BlockLinear(input_dim, a, b) for a, b in itertools.pairwise(factors)
        )
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x
        log_jac = x.new_zeros(*x.shape, 1)  # log d h_block / d x_i, shape (..., D, units)
        for k, layer in enumerate(self.layers):
            h, log_diag = layer(h)
            log_jac = torch.logsumexp(log_diag + log_jac[..., None, :], dim=-1)
            if k < len(self.layers) - 1:
                # log tanh'(h) = 2 (log 2 - h - softplus(-2h)), stable for large |h|
                log_act = 2.0 * (math.log(2.0) - h - nn.functional.softplus(-2.0 * h))
                log_jac = log_jac + log_act.unflatten(-1, (self.input_dim, -1))
                h = torch.tanh(h)
        gate = torch.sigmoid(self.gate)
        y = (1.0 - gate) * x + gate * h
        log_diag = torch.logaddexp(logsigmoid(-self.gate), logsigmoid(self.gate) + log_jac[..., 0])
        return y, log_diag.sum(-1)

    def extra_repr(self) -> str:
        factors = [layer.out_factor for layer in self.layers[:-1]]
        return f"input_dim={self.input_dim}, hidden_factors={factors}"


@register("bnaf", identity_init=False, analytic_inverse=False)
def bnaf(input_dim, *, layer=0, context_dim=0, hidden_factors=(8, 8), gate_init=-4.0):
    """Build a ``BlockAutoregressive`` layer.

    Example:
        >>> bnaf(2, hidden_factors=[4]).extra_repr()
        'input_dim=2, hidden_factors=[4]'
    """
    return BlockAutoregressive(input_dim, hidden_factors, gate_init)
