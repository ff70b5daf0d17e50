r"""An energy and its gradient as one traced graph, where that is exact: the leapfrog steps of
``neutra_chains`` without Pyro's handlers.

Each HMC leapfrog step evaluates the model seen through the flow and its gradient; run through
Pyro's handlers, most of that step is bookkeeping (as for ``fit``'s compiled step,
``pyroflows.compiled``). ``traced_gradient`` records one evaluation with ``torch.fx``'s
``make_fx`` and replays only its tensor operations: 2.89 -> 1.71 ms per step for 16 chains on
centred eight schools, 2.12 -> 1.31 ms on funnel_d10 (``benchmarks/RESULTS.md``).

A trace freezes Python branches taken on values, so the graph is used only where it agrees with
the energy itself: at setup, value and gradient must match at fresh points; while running,
every ``CHECK_EVERY`` calls they are compared again at the point asked for, and on a mismatch
the energy itself takes over, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .graph_calls import trace
from .hmc import energy_and_grad

__all__ = ["CHECK_EVERY", "TracedGradient", "traced_gradient"]

CHECK_EVERY = 200  # calls between comparisons of the graph with the energy itself
AGREEMENT_POINTS = 2  # fresh points at which the graph must reproduce the energy at setup
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # the same operations: rounding only


class TracedGradient:
    """``z -> (energy(z), its gradient)`` through a traced graph, for ``z`` of the traced
    shape (any other shape, or after a disagreement, through the energy itself).

    Attributes:
        given_up: why the graph is no longer used, or ``""``.
    """

    def __init__(self, graph, energy: Callable[[Tensor], Tensor], shape: torch.Size):
        self.graph, self.energy, self.shape = graph, energy, shape
        self.calls = 0
        self.given_up = ""

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.given_up or z.shape != self.shape:
            return energy_and_grad(self.energy, z)
        with torch.no_grad():
            value, grad = self.graph(z.detach())
        self.calls += 1
        if self.calls % CHECK_EVERY == 0:
            why = _disagreement(self.energy, self.graph, z)
            if why:
                self.given_up = f"at call {self.calls} {why}"
                warnings.warn(
                    f"the traced energy gave up {self.given_up}; continuing without it "
                    "(slower, same draws' distribution)",
                    stacklevel=2,
                )
                return energy_and_grad(self.energy, z)
        return value, grad


def traced_gradient(energy: Callable[[Tensor], Tensor], example: Tensor):
    """``(TracedGradient, "")`` where the traced graph reproduces ``energy`` and its gradient
    at rows shaped like ``example``; else ``(None, reason)``.

    Example:
        >>> energy = lambda z: 0.5 * (z * z).sum(-1)
        >>> gradient, reason = traced_gradient(energy, torch.zeros(4, 2))
        >>> value, grad = gradient(torch.ones(4, 2))
        >>> reason, value.tolist(), grad[0].tolist()
        ('', [1.0, 1.0, 1.0, 1.0], [1.0, 1.0])
    """

    def value_and_grad(z):
        value = energy(z)
        (grad,) = torch.autograd.grad(value.sum(), z)
        return value, grad

    try:
        graph = trace(value_and_grad, example.detach().clone().requires_grad_())
    # What make_fx raises where it cannot follow the energy (a value read as a Python number,
    # an operation without a traceable kernel). Nothing is hidden: the caller runs the energy
    # itself next, which raises any fault of the model's own, and reports this reason.
    except (RuntimeError, NotImplementedError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"tracing the energy failed ({type(error).__name__}: {first})"
    for _ in range(AGREEMENT_POINTS):
        point = example + torch.randn_like(example)
        why = _disagreement(energy, graph, point)
        if why:
            return None, why
    return TracedGradient(graph, energy, example.shape), ""


def _disagreement(energy, graph, z: Tensor) -> str:
    want_value, want_grad = energy_and_grad(energy, z)
    with torch.no_grad():
        value, grad = graph(z.detach())
    tolerance = TOLERANCE.get(want_value.dtype, 1e-4)

    def close(got, want):
        return torch.allclose(got, want, rtol=tolerance, atol=tolerance, equal_nan=True)

    if not close(value, want_value) or not close(grad, want_grad):
        return (
            "the traced energy differs from the energy's own at the same point: its "
            "computation depends on values in a way the trace froze"
        )
    return ""
