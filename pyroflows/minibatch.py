r"""What ``fit`` does differently on a subsampled model: more draws a step, longer plateau
windows, and the mean parameters of the last two learning rates.

A guide with local latents in a subsampled plate (``pyroflows.locals``) sees a minibatch a
step, and its global parameters' gradients are mostly minibatch noise. Measured on a centred
hierarchy with 1,000 groups and subsamples of 100 (``benchmarks/locals.py``;
``benchmarks/results/design.md``, "Random reshuffling"), three settings change there:

- ``MINIBATCH_PARTICLES`` draws a step instead of one: with a single draw the global
  mean's sd ended 0.1-0.2 narrow even at the smallest rate; with 4, the global scale's mean
  0.15 sds off at one seed of three (8 draws, vectorised: 0-35% more per step in the
  scale benchmark).
- Plateau windows of ``num_steps // 12`` steps, 100 to 500 (``minibatch_window``), not
  ``num_steps // 40``, 100 to 250: the loss is so noisy that windows of 150 steps saw no
  progress and cut the rate at step 1,000, while the global mean still swung by 1-3
  posterior sds and the global scale was still 15% narrow.
- The mean of the iterates over the schedule's last two phases (the last two learning
  rates; Polyak and Juditsky 1992; Ruppert 1988; ``IterateAverage``): even at ``fit``'s
  smallest rate the parameters wander about their optimum, and where the run stopped
  decided the answer (0.1-0.7 sds for the global mean). The smallest rate alone moves the
  parameters too little to average out where the rate before it left them (its mean kept
  the global scale's sd 0.11 narrow at one seed; over the last two phases, 0.08). Only the
  global parameters are averaged: each member's rows move only when the member is drawn,
  and averaging them would cost a pass over every member per step.

The guide's subsamples themselves are dealt by random reshuffling
(``pyroflows.subsampling.Reshuffled``).

Example:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.zeros(2))
    >>> average = IterateAverage([weight])
    >>> for phase, value in ((None, 5.0), (1, 9.0), (2, 1.0), (2, 2.0), (3, 4.0)):
    ...     with torch.no_grad():
    ...         _ = weight.fill_(value)
    ...     average.record(phase)  # (None: not counted; phase 1 is dropped at phase 3)
    >>> average.apply()
    >>> [round(w, 4) for w in weight.tolist()]  # (1 + 2 + 4) / 3
    [2.3333, 2.3333]
"""

from __future__ import annotations

import torch

__all__ = [
    "MINIBATCH_PARTICLES",
    "IterateAverage",
    "global_parameters",
    "minibatch_window",
    "minibatched",
    "tail_average",
]

MINIBATCH_PARTICLES = 8


def minibatched(guide) -> bool:
    """Whether ``guide`` (set up) has local latents in a plate it subsamples."""
    plates = getattr(guide, "plates", None) or {}
    subsampled = any((p.subsample_size or p.size) < p.size for p in plates.values())
    return getattr(guide, "locals", None) is not None and subsampled


def minibatch_window(num_steps: int) -> int:
    """The plateau window on a subsampled model: ``num_steps // 12``, within 100 to 500."""
    return min(max(num_steps // 12, 100), 500)


class IterateAverage:
    """The running mean of ``params`` over the steps of the last two phases ``record`` saw
    (the phase before the last is dropped when a new one begins); ``apply`` writes it into
    them (a no-op where none was counted)."""

    def __init__(self, params):
        self.params = list(params)
        self.phase = None
        self.sums: list[list[torch.Tensor]] = []  # the last two phases' sums, oldest first
        self.counts: list[int] = []

    @torch.no_grad()
    def record(self, phase) -> None:
        """Count this step's parameters in ``phase`` (``None``: not counted)."""
        if phase is None or not self.params:
            return
        if phase != self.phase:
            self.sums = [*self.sums[-1:], [torch.zeros_like(p) for p in self.params]]
            self.counts = [*self.counts[-1:], 0]
            self.phase = phase
        for total, param in zip(self.sums[-1], self.params, strict=True):
            total.add_(param)
        self.counts[-1] += 1

    @torch.no_grad()
    def apply(self) -> None:
        count = sum(self.counts)
        for k, param in enumerate(self.params if count else ()):
            param.copy_(sum(sums[k] for sums in self.sums) / count)


def global_parameters(guide) -> list[torch.Tensor]:
    """The parameters of ``guide`` but its local latents' per-member rows (their shared
    conditional networks included)."""
    local = getattr(guide, "locals", None)
    rows = [*local.loc, *local.scale_raw] if local is not None else []
    members = {id(p) for p in rows}
    return [p for p in guide.parameters() if id(p) not in members]


def tail_average(guide) -> IterateAverage:
    """What ``fit`` averages: a guide's global parameters where it has local latents in a
    subsampled plate (nothing otherwise, so that a full-data fit ends where it ended)."""
    if not minibatched(guide):
        return IterateAverage([])
    return IterateAverage(global_parameters(guide))
