r"""One masked layer for coupling and autoregressive flows, over any elementwise transformer.

Every dimension ``i`` has an integer rank. Dimensions of rank 0 pass through unchanged; a
dimension of rank ``r > 0`` is transformed elementwise with parameters computed from the
dimensions of lower rank. Ranks ``0/1`` make a coupling layer (Dinh et al. 2014, 2017);
ranks ``1..D`` make an autoregressive one (Kingma et al. 2016; Papamakarios et al. 2017).
The *parallel* direction costs one conditioner pass; the other takes one pass per distinct
positive rank (1 for coupling, ``D`` for autoregressive layers).

- ``parallel="forward"`` (IAF direction): sampling and scoring a sample are one pass. This is
  what a variational guide wants; scoring an arbitrary point (inverse) costs ``D`` passes.
- ``parallel="inverse"`` (MAF direction): density evaluation is one pass, sampling ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor

from .base import VectorTransformModule
from .nn import DEFAULT_HIDDEN_DIMS, MaskedMLP, contiguous_slice
from .transformers import Transformer

__all__ = [
    "ConditionalMaskedAutoregressive",
    "MaskedAutoregressive",
    "autoregressive_ranks",
    "masked_layer",
]


class MaskedAutoregressive(VectorTransformModule):
    r"""A masked coupling or autoregressive layer: ``y_i = tau(x_i; h(x_{rank < rank_i}))``.

    Arguments:
        conditioner: a ``MaskedMLP`` built with these ranks.
        transformer: the elementwise bijection, e.g.
            ``RationalQuadraticSpline``.
        ranks: integer rank per dimension (0 = pass through).
        parallel: ``"forward"`` (IAF direction) or ``"inverse"`` (MAF direction).
        context: a context tensor, set by ``ConditionalMaskedAutoregressive.condition``.

    Example:
        >>> from pyroflows.transforms import Affine
        >>> layer = masked_layer(autoregressive_ranks(3), Affine(), hidden_dims=[8])
        >>> x = torch.randn(5, 3)
        >>> torch.equal(layer(x), x)      # zero-initialised conditioner: the identity
        True
    """

    def __init__(
        self,
        conditioner: MaskedMLP,
        transformer: Transformer,
        ranks: Tensor,
        parallel: str = "forward",
        context: Tensor | None = None,
    ):
        super().__init__()
        if parallel not in ("forward", "inverse"):
            raise ValueError(f"parallel must be 'forward' or 'inverse', got {parallel!r}")
        ranks = torch.as_tensor(ranks, dtype=torch.long)
        self.conditioner = conditioner
        self.transformer = transformer
        self.parallel = parallel
        self.context = context
        self.register_buffer("ranks", ranks)
        transformed = torch.nonzero(ranks > 0).flatten()
        self.register_buffer("transformed", transformed)
        self.transforms_all = len(transformed) == len(ranks)
        # Coupling halves are contiguous blocks: then slicing and cat replace gather/scatter.
        block = contiguous_slice(transformed)
        self.block = None if self.transforms_all or block is None else block
        self.passes = len(torch.unique(ranks[transformed]))

    # F(z) = tau(z; h(z)) is the map the conditioner evaluates in one pass.
    def _parallel_map(self, z: Tensor) -> tuple[Tensor, Tensor]:
        params = self.conditioner(z, self.context)
        if self.transforms_all:
            out, ladj = self.transformer.forward(z, params)
            return out, ladj.sum(-1)
        zt, ladj = self.transformer.forward(self._gather(z), params)
        return self._scatter(z, zt), ladj.sum(-1)

    def _gather(self, z: Tensor) -> Tensor:
        if self.block is not None:
            return z[..., self.block]
        return z.index_select(-1, self.transformed)

    # Solves F(z) = v for z, fixing one more rank each pass; returns z and log|dz/dv|.
    def _sequential_solve(self, v: Tensor) -> tuple[Tensor, Tensor]:
        vt = v if self.transforms_all else self._gather(v)
        z = v
        for _ in range(self.passes):
            zt, ladj = self.transformer.inverse(vt, self.conditioner(z, self.context))
            z = zt if self.transforms_all else self._scatter(v, zt)
        return z, ladj.sum(-1)

    def _scatter(self, base: Tensor, values: Tensor) -> Tensor:
        base = base.expand(*values.shape[:-1], base.shape[-1])
        if self.block is not None:
            return torch.cat(
                [base[..., : self.block.start], values, base[..., self.block.stop :]], -1
            )
        return base.index_copy(-1, self.transformed, values)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.parallel == "forward":
            return self._parallel_map(x)
        return self._sequential_solve(x)  # y solves F(y) = x; its log|dy/dx| is the forward one

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.parallel == "forward":
            x, log_det_inverse = self._sequential_solve(y)
        else:
            x, log_det_inverse = self._parallel_map(y)
        return x, -log_det_inverse

    def log_det_from(self, x: Tensor, y: Tensor) -> Tensor:
        # Whichever side is one pass.
        if self.parallel == "forward":
            return self._parallel_map(x)[1]
        return -self._parallel_map(y)[1]

    @property
    def mixes_all_pairs(self) -> bool:
        return self.passes > 1  # autoregressive: every later rank sees every earlier one

    def extra_repr(self) -> str:
        kind = "coupling" if self.passes == 1 and not self.transforms_all else "autoregressive"
        return (
            f"{kind}, transformer={self.transformer!r}, parallel={self.parallel!r}, "
            f"inverse_passes={self.passes if self.parallel == 'forward' else 1}"
        )


class ConditionalMaskedAutoregressive(ConditionalTransformModule):
    """The conditional version: ``.condition(context)`` returns a ``MaskedAutoregressive``.

    Example:
        >>> from pyroflows.transforms import Affine
        >>> layer = masked_layer(autoregressive_ranks(3), Affine(), hidden_dims=[8], context_dim=2)
        >>> layer.condition(torch.randn(2)).inv(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        conditioner: MaskedMLP,
        transformer: Transformer,
        ranks: Tensor,
        parallel: str = "forward",
    ):
        super().__init__()
        self.conditioner = conditioner
        self.transformer = transformer
        self.parallel = parallel
        self.register_buffer("ranks", torch.as_tensor(ranks, dtype=torch.long))

    def condition(self, context: Tensor) -> MaskedAutoregressive:
        return MaskedAutoregressive(
            self.conditioner, self.transformer, self.ranks, self.parallel, context=context
        )

    def extra_repr(self) -> str:
        return f"transformer={self.transformer!r}, parallel={self.parallel!r}"


def autoregressive_ranks(input_dim: int, reverse: bool = False) -> Tensor:
    """Ranks ``1..D`` in natural (or reversed) order: every dimension is transformed."""
    ranks = torch.arange(1, input_dim + 1)
    return ranks.flip(0) if reverse else ranks


def masked_layer(
    ranks: Tensor,
    transformer: Transformer,
    *,
    hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
    context_dim: int = 0,
    activation: str = "relu",
    parallel: str = "forward",
) -> MaskedAutoregressive | ConditionalMaskedAutoregressive:
    """Build a masked layer (conditional when ``context_dim > 0``) with a fresh conditioner."""
    ranks = torch.as_tensor(ranks, dtype=torch.long)
    conditioner = MaskedMLP(
        ranks,
        ranks[ranks > 0],
        transformer.num_params,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        activation=activation,
    )
    if context_dim:
        return ConditionalMaskedAutoregressive(conditioner, transformer, ranks, parallel)
    return MaskedAutoregressive(conditioner, transformer, ranks, parallel)
