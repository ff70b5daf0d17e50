"""The importance checks of ``infer``'s route (``pyroflows.inference``): weigh a guide's
draws, accept them or not, look for modes the guide misses, and size each check to the time
left.

``ImportanceChecks`` is a mixin of ``infer``'s run, which supplies the model, guide and
arguments, its clock (``left``, ``deadline``), and ``keep`` and ``posterior`` for answers.

Example:
    >>> from pyroflows.infer_weighing import ACCEPT_KHAT, PROPOSALS
    >>> ACCEPT_KHAT, PROPOSALS
    (0.5, 4000)
"""

from __future__ import annotations

import math
import time

import pyro

from .diagnostics import importance_resample
from .modes import check_modes
from .posterior import Stage
from .psis import NoFiniteWeights

__all__ = ["ACCEPT_KHAT", "PROPOSALS", "ImportanceChecks"]

ACCEPT_KHAT = 0.5  # not PSIS's 0.7: a funnel's log sd 0.24 off passed at 0.57 (RESULTS.md)
PROPOSALS = 4000  # guide draws weighed per check (at least num_samples)
SEQUENTIAL_PROPOSALS = 1000  # for a model that does not broadcast over draws
CALIBRATION_PROPOSALS = 200  # weighed once to measure a draw's cost, under a time budget
MAX_PROPOSALS = 40_000  # when k-hat is fine but the ESS short: draw up to this many


class ImportanceChecks:
    """Mixin of ``infer``'s run: its importance-resampling checks (module docstring)."""

    def weigh(self, stage: Stage) -> None:
        """Importance-resample the guide's draws, judged on its own weights (moment matching
        lowers k-hat on the draws it judges: it only improves a rejected answer)."""
        began = time.perf_counter()
        proposals = self.proposals()
        try:
            out = self.resample(proposals, adapt=False)
        except NoFiniteWeights as error:  # an answer with no weight: none; the route says why
            stage.outcome += f"nothing to weigh: {str(error).splitlines()[0]}"
            return
        d = out.diagnostic
        if d.k_hat < ACCEPT_KHAT and d.ess < self.min_ess:
            more = min(MAX_PROPOSALS, math.ceil(proposals * 1.2 * self.min_ess / max(d.ess, 1)))
            if more > proposals and self.left() > 3 * (time.perf_counter() - began):
                out = self.resample(more, adapt=False)
                d = out.diagnostic
        trusted = d.k_hat < ACCEPT_KHAT
        stage.accepted = trusted and d.ess >= self.min_ess
        stage.outcome += (
            f"PSIS k-hat {d.k_hat:.2f} (accepted below {ACCEPT_KHAT}), ESS {d.ess:.0f} of "
            f"{d.num_samples} proposals"
        )
        if trusted and not stage.accepted:
            stage.outcome += f" (below the {self.min_ess} needed)"
        diagnostics = {"k_hat": d.k_hat, "ess": d.ess, "proposals": d.num_samples}
        label = f"PSIS-resampled guide draws ({stage.name}), k-hat {d.k_hat:.2f}, ESS {d.ess:.0f}"
        label += "; globals weighted, members integrated out" if self.guide.local_sites else ""
        if not stage.accepted and self.left() > 3 * (time.perf_counter() - began):
            adapted = self.resample(proposals)  # moment matching: a better approximate answer
            if adapted.num_adaptations:
                out, maps = adapted, adapted.num_adaptations
                diagnostics.update(k_hat_moment_matched=adapted.diagnostic.k_hat, maps=maps)
                label += f" (moment-matched: {maps} maps, k-hat {adapted.diagnostic.k_hat:.2f})"
        if stage.accepted:  # a rejected answer is not rescued: its gaps may hide the bias
            out, label, diagnostics = self.cover_modes(stage, out, label, diagnostics)
        self.check_seconds = time.perf_counter() - began
        self.keep(
            2 if stage.accepted else 0,
            self.posterior(out.samples, "resampled", diagnostics, out),
            label,
        )

    def cover_modes(self, stage: Stage, out, label: str, diagnostics: dict):
        """Search (once per call) for modes the accepted guide never draws from; found ones
        are mixed into the proposal, which must then pass the same check."""
        if self.deadline is not None and self.left() < 4 * self.check_seconds + 1.0:
            stage.outcome += "; no mode search: the time budget"
            return out, label, diagnostics
        call = (self.model, self.guide, self.args, self.kwargs)
        allowed = max(2.0, 0.5 * (time.perf_counter() - self.start))  # at most ~1.5x the call
        check = check_modes(*call, out, self.num_samples, self.modes, self.vectorised, allowed)
        self.modes, self.missed = check.search, check.missed
        stage.outcome += f"; {check.words}"
        diagnostics.update(modes_missed=len(check.missed))
        if check.mixture is not None:
            out, d = check.mixture, check.mixture.diagnostic
            diagnostics.update(k_hat=d.k_hat, ess=d.ess, proposals=d.num_samples)
            stage.accepted = d.k_hat < ACCEPT_KHAT and d.ess >= self.min_ess
            label = f"PSIS-resampled mixture of the guide ({stage.name}) and {len(self.missed)} "
            label += f"Laplace mode(s), k-hat {d.k_hat:.2f}, ESS {d.ess:.0f}"
        elif self.missed:
            stage.accepted = False
            label += f", missing {len(self.missed)} mode(s)"
        return out, label, diagnostics

    def proposals(self, check: bool = False) -> int:
        """Draws to weigh: ``num_samples`` at least (a check: the base), at most what the
        time left affords at the cost per draw measured (a member-resampling guide's draws
        cost far more than a flow's)."""
        # A model that does not broadcast is run once per draw (about 5 ms each): fewer.
        base = PROPOSALS if self.vectorised else SEQUENTIAL_PROPOSALS
        wanted = base if check else max(base, self.num_samples)
        if self.deadline is None:
            return wanted
        if self.per_proposal.get(id(self.guide)) is None:
            self.resample(CALIBRATION_PROPOSALS, adapt=False)
        affordable = 0.8 * self.left() / self.per_proposal[id(self.guide)]
        return max(min(wanted, int(affordable)), CALIBRATION_PROPOSALS)

    def resample(self, proposals: int, adapt: bool = True):
        # k-hat is this route's to report (in the route, and once at the end)
        began = time.perf_counter()
        call = (self.model, self.guide, *self.args)
        settings = dict(num_samples=proposals, num_draws=self.num_samples, adapt=adapt)
        # A proposal from the flow's tail where the model's distributions are invalid (a
        # scale underflowing to 0) has zero density there: it weighs zero, as the member
        # resampling's do, instead of stopping the check (rats, held-out set)
        with pyro.validation_enabled(False):
            out = importance_resample(*call, **settings, warn=False, **self.kwargs)
        if not adapt:
            self.per_proposal[id(self.guide)] = (time.perf_counter() - began) / proposals
        return out
