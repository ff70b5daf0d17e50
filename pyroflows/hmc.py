r"""Many HMC chains at once, as one batch: the sampler of ``infer``'s NeuTra stage.

In the space of a fitted flow's base distribution, a good fit leaves a posterior close to a
standard normal, so plain HMC with a jittered trajectory of about a quarter period samples
it well (Hoffman et al. 2019 ran NeuTra with HMC). Run as ``C`` chains stacked in one batch,
every leapfrog step is one vectorised evaluation of the energy: at the sizes of most
Bayesian models that costs about what one chain's step costs, so ``C`` chains give ``C``
times the draws per second, and a multi-chain R-hat that can see a chain stuck apart.

Warm-up (``warmup`` iterations per chain): dual averaging of one step size shared by the
chains (Hoffman & Gelman 2014) on their mean acceptance; then, from the pooled draws of a
window, a diagonal metric (Stan's regularised variance); then the step size again. A
transition whose energy error is over ``DIVERGENCE`` (or not finite) is rejected and counted
as divergent, as Stan and Pyro count them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCE",
    "HMCRun",
    "NoFiniteStart",
    "batched_hmc",
    "energy_and_grad",
    "finite_starts",
]

DIVERGENCE = 1000.0  # energy error that marks a divergent transition (Stan's and Pyro's)
QUARTER_PERIOD = math.pi / 2  # of a unit normal under a unit metric: draws decorrelate


class NoFiniteStart(ValueError):
    """A chain's start where the energy or its gradient is not finite: it cannot move."""


@dataclass
class HMCRun:
    """What ``batched_hmc`` returns.

    Attributes:
        draws: ``(chains, draws, dim)`` kept positions.
        divergent: ``(chains, draws)``, whether each kept transition diverged.
        step_size: the adapted step size; ``inv_metric``: the adapted diagonal metric.
        accept: mean acceptance probability over the kept transitions.
        gradients: energy gradients evaluated per chain (warm-up included).
        warmup: warm-up iterations run; ``stopped``: why the run ended early, or ``""``.
    """

    draws: Tensor
    divergent: Tensor
    step_size: float
    inv_metric: Tensor
    accept: float
    gradients: int
    warmup: int
    stopped: str = ""


class _DualAveraging:
    """Hoffman & Gelman (2014)'s step-size adaptation toward a target acceptance."""

    def __init__(self, step_size: float, target: float):
        self.mu, self.target = math.log(10 * step_size), target
        self.t, self.h_bar, self.log_bar = 0, 0.0, 0.0

    def update(self, accept: float) -> float:
        self.t += 1
        eta = 1.0 / (self.t + 10)
        self.h_bar = (1 - eta) * self.h_bar + eta * (self.target - accept)
        log_step = self.mu - math.sqrt(self.t) / 0.05 * self.h_bar
        weight = self.t**-0.75
        self.log_bar = weight * log_step + (1 - weight) * self.log_bar
        return math.exp(log_step)

    @property
    def final(self) -> float:
        return math.exp(self.log_bar)


