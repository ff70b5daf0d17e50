r"""``fit``: SVI with a progress bar, a learning-rate schedule, early stopping and a NaN guard.

The loop runs one guarded step at a time (``pyroflows.step``: Pyro's ``SVI.step`` with a
check of the loss and every gradient before the update), on the schedule of
``pyroflows.schedule`` (linear warm-up, then the rate divided at each plateau of the ELBO,
ending the run as converged after the last reduction), with the display of
``pyroflows.progress``; a fitted ``AutoContinuous`` guide then gets its PSIS k-hat.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import pyro
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoContinuous
from pyro.optim import PyroOptim

from . import distributed as dist_
from .calls import model_keywords
from .compiled import Disagreement, compile_step
from .diagnostics import psis_diagnostic
from .guides import AutoFlowGuide
from .locals import sparse_gradients
from .minibatch import MINIBATCH_PARTICLES, minibatch_window, minibatched, tail_average
from .objectives import for_local_latents, objective
from .progress import FitError, Progress, check_setting
from .schedule import Schedule
from .scoring import scoring
from .step import GuardedStep, NotBroadcast
from .subsampling import SubsampledModel

__all__ = ["FitError", "FitResult", "FitState", "fit"]


@dataclass
class FitState:
    """What a callback sees after each step. Return ``True`` from a callback to stop."""

    step: int
    loss: float
    smoothed_loss: float
    lr: float
    guide: object


@dataclass
class FitResult:
    """The outcome of ``fit``.

    Attributes:
        guide: the fitted guide (its parameters are those of the last step).
        losses: the loss (negative ELBO, or negative bound) at every step.
        num_steps: steps run.
        converged: whether the convergence rule ended the run (``pyroflows.schedule``).
        wall_time: seconds spent in the loop.
        reason: why the run ended, in words.
        setup_time: seconds spent setting the guide up before the first step (an
            ``AutoFlowGuide``'s Laplace start can take seconds, compiling the step too),
            not part of ``wall_time``.
        path: ``"compiled"``, or ``"general"`` and why (see ``fit``'s ``fast``).
        diagnostic: the PSIS diagnostic of the fitted guide (``None`` if not computed).
        diagnostic_note: why it was not computed, where it was skipped.
    """

    guide: object
    losses: list[float]
    num_steps: int
    converged: bool
    wall_time: float
    reason: str
    lr_history: list[float] = field(default_factory=list, repr=False)
    diagnostic: object = None
    setup_time: float = 0.0
    path: str = "general"
    diagnostic_note: str = ""

    @property
    def final_loss(self) -> float:
        """The mean loss over the last 10% of steps (at least one, at most 500)."""
        if not self.losses:
            return math.nan
        tail = max(1, min(500, len(self.losses) // 10))
        return sum(self.losses[-tail:]) / tail

    @property
    def elbo(self) -> float:
        """``-final_loss``: the smoothed final ELBO (or bound)."""
        return -self.final_loss

    def summary(self) -> str:
        state = "converged" if self.converged else "not converged"
        setup = f" after {self.setup_time:.1f} s of setup" if self.setup_time >= 0.05 else ""
        text = (
            f"{self.num_steps} steps in {self.wall_time:.1f} s{setup}, final ELBO "
            f"{self.elbo:.4g} (mean of the last steps); {state}: {self.reason}"
        )
        if self.diagnostic is not None:
            text += f"\n{self.diagnostic.summary()}"
        if self.diagnostic_note:
            text += f"\n{self.diagnostic_note}"
        return text

    def __str__(self) -> str:
        return self.summary()

    def plot(self, ax=None, smooth: int | None = None):
        """The loss curve (and its running mean) on a matplotlib ``Axes``, which it returns."""
        from .plots import plot_losses

        return plot_losses(self.losses, ax=ax, smooth=smooth)


def fit(
    model,
    guide,
    *args,
    num_steps: int = 10000,
    optim: PyroOptim | None = None,
    lr: float = 1e-2,
    loss: str | ELBO = "elbo",
    num_particles: int | None = None,
    progress: bool | str = True,
    seed: int | None = None,
    callbacks: Sequence[Callable[[FitState], bool | None]] = (),
    schedule: str = "plateau",
    stop_early: bool = True,
    warmup: int = 100,
    window: int | None = None,
    patience: int = 3,
    decay_factor: float = 3.0,
    num_decays: int = 3,
    clip: float = 10.0,
    diagnose: bool = True,
    distributed: bool = False,
    fast: bool = True,
    model_kwargs: dict | None = None,
    **kwargs,
) -> FitResult:
    r"""Fit ``guide`` to ``model`` by stochastic variational inference.

    Arguments:
        model, guide: a Pyro model and guide (any guide; ``AutoFlowGuide`` for the path
            derivative objectives).
        args, kwargs: the model's arguments. A model keyword that collides with one of
            ``fit``'s goes in ``model_kwargs={...}``.
        num_steps: the most steps to run (early stopping may end sooner).
        optim: any ``pyro.optim.PyroOptim`` (then ``lr``, ``clip`` and the schedule's rate
            changes do not apply: the optimizer is used as given). Default: Adam with
            learning rate ``lr``, gradients clipped elementwise (see ``clip``), on the
            schedule below.
        loss: ``"elbo"`` (``Trace_ELBO``), ``"stl"`` (the ELBO with "sticking the landing"
            gradients, Roeder et al. 2017, arXiv:1703.09194: zero variance at the optimum,
            one inverse pass of the flow per step), ``"iwae"`` (importance-weighted bound with
            ``num_particles`` draws; for a guide with local latents, member by member:
            ``MemberImportanceELBO``), ``"dreg"`` (the same bound with doubly-reparametrised
            gradients, see ``ImportanceWeightedELBO``), or any Pyro
            ``ELBO`` instance (e.g. ``TraceEnum_ELBO(max_plate_nesting=1)``).
        num_particles: draws per step for the named losses (vectorised over a leading plate
            when more than one). Default: 1, or 8 with ``"elbo"``/``"stl"`` where the guide
            has local latents in a subsampled plate (``pyroflows.minibatch``; one, with a
            warning, if the model does not broadcast over them).
        progress: ``True``: a tqdm bar on an interactive stderr, else a compact line every
            tenth of ``num_steps``; ``"bar"`` or ``"log"`` to force one; ``False``: silent.
        seed: seeds Pyro's random state first, for a reproducible run.
        callbacks: called with a ``FitState`` after every step; returning ``True``
            stops the run.
        schedule: ``"plateau"``, ``"exponential"`` or ``"constant"`` (``pyroflows.schedule``).
        stop_early: end the run when the convergence rule says so.
        warmup: steps of linear learning-rate warm-up (default optimizer only).
        window, patience, decay_factor, num_decays: the plateau rule (``pyroflows.schedule``);
            ``window`` defaults to ``clamp(num_steps // 40, 100, 250)``. On a model with a
            subsampled plate (``pyroflows.minibatch``) it defaults to
            ``clamp(num_steps // 12, 100, 500)``, and the run ends at the mean of the guide's
            global parameters over its last two learning rates (minibatch noise averaged out).
        clip: the default optimizer's least elementwise gradient clip: each element is
            clamped at ``clip`` or at 5 times its running root mean square (Adam's second
            moment; one bound per tensor for tensors above 4,096 elements), whichever is
            larger, so that a rare huge gradient is stopped but steady large ones (a model
            summing thousands of terms) are not turned into signs.
        diagnose: after fitting an ``AutoContinuous`` guide (such as ``AutoFlowGuide``),
            compute the PSIS k-hat (``psis_diagnostic``, 1000 draws) and say if the fit
            cannot be trusted: once, in the progress display's closing summary, or as a
            warning when the display is off.
        distributed: data-parallel SVI over a ``torch.distributed`` process group (started
            from torchrun's environment if needed): each rank passes its shard of the data
            (``pyroflows.distributed.shard``), observed sites are scaled by the number of
            ranks, gradients and losses are averaged, parameters broadcast from rank 0 (see
            ``pyroflows.distributed``). Only rank 0 shows progress; the k-hat diagnostic,
            which needs the full data, is skipped.
        fast: step through the compiled step (``pyroflows.compiled``: the step traced once
            into a graph of tensor operations, checked against Pyro's general path) where it
            is exact; where it is not, the general path is taken and ``FitResult.path`` (and
            the progress display) says why. ``False``: always Pyro's general path.

    Raises:
        FitError: the loss or a gradient became NaN or infinite. The message names the step
            and, where it can be found, the site; the parameters are left as they were after
            the last finite step.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide, fit
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.randn(20) + 3.0
        >>> result = fit(model, AutoFlowGuide(model), y, num_steps=300, progress=False,
        ...              seed=0, diagnose=False)
        >>> result.num_steps <= 300, abs(result.guide.median()["mu"] - y.mean()) < 0.3
        (True, tensor(True))
    """
    kwargs = model_keywords(fit, model, kwargs, model_kwargs)
    check_setting("fit", "num_steps", num_steps, integer=True)
    check_setting("fit", "lr", lr)
    schedule = Schedule(
        schedule,
        lr,
        num_steps,
        warmup=warmup,
        window=window or min(max(num_steps // 40, 100), 250),
        patience=patience,
        decay_factor=decay_factor,
        num_decays=num_decays,
        stop_early=stop_early,
    )
    if seed is not None:
        pyro.set_rng_seed(seed)
    elbo, stl = objective(loss, 1 if num_particles is None else num_particles, guide)
    if distributed:
        dist_.init()
        model = dist_.ScaleObserved(dist_.world_size())(model)
        if dist_.rank() != 0:
            progress = False
        diagnose = False  # the diagnostic needs the full data
    update = GuardedStep(optim, lr, clip, distributed)
    if distributed:
        update.setup_guide(guide, args, kwargs)
    report = Progress(progress, num_steps)
    setup_time = 0.0 if distributed else _set_up(guide, args, kwargs, report)
    chosen = _for_minibatches(guide, loss, num_particles, window, num_steps, schedule, report)
    more_particles = chosen is not None
    elbo, stl = chosen or (elbo, stl)
    average = tail_average(guide)
    losses: list[float] = []
    lr_history: list[float] = []
    reason = None
    try:
        elbo = for_local_latents(elbo, loss, guide)
        sparse = _sparse_rows(guide, optim, distributed)
        stopped = scoring(guide, stopped=True) if stl else nullcontext()
        with stopped, sparse_gradients(guide.locals) if sparse else nullcontext():
            compiled, path = _compile(fast, distributed, elbo, model, guide, args, kwargs, report)
            setup_time += compiled.compile_time if compiled is not None else 0.0
            start = time.perf_counter()
            for step in range(1, num_steps + 1):
                current_lr = schedule.lr_at(step)
                try:
                    value = update.step(
                        elbo, model, guide, args, kwargs, current_lr, step, compiled
                    )
                except NotBroadcast as error:
                    elbo = _one_particle(error, loss, guide, more_particles and step == 1)
                    value = update.step(elbo, model, guide, args, kwargs, current_lr, step)
                except Disagreement as error:
                    compiled, path = None, f"general from step {step}: {error}"
                    warnings.warn(
                        f"fit: {error}; the model's computation depends on values in a way "
                        "the compiled step froze, so fit continues on Pyro's general path "
                        "(pass fast=False to use it from the start)",
                        stacklevel=2,
                    )
                    value = update.step(elbo, model, guide, args, kwargs, current_lr, step)
                losses.append(value)
                lr_history.append(current_lr)
                stop = schedule.record(value)
                average.record(schedule.decays or None)  # each phase after a reduction
                report.update(step, schedule.smoothed)
                state = FitState(step, value, schedule.smoothed, current_lr, guide)
                if any(callback(state) for callback in callbacks):
                    stop, reason = True, f"a callback stopped the run at step {step}"
                if stop:
                    break
            average.apply()
    finally:
        report.close()
    result = FitResult(
        guide=guide,
        losses=losses,
        num_steps=len(losses),
        converged=schedule.converged,
        wall_time=time.perf_counter() - start,
        reason=reason or schedule.reason,
        lr_history=lr_history,
        setup_time=setup_time,
        path=path,
    )
    if diagnose:
        # The display's closing summary carries the verdict: a warning too would repeat it.
        try:
            result.diagnostic = _diagnose(model, guide, args, kwargs, warn=not report.mode)
        except SubsampledModel as error:
            result.diagnostic_note = f"no k-hat: {error}"
    report.finish(result)
    return result


def _set_up(guide, args, kwargs, report: Progress) -> float:
    """Set an ``AutoFlowGuide`` up before the first step, so that its cost and its start
    show in the progress display rather than as a silent first step."""
    if not isinstance(guide, AutoFlowGuide) or guide.prototype_trace is not None:
        return 0.0
    try:
        start = time.perf_counter()
        guide.setup(*args, **kwargs)
    except BaseException:
        report.close()
        raise
    seconds = time.perf_counter() - start
    report.note(f"{type(guide).__name__} set up in {seconds:.1f} s: {guide.start_description}")
    return seconds


def _sparse_rows(guide, optim, distributed) -> bool:
    """Whether the guide's per-member rows take lazy updates (sparse gradients): only the
    default optimizer takes them (``RowAdam``), and distributed averaging cannot reduce them."""
    if getattr(guide, "locals", None) is None:
        return False
    return optim is None and not distributed


def _for_minibatches(guide, loss, num_particles, window, num_steps, schedule, report):
    """A subsampled model's settings, measured for minibatches (``pyroflows.minibatch``):
    longer plateau windows, and the objective with more particles where ``fit`` chooses
    their number (``None`` otherwise)."""
    if not minibatched(guide):
        return None
    if window is None:
        schedule.use_window(minibatch_window(num_steps))
    more = num_particles is None and loss in ("elbo", "stl")
    report.note(
        f"a subsampled model: {MINIBATCH_PARTICLES if more else num_particles or 1} draws a "
        f"step, windows of {schedule.plateau.window} steps, the last two rates averaged"
    )
    return objective(loss, MINIBATCH_PARTICLES, guide) if more else None


def _one_particle(error, loss, guide, chosen_by_fit: bool):
    """The objective with one particle, where ``fit`` chose more and the model does not
    broadcast over them (said in a warning); otherwise ``error`` stands."""
    if not chosen_by_fit:
        raise error
    warnings.warn(
        f"{error}; fit draws one a step instead of {MINIBATCH_PARTICLES}, its default on a "
        "subsampled model, where one leaves the global scales less accurate "
        "(pyroflows.minibatch)",
        stacklevel=3,  # (the caller of fit)
    )
    return objective(loss, 1, guide)[0]


def _compile(fast, distributed, elbo, model, guide, args, kwargs, report):
    """The compiled step and the path's description (``pyroflows.compiled``)."""
    if not fast:
        return None, "general (fast=False)"
    if distributed:
        return None, "general (distributed=True: each rank would decide alone)"
    particles = elbo.num_particles if elbo.num_particles > 1 else 0
    compiled, why = compile_step(elbo, model, guide, args, kwargs, particles)
    if compiled is None:
        report.note(f"general path (no compiled step: {why})")
        return None, f"general ({why})"
    report.note(f"compiled the step in {compiled.compile_time:.1f} s")
    return compiled, "compiled"


def _diagnose(model, guide, args, kwargs, warn: bool = True):
    if not isinstance(guide, AutoContinuous):
        return None
    try:
        result = psis_diagnostic(model, guide, *args, num_samples=1000, **kwargs)
    except SubsampledModel:
        raise  # not a failure: said in the summary
    except Exception as error:  # a diagnostic must not lose a finished fit
        warnings.warn(f"fit: the PSIS diagnostic could not be computed: {error}", stacklevel=3)
        return None
    if warn and not result.ok:
        warnings.warn(f"fit: {result.summary()}", stacklevel=3)
    return result
