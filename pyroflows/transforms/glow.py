"""Glow (Kingma & Dhariwal 2018, arXiv:1807.03039) for vectors: a named stack."""

from __future__ import annotations

from .coupling import realnvp
from .linear import LULinear
from .nn import DEFAULT_HIDDEN_DIMS
from .normalization import ActNorm
from .registry import compose, register

__all__ = ["glow"]


@register("glow", num_layers=4, conditional=True)
def glow(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    split_dim=None,
    scale_bound=3.0,
    data_init=False,
):
    """A Glow block: ActNorm, then an LU-parametrised linear map, then an affine coupling.

    Starts as the identity. With ``context_dim`` the coupling is conditional.

    Example:
        >>> [type(p).__name__ for p in glow(4, hidden_dims=[8]).parts]
        ['ActNorm', 'LULinear', 'MaskedAutoregressive']
    """
    coupling = realnvp(
        input_dim,
        layer=layer,
        context_dim=context_dim,
        hidden_dims=hidden_dims,
        activation=activation,
        split_dim=split_dim,
        scale_bound=scale_bound,
    )
    return compose([ActNorm(input_dim, data_init), LULinear(input_dim), coupling])
