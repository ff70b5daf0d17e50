r"""Autoregressive flows on the masked layer: IAF, MAF and the autoregressive spline flow.

Every layer is a ``MaskedAutoregressive`` (``masked.py``) with ranks ``1..D``; consecutive
layers reverse the order, so a stack conditions every dimension on every other.
"""

from __future__ import annotations

from .masked import (  # noqa: F401  (re-exported: guides pickled before the split name them here)
    ConditionalMaskedAutoregressive,
    MaskedAutoregressive,
    autoregressive_ranks,
    masked_layer,
)
from .nn import DEFAULT_HIDDEN_DIMS
from .registry import register
from .transformers import Affine, RationalQuadraticSpline

__all__ = ["iaf", "maf", "nsf_ar"]


def _ar_layer(input_dim, transformer, layer, context_dim, hidden_dims, activation, parallel):
    ranks = autoregressive_ranks(input_dim, reverse=layer % 2 == 1)
    return masked_layer(
        ranks,
        transformer,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        activation=activation,
        parallel=parallel,
    )


@register("iaf", num_layers=4, conditional=True)
def iaf(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    scale_bound=6.0,
):
    """Inverse autoregressive flow (Kingma et al. 2016, arXiv:1606.04934): one pass to sample.

    Affine transformer with a MADE conditioner; consecutive layers reverse the order.

    Example:
        >>> flow = iaf(3, hidden_dims=[8])
        >>> flow.parallel
        'forward'
    """
    return _ar_layer(
        input_dim, Affine(scale_bound), layer, context_dim, hidden_dims, activation, "forward"
    )


@register("maf", num_layers=4, conditional=True)
def maf(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    scale_bound=6.0,
):
    """Masked autoregressive flow (Papamakarios et al. 2017, arXiv:1705.07057).

    The MAF direction: the density of a given point is one pass, sampling is ``D`` passes.

    Example:
        >>> maf(3, hidden_dims=[8]).parallel
        'inverse'
    """
    return _ar_layer(
        input_dim, Affine(scale_bound), layer, context_dim, hidden_dims, activation, "inverse"
    )


@register("nsf_ar", num_layers=4, conditional=True)
def nsf_ar(
    input_dim,
    *,
    layer=0,
    context_dim=0,
    hidden_dims=DEFAULT_HIDDEN_DIMS,
    activation="relu",
    count_bins=8,
    bound=3.0,
    parallel="forward",
):
    """Autoregressive rational-quadratic spline flow (Durkan et al. 2019, arXiv:1906.04032).

    Sampling direction by default (``parallel="forward"``); pass ``parallel="inverse"`` for
    the density-fast direction.

    Example:
        >>> nsf_ar(3, hidden_dims=[8], count_bins=4).transformer
        RationalQuadraticSpline(count_bins=4, bound=3.0)
    """
    spline = RationalQuadraticSpline(count_bins, bound)
    return _ar_layer(input_dim, spline, layer, context_dim, hidden_dims, activation, parallel)
