"""Small shared pieces of the transform modules."""

from __future__ import annotations

from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

__all__ = ["NoInverse", "Stack", "VectorTransformModule"]


class VectorTransformModule(TransformModule):
    """A learnable bijection of vectors (event dim 1) that caches its last ``(x, y)`` pair."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self):
        super().__init__(cache_size=1)

    __repr__ = nn.Module.__repr__  # torch's Transform.__repr__ would hide the module's contents


class NoInverse(VectorTransformModule):
    """A flow without a closed-form inverse: inverting a value it did not just produce fails.

    Scoring its own samples still works, because a ``TransformedDistribution`` finds the
    input of the last forward call in the cache.
    """

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no analytic inverse: it can score only the values it has "
            "just produced (cached). Use a coupling or autoregressive flow (e.g. 'nsf', "
            "'realnvp', 'iaf') to evaluate densities at arbitrary points."
        )


class Stack(ComposeTransformModule, TransformModule):
    """A stack of flows applied in order: one ``TransformModule`` with all parts' parameters.

    Example:
        >>> from pyroflows.transforms import ActNorm, LULinear
        >>> stack = Stack([ActNorm(2), LULinear(2)])
        >>> isinstance(stack, TransformModule), len(list(stack.parameters()))
        (True, 6)
    """

    __repr__ = nn.Module.__repr__
