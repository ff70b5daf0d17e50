"""The one place that reaches into Pyro's (and nn.Module's) private state, where they offer
no public seam.

Pyro's param store is global: a second guide with the same parameter names would silently
pick up the first one's values. ``AutoFlowGuide`` therefore takes a name no live guide and no
stored parameter uses, and checks once that the store holds its own tensors. Data-parallel
``fit`` sets a guide up on a scaled model, which means swapping the model an autoguide holds.
Atomic setup and loading restore a module's attribute dictionary after a failure. A NUTS
chain run to a deadline ends its warm-up early through the kernel's own schedule.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import pyro
from torch import Tensor

__all__ = [
    "check_param_store",
    "claim_param_name",
    "end_warmup",
    "guide_model_wrapped",
    "param_constraint",
    "restore",
    "snapshot",
]

_LIVE_NAMES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def claim_param_name(name: str | None, base: str, owner: object) -> str:
    """``name`` if given; else ``base``, or ``base_2``, ``base_3``, ...: the first name that
    no live guide and no parameter in Pyro's param store uses. Reserved for ``owner`` while
    it lives."""
    if name is not None:
        _LIVE_NAMES[name] = owner
        return name
    store = pyro.get_param_store()

    def taken(name: str) -> bool:
        prefixes = (name + ".", name + "$$$")
        return name in _LIVE_NAMES or any(k.startswith(prefixes) for k in store.keys())

    name, i = base, 2
    while taken(name):
        name, i = f"{base}_{i}", i + 1
    if name != base and base not in _LIVE_NAMES:
        warnings.warn(
            f"Pyro's param store holds parameters named {base!r}.* that no live guide owns "
            "(loaded with pyro.get_param_store().load, or left by a guide no longer in use). "
            f"This guide takes the name {name!r} and starts untrained: the param store does "
            "not restore an AutoFlowGuide. Restore one with torch.load or "
            "guide.load_state_dict; call pyro.clear_param_store() to reuse the name.",
            stacklevel=3,
        )
    _LIVE_NAMES[name] = owner
    return name


def check_param_store(named: list[tuple[str, Tensor]], prefix: str) -> None:
    """Raise if Pyro's store holds another tensor under one of these full names."""
    held_params = pyro.get_param_store()._params  # the raw tensors: no public accessor
    for fullname, param in named:
        held = held_params.get(fullname)
        if held is not None and held is not param:
            raise RuntimeError(
                f"Pyro's param store holds another tensor under {fullname!r}: two guides "
                f"share the name {prefix!r}. Give this guide another name= or "
                "call pyro.clear_param_store() before creating it."
            )


def param_constraint(name: str):
    """The constraint Pyro's param store holds for parameter ``name`` (no public accessor)."""
    return pyro.get_param_store()._constraints[name]


@contextmanager
def guide_model_wrapped(guide, wrapper):
    """Within: an autoguide sees ``wrapper(model)`` in place of its model (Pyro keeps the
    model as a private 1-tuple, so that module registration skips it)."""
    held = getattr(guide, "_model", None)
    if not (isinstance(held, tuple) and len(held) == 1):
        yield guide
        return
    guide._model = (wrapper(held[0]),)
    try:
        yield guide
    finally:
        guide._model = held


def snapshot(module) -> dict:
    """A module's attributes, its registries of parameters, buffers and submodules copied:
    ``restore`` puts it back as it was (setup and loading are atomic with these)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}


def restore(module, saved: dict) -> None:
    module.__dict__.clear()
    module.__dict__.update(saved)


def end_warmup(kernel, iterations: int) -> None:
    """Make ``iterations`` the end of a Pyro HMC/NUTS kernel's warm-up: later iterations
    neither adapt nor count as warm-up (Pyro's kernels have no public way to do this)."""
    kernel._warmup_steps = iterations
