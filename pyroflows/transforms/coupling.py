r"""Coupling layers (NICE, RealNVP, neural spline coupling) on the masked layer.

A coupling layer leaves ``split_dim`` dimensions unchanged and transforms the others
elementwise with parameters computed from them: rank 0 for the conditioning dimensions,
rank 1 for the transformed ones. Both directions cost one conditioner pass. Consecutive
blocks swap the roles of the two halves, so no permutation is needed between them.
"""

from __future__ import annotations

import torch

from .masked import masked_layer
from .nn import DEFAULT_HIDDEN_DIMS
from .registry import register
from .transformers import Additive, Affine, RationalQuadraticSpline

__all__ = ["coupling_ranks", "nice", "nsf", "realnvp"]


def coupling_ranks(input_dim: int, split_dim: int | None = None, layer: int = 0) -> torch.Tensor:
    """Ranks of a coupling block: 0 for the ``split_dim`` conditioning dimensions, 1 otherwise.

    Even blocks condition on the first ``split_dim`` dimensions, odd blocks on the rest.
    A 1-dimensional input has nothing to condition on: it is transformed with learned
    constants.

    Example:
        >>> coupling_ranks(5).tolist(), coupling_ranks(5, layer=1).tolist()
        ([0, 0, 1, 1, 1], [1, 1, 0, 0, 0])
    """
    split_dim = input_dim // 2 if split_dim is None else split_dim
    if not 0 <= split_dim < input_dim:
        raise ValueError(f"split_dim must be in [0, {input_dim}), got {split_dim}")
    conditioning = torch.arange(input_dim) < split_dim
    if layer % 2 == 1 and split_dim > 0:
        conditioning = ~conditioning
    return (~conditioning).long()


def _coupling(input_dim, transformer, layer, context_dim, hidden_dims, activation, split_dim):
    return masked_layer(
        coupling_ranks(input_dim, split_dim, layer),
        transformer,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        activation=activation,
    )


@register("nice", num_layers=4, conditional=True)
def nice(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    split_dim=None,
):
    """Additive coupling (NICE; Dinh, Krueger & Bengio 2014, arXiv:1410.8516): volume preserving.

    Example:
        >>> layer = nice(4, hidden_dims=[8])
        >>> float(layer.log_abs_det_jacobian(torch.zeros(4), layer(torch.zeros(4))))
        0.0
    """
    return _coupling(input_dim, Additive(), layer, context_dim, hidden_dims, activation, split_dim)


@register("realnvp", num_layers=4, conditional=True)
def realnvp(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    split_dim=None,
    scale_bound=3.0,
):
    """Affine coupling (RealNVP; Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803).

    The log-scale is soft-clipped into ``(-scale_bound, scale_bound)`` for stability.

    Example:
        >>> realnvp(4, hidden_dims=[8]).transformer
        Affine(scale_bound=3.0)
    """
    transformer = Affine(scale_bound)
    return _coupling(input_dim, transformer, layer, context_dim, hidden_dims, activation, split_dim)


@register("nsf", num_layers=4, conditional=True)
def nsf(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    split_dim=None,
    count_bins=8,
    bound=3.0,
):
    """Rational-quadratic spline coupling (Durkan et al. 2019, arXiv:1906.04032).

    Identity outside ``[-bound, bound]`` (linear tails); finite for any finite input.

    Example:
        >>> layer = nsf(4, hidden_dims=[8])
        >>> x = torch.tensor([[1e6, -1e6, 0.5, 10.0]])
        >>> torch.equal(layer.inv(layer(x).clone()), x)   # clone: a real inverse, not the cache
        True
    """
    spline = RationalQuadraticSpline(count_bins, bound)
    return _coupling(input_dim, spline, layer, context_dim, hidden_dims, activation, split_dim)
