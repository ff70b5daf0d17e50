"""The flow an ``AutoFlowGuide`` builds: its defaults and how a spec becomes a module.

The defaults were chosen by measurement (``benchmarks/RESULTS.md``): two IAF blocks
(``DEFAULT_FLOW``, ``DEFAULT_NUM_LAYERS``), conditioner width ``2 d`` clipped to ``[32, 128]``;
for a guide with local latents, whose flow holds a hierarchy's location and scale, a
sinh-arcsinh layer first (``LOCALS_FIRST_LAYER``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import transforms

__all__ = [
    "DEFAULT_FLOW",
    "DEFAULT_NUM_LAYERS",
    "LOCALS_FIRST_LAYER",
    "build_guide_flow",
    "check_choice",
    "default_hidden_dims",
    "describe_architecture",
]

DEFAULT_FLOW = "iaf"
DEFAULT_NUM_LAYERS = 2  # blocks of the default flow
# With local latents the flow's vector is the hierarchy's globals, whose scale has its density
# positive at zero: in log scale a long tail that IAF's Gaussian tails miss (centred eight
# schools, schools local: max log sd 0.23-0.27 -> 0.02-0.03; benchmarks/results/design.md,
# "The default flow's marginals"). Without local latents it did worse on Neal's funnel.
LOCALS_FIRST_LAYER = "sinh_arcsinh"
DEFAULT_DESCRIPTION = "default (two IAF blocks; with local latents a sinh-arcsinh layer first)"


def check_choice(name: str, value, options: tuple) -> None:
    """Refuse a keyword value that is not one of ``options``, naming them."""
    if value not in options:
        listed = ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}"
        raise ValueError(f"{name} must be {listed}, got {value!r}")


def describe_architecture(spec, num_layers, hidden_dims, flow_kwargs: dict) -> dict:
    """The settings that give a guide's parameters their meaning, as saved in its state."""
    if spec is None:
        spec = DEFAULT_DESCRIPTION
    return {
        "flow": spec if isinstance(spec, (str, list, tuple)) else type(spec).__name__,
        "num_layers": num_layers,
        "hidden_dims": None if hidden_dims is None else list(hidden_dims),
        **flow_kwargs,
    }


def validate_flow_spec(flow, num_layers=None) -> None:
    """Unknown names and a depth below one fail at construction, not at the first SVI step
    (``None``: the default)."""
    transforms.check_num_layers(num_layers)
    names = [flow] if isinstance(flow, str) else flow
    if isinstance(names, (list, tuple)):
        for name in names:
            transforms.family(name)


def default_hidden_dims(latent_dim: int) -> list[int]:
    """The conditioner width policy: ``2 * latent_dim`` clipped to ``[32, 128]``, two layers.

    Wide enough for small models, and bounded so that the cost per step grows linearly with
    the latent dimension, not quadratically: at d = 1000 the step is dominated by the
    optimizer's pass over the conditioners' O(d * width) weights (``benchmarks/RESULTS.md``).

    Example:
        >>> default_hidden_dims(3), default_hidden_dims(50), default_hidden_dims(1000)
        ([32, 32], [100, 100], [128, 128])
    """
    width = min(max(2 * latent_dim, 32), 128)
    return [width, width]


def build_guide_flow(
    spec,
    dim: int,
    num_layers: int | None,
    hidden_dims: Sequence[int] | None,
    flow_kwargs: dict,
    has_locals: bool = False,
) -> nn.Module:
    """``transforms.build`` with the guide's defaults: the default flow (``spec=None``) and
    its depth, and the width policy for every family that has hidden layers."""
    if spec is None:
        blocks = [DEFAULT_FLOW] * (num_layers or DEFAULT_NUM_LAYERS)
        spec, num_layers = ([LOCALS_FIRST_LAYER] if has_locals else []) + blocks, 1
    if num_layers is None and isinstance(spec, str) and spec == DEFAULT_FLOW:
        num_layers = DEFAULT_NUM_LAYERS
    kwargs = dict(flow_kwargs)
    is_built = isinstance(spec, nn.Module) or (
        callable(spec) and not isinstance(spec, (str, list, tuple))
    )
    if not is_built:
        names = [spec] if isinstance(spec, str) else list(spec)
        if any("hidden_dims" in transforms.family(n).keywords for n in names):
            kwargs["hidden_dims"] = (
                list(hidden_dims) if hidden_dims is not None else default_hidden_dims(dim)
            )
        elif hidden_dims is not None:
            raise ValueError(f"flow {spec!r} has no hidden layers; hidden_dims does not apply")
    return transforms.build(spec, dim, num_layers=num_layers, **kwargs)
