"""Flow transforms for Pyro, registered by name.

Every flow is a Pyro ``TransformModule`` on vectors (event dim 1) with an exact
``log_abs_det_jacobian``; coupling, autoregressive and spline flows also come as
``ConditionalTransformModule`` (``build(..., context_dim=C)``).

Example:
    >>> from pyroflows import transforms
    >>> flow = transforms.build("nsf", 3, hidden_dims=[16])
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(flow(x), x)      # every nsf block starts as the identity
    True
"""

from . import (  # noqa: F401  (importing a family module registers it)
    autoregressive,
    bnaf,
    coupling,
    glow,
    householder,
    linear,
    marginal,
    normalization,
    planar,
    radial,
    sylvester,
)
from .base import Stack, VectorTransformModule
from .bnaf import BlockAutoregressive
from .householder import Householder
from .linear import LULinear, Permutation
from .marginal import SinhArcsinh
from .masked import ConditionalMaskedAutoregressive, MaskedAutoregressive, masked_layer
from .nn import MaskedMLP
from .normalization import ActNorm
from .planar import Planar
from .radial import Radial
from .registry import (
    FlowFamily,
    available,
    build,
    check_num_layers,
    family,
    invertible,
    mixes_all_pairs,
    register,
    unregister,
)
from .sylvester import Sylvester
from .transformers import Additive, Affine, RationalQuadraticSpline, Transformer

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "BlockAutoregressive",
    "ConditionalMaskedAutoregressive",
    "FlowFamily",
    "Householder",
    "LULinear",
    "MaskedAutoregressive",
    "MaskedMLP",
    "Permutation",
    "Planar",
    "Radial",
    "RationalQuadraticSpline",
    "SinhArcsinh",
    "Stack",
    "Sylvester",
    "Transformer",
    "VectorTransformModule",
    "available",
    "build",
    "check_num_layers",
    "family",
    "invertible",
    "masked_layer",
    "mixes_all_pairs",
    "register",
    "unregister",
]