def energy_and_grad(energy: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``energy(z)`` and its gradient with respect to ``z`` (autograd), both detached."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        u = energy(z)
        (grad,) = torch.autograd.grad(u.sum(), z)
    return u.detach(), grad


def _transition(gradient, z, u, grad, step_size, inv_metric, num_steps):
    """One HMC transition of every chain; returns the new state, acceptance and divergence."""
    p = torch.randn_like(z) / inv_metric.sqrt()
    h0 = u + 0.5 * (inv_metric * p * p).sum(-1)
    z1, u1, g1 = z, u, grad
    p = p - 0.5 * step_size * g1
    for step in range(num_steps):
        z1 = z1 + step_size * inv_metric * p
        u1, g1 = gradient(z1)
        p = p - (step_size if step + 1 < num_steps else 0.5 * step_size) * g1
    h1 = u1 + 0.5 * (inv_metric * p * p).sum(-1)
    error = h1 - h0
    divergent = ~torch.isfinite(error) | (error > DIVERGENCE)
    accept = torch.exp(-error.clamp(min=0.0)).masked_fill(divergent, 0.0)
    take = torch.rand_like(accept) < accept  # never for a divergence: its accept is 0
    z = torch.where(take[:, None], z1, z)
    u = torch.where(take, u1, u)
    grad = torch.where(take[:, None], g1, grad)
    return z, u, grad, accept, divergent


def batched_hmc(
    energy: Callable[[Tensor], Tensor],
    init: Tensor,
    num_samples: int,
    warmup: int = 300,
    target_accept: float = 0.8,
    trajectory: float = QUARTER_PERIOD,
    deadline: float | None = None,
    max_steps: int = 256,
    step_size: float = 0.5,
    inv_metric: Tensor | None = None,
    gradient: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> HMCRun:
    """HMC on ``energy`` (``(C, d) -> (C,)``, minus the log density) from ``init`` ``(C, d)``:
    ``C`` chains of ``num_samples`` draws after ``warmup`` iterations, stepped together.

    Each transition integrates for a time drawn uniformly from ``(0, 2 * trajectory)``
    (jittered, so that no chain locks onto a period), in at most ``max_steps`` leapfrog steps.
    ``deadline`` (a ``time.perf_counter()`` value) ends warm-up, then sampling, early, and the
    run keeps what it has. ``step_size`` and ``inv_metric`` are where adaptation starts (with
    ``warmup=0``, a finished run's values continue it unchanged). ``gradient`` (``z -> (energy,
    its gradient)``, e.g. ``pyroflows.traced.traced_gradient``'s) replaces autograd through
    ``energy``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> energy = lambda z: 0.5 * (z / torch.tensor([1.0, 3.0])).pow(2).sum(-1)
        >>> run = batched_hmc(energy, torch.zeros(8, 2), num_samples=500, warmup=200)
        >>> tuple(round(float(s), 0) for s in run.draws.reshape(-1, 2).std(0))
        (1.0, 3.0)
    """
    dim = init.shape[-1]
    gradient = gradient or partial(energy_and_grad, energy)
    z = init.detach().clone()
    u, grad = gradient(z)
    if not torch.isfinite(u).all() or not torch.isfinite(grad).all():
        bad = int((~torch.isfinite(u) | ~torch.isfinite(grad).all(-1)).sum())
        raise NoFiniteStart(
            f"batched_hmc: the energy or its gradient is not finite at {bad} starts"
        )
    if inv_metric is None:
        inv_metric = torch.ones(dim, dtype=z.dtype, device=z.device)
    adapt = _DualAveraging(step_size, target_accept)
    # Stan's windows, scaled down: pooled over the chains, one metric window suffices.
    first, last = warmup // 6, warmup - warmup // 6
    window = []
    gradients, ran, stopped = 0, 0, ""

    def steps() -> int:
        length = float(torch.rand(())) * 2 * trajectory
        return int(min(max_steps, max(1, math.ceil(length / step_size))))

    while ran < warmup:
        num_steps = steps()
        z, u, grad, accept, _ = _transition(gradient, z, u, grad, step_size, inv_metric, num_steps)
        gradients += num_steps
        ran += 1
        step_size = adapt.update(float(accept.mean()))
        if first <= ran < last:
            window.append(z)
        if ran == last and len(window) > 1:
            pooled = torch.cat(window)
            n = len(pooled)
            variance = pooled.var(0)
            inv_metric = (n / (n + 5.0)) * variance + 1e-3 * (5.0 / (n + 5.0))
            step_size = adapt.final
            adapt = _DualAveraging(step_size, target_accept)
        if deadline is not None and time.perf_counter() > deadline:
            stopped = f"the time budget ended warm-up after {ran} iterations"
            break
    step_size = adapt.final if ran else step_size
    draws, accepts, divergent_steps = [], [], []
    while len(draws) < num_samples:
        num_steps = steps()
        z, u, grad, accept, divergent = _transition(
            gradient, z, u, grad, step_size, inv_metric, num_steps
        )
        gradients += num_steps
        draws.append(z)
        accepts.append(accept.mean())  # a tensor: no device sync per draw
        divergent_steps.append(divergent)
        if deadline is not None and time.perf_counter() > deadline and len(draws) >= 10:
            stopped = stopped or f"the time budget ended the chains at {len(draws)} draws each"
            break
    stacked = torch.stack(draws, 1)  # (chains, draws, dim)
    mean_accept = float(torch.stack(accepts).mean())
    divergent = torch.stack(divergent_steps, 1)
    return HMCRun(stacked, divergent, step_size, inv_metric, mean_accept, gradients, ran, stopped)


@torch.no_grad()
def finite_starts(energy, base, num_chains: int) -> Tensor:
    """``num_chains`` draws of ``base`` where ``energy`` is finite: a flow fitted badly
    puts some draws where the model has zero density (rats, held-out set: 13 of 16), and a
    chain cannot start there. With fewer among 8x as many, the first draws (for
    ``batched_hmc`` to refuse, saying how many).

    Example:
        >>> energy = lambda z: torch.where(z[:, 0] > 0, 0.5 * z[:, 0] ** 2, math.inf)
        >>> starts = finite_starts(energy, torch.distributions.Normal(torch.zeros(1), 1.0), 8)
        >>> starts.shape, bool((starts > 0).all())
        (torch.Size([8, 1]), True)
    """
    candidates = base.sample((8 * num_chains,))
    finite = candidates[torch.isfinite(energy(candidates))]
    return finite[:num_chains] if len(finite) >= num_chains else candidates[:num_chains]
