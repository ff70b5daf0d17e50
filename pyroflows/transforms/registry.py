"""Flow families by name: ``register`` adds one, ``build`` turns a spec into a module.

A registered factory builds *one block* of its family for a given input size; ``build``
stacks ``num_layers`` blocks. Each factory is told its block's index within its family
(``layer=0, 1, ...``), so consecutive coupling or autoregressive blocks alternate which
dimensions condition which, and a stack of identity-initialised blocks is still exactly
the identity (no permutation layers are needed between them).
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransformModule,
)
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import nn

from .base import Stack

__all__ = [
    "FlowFamily",
    "available",
    "build",
    "family",
    "invertible",
    "mixes_all_pairs",
    "register",
]


@dataclass(frozen=True)
class FlowFamily:
    """What the registry knows about a family.

    Attributes:
        name: the registry name.
        factory: ``factory(input_dim, *, layer, context_dim, **architecture) -> module``.
        num_layers: blocks stacked when ``build`` is not told ``num_layers``.
        identity_init: whether a freshly built block is exactly the identity map.
        analytic_inverse: whether the inverse is computed in closed form (or by a finite
            number of conditioner passes), rather than not at all; the contract test checks
            that it agrees with ``invertible`` of a built block.
        conditional: whether ``context_dim > 0`` gives a conditional transform.
    """

    name: str
    factory: Callable[..., nn.Module]
    num_layers: int = 1
    identity_init: bool = True
    analytic_inverse: bool = True
    conditional: bool = False

    @property
    def keywords(self) -> set[str]:
        params = inspect.signature(self.factory).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"layer", "context_dim"}


_FAMILIES: dict[str, FlowFamily] = {}


def register(
    name: str,
    *,
    num_layers: int = 1,
    identity_init: bool = True,
    analytic_inverse: bool = True,
    conditional: bool = False,
):
    """Decorator adding a flow family to the registry under ``name``.

    The factory takes ``input_dim`` positionally and keyword-only ``layer`` (the block's index
    within its family), ``context_dim`` and its architecture keywords.

    Example:
        >>> from pyro.distributions.transforms import Permute
        >>> @register("flip_example")
        ... def flip(input_dim, *, layer=0, context_dim=0):
        ...     return Permute(torch.arange(input_dim).flip(0))
        >>> build("flip_example", 3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
        >>> _ = unregister("flip_example")
    """

    def decorator(factory):
        if name in _FAMILIES:
            raise ValueError(f"a flow named {name!r} is already registered")
        _FAMILIES[name] = FlowFamily(
            name, factory, num_layers, identity_init, analytic_inverse, conditional
        )
        return factory

    return decorator


def unregister(name: str) -> FlowFamily:
    """Remove a family (mainly for tests and notebooks that register throwaway flows)."""
    return _FAMILIES.pop(name)


def available() -> list[str]:
    """The registered flow names, sorted.

    Example:
        >>> "nsf" in available()
        True
    """
    return sorted(_FAMILIES)


def family(name: str) -> FlowFamily:
    """Look up a family by name; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown flow {name!r}; available flows: {', '.join(available())}"
        ) from None


FlowSpec = str | Sequence[str] | nn.Module | Callable[[int], nn.Module]


