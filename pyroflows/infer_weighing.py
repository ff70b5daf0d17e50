"""The importance checks of ``infer``'s route (``pyroflows.inference``): train a guide until
its draws pass, weigh them, accept them or not, look for modes the guide misses, and size
each check to the time left.

``ImportanceChecks`` is a mixin of ``infer``'s run, which supplies the model, guide and
arguments, its clock (``left``, ``deadline``), what setup found (``vectorised``: whether the
model broadcasts over draws; ``bad_data``: observed sites whose data are not finite),
``progress``, and ``keep`` and ``posterior`` for answers.

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
from .fit import fit
from .modes import MAX_PROPOSALS, check_modes  # (drawn when k-hat is fine, the ESS short)
from .posterior import Stage
from .progress import FitError
from .psis import NoFiniteWeights

__all__ = ["ACCEPT_KHAT", "CHECK_EVERY", "LOCALS_CHECK_EVERY", "PROPOSALS", "ImportanceChecks"]

ACCEPT_KHAT = 0.5  # not PSIS's 0.7: a funnel's log sd 0.24 off passed at 0.57 (RESULTS.md)
MISSED_MODE_KHAT = 0.7  # a rejected answer this far above the bar is searched for modes too
PROPOSALS = 4000  # guide draws weighed per check (at least num_samples)
SEQUENTIAL_PROPOSALS = 1000  # for a model that does not broadcast over draws
CALIBRATION_PROPOSALS = 200  # weighed once to measure a draw's cost, under a time budget
# Steps between a fit's k-hat checks. A local guide's fit (general path, 5-10 ms a step,
# weighed on its few globals) is checked twice as often and trained on until fresh draws
# pass; a joint flow's stops at its first passing check (RESULTS.md, "infer: the route").
CHECK_EVERY, LOCALS_CHECK_EVERY = 500, 250
COMPILE_MIN_SECONDS = 20.0  # compiling costs ~150 general steps: not worth it with less left


class ImportanceChecks:
    """Mixin of ``infer``'s run: its importance-resampling checks (module docstring)."""

    def train(
        self, stage: Stage, prefix: str, check_every: int = CHECK_EVERY,
        until_accepted: bool = False, weigh: bool = True, **settings,
    ) -> None:  # fmt: skip
        """``fit`` the guide until its draws can be trusted, then weigh them.

        Every ``check_every`` steps k-hat is read on ``PROPOSALS`` draws; where it is below
        the bar, training stops, and the answer is judged on a fresh, independent set (the
        step is chosen where k-hat dipped, so the draws that chose it would judge themselves
        too kindly). ``until_accepted``: that judgement runs at the check, and where it
        fails, training goes on. A fit that ends otherwise (its own plateau rule, its step
        limit, the deadline) is weighed at its end (``weigh=False``: not weighed; a
        subsampled model has no weights)."""
        why, verdict = [], []

        def enough(state) -> bool:
            if self.deadline is not None and self.left() < 2 * self.check_seconds + 0.5:
                why.append(f"stopped at step {state.step}: the time budget")
                return True
            if state.step % check_every or not self.vectorised or not weigh:
                return False
            try:
                peek = self.resample(self.proposals(check=True), adapt=False)
            except NoFiniteWeights:  # nothing the model accepts drawn yet: train on
                return False
            if not peek.diagnostic.k_hat < ACCEPT_KHAT:
                return False
            if not until_accepted:
                why.append(f"stopped at step {state.step}: k-hat {peek.diagnostic.k_hat:.2f}")
                return True
            judged = Stage(stage.name, 0.0, "")
            self.weigh(judged, final=False)
            if judged.accepted:
                why.append(f"accepted at step {state.step}")
                verdict.append(judged)
            return bool(verdict)

        fast = self.left() > COMPILE_MIN_SECONDS
        settings.update(progress=self.progress, diagnose=False, callbacks=[enough], fast=fast)
        try:
            result = fit(self.model, self.guide, *self.args, model_kwargs=self.kwargs, **settings)
            ended = why[0] if why else result.reason
            stage.outcome = f"{prefix}{result.num_steps} steps ({ended}); "
        except FitError as error:
            if error.site in self.bad_data:  # the data themselves: no stage can mend that
                raise
            # Training diverged: the guide keeps its last finite parameters, judged as any
            diverged = str(error).split(". ")[0].removeprefix("fit: ")
            stage.outcome = f"{prefix}training diverged: {diverged}; "
        if verdict:
            stage.outcome += verdict[0].outcome
            stage.accepted = True
        elif weigh:
            self.weigh(stage)

    def weigh(self, stage: Stage, final: bool = True) -> None:
        """Importance-resample the guide's draws, judged on its own weights (moment matching
        lowers k-hat on the draws it judges: it only improves a rejected answer, and only a
        ``final`` one: not one that training will go on to improve)."""
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
        # The defensive half reaches a separate mode the guide misses, and its weights there
        # reject the answer far above the bar (k-hat 7 on two modes 10 sds apart): the
        # mode search that checks accepted answers can then add it. Not near the bar, where
        # a fresh weighing would give a noisy k-hat a second chance.
        if stage.accepted or (final and d.k_hat >= MISSED_MODE_KHAT):
            out, label, diagnostics = self.cover_modes(stage, out, label, diagnostics)
        if final and not stage.accepted and self.left() > 3 * (time.perf_counter() - began):
            adapted = self.resample(proposals)  # moment matching: a better approximate answer
            if adapted.num_adaptations:
                out, maps = adapted, adapted.num_adaptations
                diagnostics.update(k_hat_moment_matched=adapted.diagnostic.k_hat, maps=maps)
                label += f" (moment-matched: {maps} maps, k-hat {adapted.diagnostic.k_hat:.2f})"
        self.check_seconds = time.perf_counter() - began
        self.keep(
            2 if stage.accepted else 0,
            self.posterior(out.samples, "resampled", diagnostics, out),
            label,
        )

    def cover_modes(self, stage: Stage, out, label: str, diagnostics: dict):
        """Search (once per call) for modes the guide never draws from (of an accepted answer,
        or one rejected far above the bar); found ones are mixed into the proposal, which
        must then pass the same check."""
        if self.deadline is not None and self.left() < 4 * self.check_seconds + 1.0:
            stage.outcome += "; no mode search: the time budget"
            return out, label, diagnostics
        call = (self.model, self.guide, self.args, self.kwargs)
        allowed = max(2.0, 0.5 * (time.perf_counter() - self.start))  # at most ~1.5x the call
        # a mixture short of ESS is drawn again from more proposals (up to MAX_PROPOSALS),
        # under a time budget only with several checks' time to spare
        top_up = self.min_ess if self.left() > 8 * self.check_seconds + 1.0 else 0
        searched = (self.modes, self.vectorised, allowed, top_up)
        check = check_modes(*call, out, self.num_samples, *searched)
        self.missed = check.missed
        if check.search.starts:  # (none ran for a guide with local latents: not the flow's)
            self.modes = check.search
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
        # half the proposals from a heavy-tailed base (pyroflows.proposal): a lobe or tail the
        # flow covers thinly is reached (U4: means 0.21 sd off with the guide alone)
        # (a guide with local latents weighs its globals so already: pyroflows.member_resample)
        settings.update(defensive=bool(self.vectorised))
        # A proposal from the flow's tail where the model's distributions are invalid (a
        # scale underflowing to 0) has zero density there: it weighs zero, as the member
        # resampling's do, instead of stopping the check (rats, held-out set)
        with pyro.validation_enabled(False):
            out = importance_resample(*call, **settings, warn=False, **self.kwargs)
        if not adapt:
            self.per_proposal[id(self.guide)] = (time.perf_counter() - began) / proposals
        return out
