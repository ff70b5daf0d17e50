"""What an ``AutoFlowGuide``'s state dict holds, and the checks before one is loaded.

A state is refused, naming what differs, before any tensor is copied: one from another model
(layout), base, flow architecture or affine, one with missing or extra entries or wrong
shapes, and one with non-finite values (corrupted). States saved before the architecture was
recorded load as before (their layout, base and affine are still checked).
"""

from __future__ import annotations

import torch

from .sites import Layout

__all__ = [
    "architecture_difference",
    "check_entries",
    "check_local_prior",
    "check_same_architecture",
    "read_saved_state",
]


def read_saved_state(state_dict: dict, prefix: str, base: str) -> tuple[dict, Layout]:
    """The guide's record in a state dict, and its layout; refuses another base."""
    state = state_dict.get(prefix + "_extra_state")
    if not state or not state.get("layout"):
        raise ValueError("this state dict does not come from a set-up AutoFlowGuide")
    if state["base"] != base:
        raise ValueError(
            f"the state dict is from a guide with base={state['base']!r}, this one has "
            f"base={base!r}"
        )
    return state, [(name, tuple(shape)) for name, shape in state["layout"]]


def check_same_architecture(state: dict, flow: str, architecture: dict, full_rank: bool):
    """The saved flow (its ``repr``) and affine must be this guide's; the flow first, since
    an affine hint cannot mend a different flow."""
    if state.get("flow") is not None and state["flow"] != flow:
        raise ValueError(
            "the state dict is from a guide with another flow: "
            + architecture_difference(state.get("architecture", {}), architecture)
        )
    if state.get("full_rank") != full_rank:
        kinds = ["full" if f else "diagonal" for f in (state.get("full_rank"), full_rank)]
        raise ValueError(
            f"the state dict is from a guide with a {kinds[0]} affine, this one is "
            f"{kinds[1]}; pass affine='{kinds[0]}' to match"
        )


def check_local_prior(saved: str, current: str) -> None:
    """A state's local latents must be read with the prior they were trained with: a member's
    parameters are the likelihood's share under the model's prior, not under a learned one."""
    if saved != current:
        raise ValueError(
            f"AutoFlowGuide: the state dict's local latents were trained with "
            f"local_prior={saved!r}, this guide has local_prior={current!r}; their members' "
            f"parameters mean different things. Pass local_prior={saved!r}"
        )


def architecture_difference(saved: dict, current: dict) -> str:
    """Name the settings in which two guide architectures differ, as ``key=saved (here:
    current)``; the whole comparison where no setting names it (flows built by the user)."""
    keys = sorted(set(saved) | set(current), key=str)
    differ = [k for k in keys if saved.get(k) != current.get(k)]
    if not differ:
        return f"saved {saved}, this guide {current}"
    return ", ".join(
        f"{k}={saved.get(k, 'default')!r} there ({current.get(k, 'default')!r} here)"
        for k in differ
    )


def check_entries(given: dict, expected: dict, prefix: str) -> None:
    """Every tensor this guide holds is in the state, of its shape, and finite."""
    extra = sorted(k for k in given if k.startswith(prefix) and k not in expected)
    if extra:
        raise ValueError(f"the state dict has entries this guide does not: {extra[:3]}")
    for key, mine in expected.items():
        if not torch.is_tensor(mine):
            continue
        theirs = given.get(key)
        if theirs is None:
            raise ValueError(f"the state dict has no {key!r}: it is incomplete or corrupted")
        if theirs.shape != mine.shape:
            raise ValueError(
                f"the state dict's {key!r} has shape {tuple(theirs.shape)}, this guide's "
                f"{tuple(mine.shape)}"
            )
        if theirs.is_floating_point() and not bool(torch.isfinite(theirs).all()):
            raise ValueError(f"the state dict's {key!r} has NaN or infinite values (corrupted)")
