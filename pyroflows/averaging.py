r"""Iterate averaging for ``fit`` on subsampled models: the last phase's mean parameters.

With a minibatch, every step's gradient is noisy, and even at ``fit``'s smallest learning
rate the parameters wander about their optimum: on a centred hierarchy with 1,000 groups and
a subsample of 100 (``benchmarks/locals.py``), the guide's centre for the global mean moved
by 0.15-0.45 posterior sds within the last 250-1,000 steps, and where the run stopped it was
0.1-0.7 sds off. The mean of the iterates over the last phase (Polyak and Juditsky 1992;
Ruppert 1988) has that noise averaged out. Only the global parameters are averaged: each
member's rows move only when the member is drawn, and averaging them would cost a pass
over every member per step.

Example:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.zeros(2))
    >>> average = IterateAverage([weight])
    >>> for value in (5.0, 1.0, 2.0, 6.0):  # the first step is not in the final phase
    ...     with torch.no_grad():
    ...         _ = weight.fill_(value)
    ...     average.record(value != 5.0)
    >>> average.apply()
    >>> weight.tolist()
    [3.0, 3.0]
"""

from __future__ import annotations

import torch

__all__ = ["IterateAverage", "global_parameters", "tail_average"]


class IterateAverage:
    """The running mean of ``params`` over the steps ``record`` is told to count;
    ``apply`` writes it into them (a no-op where none was counted)."""

    def __init__(self, params):
        self.params = list(params)
        self.total: list[torch.Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def record(self, counted: bool) -> None:
        if not counted or not self.params:
            return
        if self.total is None:
            self.total = [p.detach().clone() for p in self.params]
        else:
            for total, param in zip(self.total, self.params, strict=True):
                total.add_(param)
        self.count += 1

    @torch.no_grad()
    def apply(self) -> None:
        if not self.count:
            return
        for param, total in zip(self.params, self.total, strict=True):
            param.copy_(total / self.count)


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
    plates = getattr(guide, "plates", None) or {}
    subsampled = any((p.subsample_size or p.size) < p.size for p in plates.values())
    if getattr(guide, "locals", None) is None or not subsampled:
        return IterateAverage([])
    return IterateAverage(global_parameters(guide))