def build(
    spec: FlowSpec,
    input_dim: int,
    *,
    num_layers: int | None = None,
    context_dim: int = 0,
    **architecture,
) -> TransformModule | ConditionalTransformModule:
    """Build a flow on ``input_dim``-vectors from a name, a list of names, a module or a callable.

    Arguments:
        spec: a registered name (``"nsf"``), a list of names stacked in order
            (``["actnorm", "lu", "realnvp"]``), an existing ``TransformModule`` (returned as
            is), or a callable ``input_dim -> TransformModule``.
        input_dim: size of the vectors the flow acts on.
        num_layers: how many times to stack the named block (a list counts as one block);
            default: the family's own default for a name, 1 for a list.
        context_dim: if positive, build a conditional transform (``.condition(context)``).
        architecture: keywords such as ``hidden_dims``, ``count_bins``, ``bound``,
            ``split_dim``, ``activation``, with the meaning of Pyro's helpers. Each is passed
            to the families in the spec that take it; one that no family takes is an error.

    Returns:
        A single ``TransformModule`` (a stack is one ``Stack``, whose parameters are all
        registered), or a ``ConditionalTransformModule``.

    Example:
        >>> flow = build("nsf", 4, num_layers=2, hidden_dims=[16], count_bins=4)
        >>> x = torch.randn(10, 4)
        >>> y = flow(x)
        >>> flow.log_abs_det_jacobian(x, y).shape
        torch.Size([10])
        >>> build("nsff", 4)
        Traceback (most recent call last):
        ...
        ValueError: unknown flow 'nsff'; available flows: ...
    """
    if not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
    check_num_layers(num_layers)
    is_name = isinstance(spec, str) or (isinstance(spec, Sequence) and not callable(spec))
    if not is_name and (architecture or num_layers is not None):
        # A module is built and a callable builds itself: keywords would be silently lost.
        raise ValueError("architecture keywords cannot change an already-built module or callable")
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        names, repeats = [spec], num_layers or family(spec).num_layers
    elif isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        names, repeats = list(spec), num_layers or 1
    elif callable(spec):
        module = spec(input_dim)
        if not isinstance(module, (TransformModule, ConditionalTransformModule)):
            raise TypeError(
                f"the flow callable returned {type(module).__name__}, not a TransformModule"
            )
        return module
    else:
        raise TypeError(
            "a flow spec is a name, a list of names, a TransformModule or a callable "
            f"input_dim -> TransformModule; got {spec!r}"
        )
    families = [family(name) for name in names]
    _check_keywords(families, architecture, context_dim)

    parts, seen = [], Counter()
    for _ in range(repeats):
        for fam in families:
            kwargs = {k: v for k, v in architecture.items() if k in fam.keywords}
            # Families without a conditional version stay unconditional parts of the stack.
            ctx = context_dim if fam.conditional else 0
            parts.append(fam.factory(input_dim, layer=seen[fam.name], context_dim=ctx, **kwargs))
            seen[fam.name] += 1
    return compose(parts)


def check_num_layers(num_layers) -> None:
    """``None`` (the default depth) or a positive integer: 0 must not read as the default."""
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")


def compose(parts: list[nn.Module]) -> TransformModule | ConditionalTransformModule:
    """One module for a list of parts: the part itself, or a (conditional) compose module."""
    flat = []
    for part in parts:  # flatten nested stacks so caching and repr stay one level deep
        is_stack = isinstance(part, (ComposeTransformModule, ConditionalComposeTransformModule))
        flat.extend(part if is_stack else [part])
    if len(flat) == 1:
        return flat[0]
    if any(isinstance(p, ConditionalTransformModule) for p in flat):
        return ConditionalComposeTransformModule(flat)
    # Each part caches its own (x, y) pair, so the stack needs no cache of its own.
    return Stack(flat)


def _check_keywords(families: list[FlowFamily], architecture: dict, context_dim: int) -> None:
    accepted = set().union(*(f.keywords for f in families))
    unknown = sorted(set(architecture) - accepted)
    if unknown:
        names = ", ".join(f.name for f in families)
        raise TypeError(
            f"flow keyword(s) {unknown} are not used by {names}; they accept {sorted(accepted)}"
        )
    if context_dim:
        if not any(f.conditional for f in families):
            conditional = [f.name for f in _FAMILIES.values() if f.conditional]
            raise ValueError(
                f"no conditional version of {[f.name for f in families]}; "
                f"conditional flows: {', '.join(sorted(conditional))}"
            )


def _parts(flow) -> list:
    return list(flow.parts) if isinstance(flow, Stack) else [flow]


def invertible(flow: nn.Module) -> bool:
    """Whether every part of a built flow has an analytic inverse (foreign modules: no).

    "Sticking the landing" and DReG gradients and density evaluation need it; planar,
    radial, Sylvester and BNAF layers have none.

    Example:
        >>> invertible(build("realnvp", 3)), invertible(build("planar", 3))
        (True, False)
    """
    return all(getattr(p, "has_analytic_inverse", False) for p in _parts(flow))


def mixes_all_pairs(flow: nn.Module) -> bool:
    """Whether some layer of a built flow lets every dimension depend on every other.

    A coupling stack does not (its halves never condition some pairs on each other); an
    autoregressive, LU, Householder, Sylvester or BNAF layer does.

    Example:
        >>> mixes_all_pairs(build("realnvp", 4)), mixes_all_pairs(build("iaf", 4))
        (False, True)
    """
    return any(getattr(p, "mixes_all_pairs", False) for p in _parts(flow))
