r"""``infer``: a posterior in one call, escalating from cheap answers to exact ones.

The route (``benchmarks/RESULTS.md``, "infer: the route" has the measurements behind it):

1. ``laplace``: the guide's Laplace start, ``N(mode, H^-1)`` in the unconstrained space,
   importance-resampled (Pathfinder's lesson: a near-Gaussian posterior needs no long
   optimisation). Skipped where the model has no sound mode (a funnel).
2. ``locals``: for a hierarchy (``pyroflows.hierarchy``: a plate whose latents have Gaussian
   priors, each observation belonging to one member: ``pyroflows.member_owners``), a flow on
   the globals only, each member's latents drawn from the model's own prior times a
   Gaussian, the globals importance-resampled with every member integrated out. A centred
   hierarchy's funnel is then in the model's prior, exactly, rather than in the flow.
3. ``fit``: the default flow fitted by ``fit`` (ELBO; stopped once k-hat on a check is below
   the bar), importance-resampled from fresh draws.
4. ``dreg``: the same flow refitted on the importance-weighted bound with 8 particles and
   DReG gradients (mass-covering), importance-resampled.
5. ``neutra``: MCMC in the flow's space: 4-16 HMC chains stepped as one batch
   (``neutra_chains``), or Pyro's NUTS, one chain, for a model that does not broadcast over
   draws (``neutra_chain``). Asymptotically exact, cheap when the flow is good, and the
   answer whenever importance weights cannot be trusted.

Importance-resampled stages draw half their proposals through the flow from a heavy-tailed
base (``pyroflows.proposal``, a defensive mixture). Such an answer is accepted when the PSIS
k-hat of the mixture's weights (before any moment matching) is below 0.5 and their ESS
reaches ``min_ess``, and when a multi-start search finds no mode the guide misses
(``pyroflows.modes``; found ones are mixed into the proposal, which must then pass; an
answer rejected at k-hat >= 0.7 is searched too); a NeuTra chain when its R-hat < 1.01,
bulk ESS >= 400 and it had no divergence. ``docs/guide/infer.md`` has the rules' reasons.
When nothing passes, the best answer is returned with one warning.
"""

from __future__ import annotations

import math
import sys
import time
import warnings

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_value

from .calls import model_keywords
from .draws import NOT_VECTORISED_HINT, draw, evaluate_at, runs_vectorised
from .guides import AutoFlowGuide
from .hierarchy import hierarchy_plates
from .hmc import NoFiniteStart
from .infer_weighing import CALIBRATION_PROPOSALS, LOCALS_CHECK_EVERY, ImportanceChecks
from .member_bound import MembersNotSeparable
from .member_owners import observation_owners
from .neutra import cannot_batch, neutra_chain, neutra_chains
from .posterior import Posterior, Route, Stage
from .progress import check_setting
from .psis import NoFiniteWeights
from .subsampling import subsampled_plate, trace_at_guide_draw
from .transforms import invertible

__all__ = ["JOINT_FLOW", "STAGES", "infer"]

STAGES = ("laplace", "locals", "fit", "dreg", "neutra")
R_HAT_LIMIT = 1.01
NEUTRA_MIN_SECONDS = 10.0  # a chain needs its warm-up: not started with less time left
NEUTRA_TARGET_ACCEPT = 0.9  # NUTS's: smaller steps where the flow leaves curvature (necks)
MCMC_MIN_ESS = 400  # Vehtari et al. (2021)'s bulk-ESS rule for MCMC draws
PARTICLES = 8  # of the dreg stage (benchmarks/RESULTS.md: K=8 met 10 of 14 posteriors)
FIT_STEPS, DREG_STEPS = 5000, 3000  # the benchmark's budget; the plateau rule ends most sooner
# The joint flow of the fit and dreg stages: each marginal's own skew and tail weight before
# two IAF blocks (dugongs' dreg stage reached k-hat 0.48 with it, 0.91 without; RESULTS.md,
# "infer: the route"). Funnels, where the layer did worse, go to the locals stage first.
JOINT_FLOW = ("sinh_arcsinh", "iaf", "iaf")


def infer(
    model,
    *args,
    num_samples: int = 1000,
    guide=None,
    seed: int | None = None,
    progress: bool = True,
    time_budget: float | None = None,
    stages=STAGES,
    min_ess: int | None = None,
    model_kwargs: dict | None = None,
    **kwargs,
) -> Posterior:
    r"""A posterior for ``model`` in one call: the cheapest answer that passes its checks.

    Runs the route of this module's docstring, stopping at the first stage whose draws pass
    their check, and says in ``Posterior.route`` what ran, how long each stage took and why
    the next one was needed.

    Arguments:
        model: a Pyro model; ``args`` and ``kwargs`` are its arguments (a keyword that
            collides with one of ``infer``'s goes in ``model_kwargs={...}``).
        num_samples: draws returned (NeuTra's chains end equally long, so up to 15 more;
            chains whose bulk ESS falls short of 400 run on, up to 4x, keeping every draw).
        guide: an ``AutoFlowGuide`` to use (default: ``AutoFlowGuide(model, flow=JOINT_FLOW)``,
            the default flow with a sinh-arcsinh layer first, for skewed and heavy-tailed
            marginals); it is fitted in place, so a fitted one continues from where it is.
        seed: seeds Pyro's random state first, for a reproducible answer.
        progress: stage lines and ``fit``'s progress display on stderr.
        time_budget: seconds for the whole call; stages that no longer fit are skipped,
            and the best draws so far returned, with a warning that they are approximate.
        stages: the stages allowed, in order (a subset of ``STAGES``).
        min_ess: effective sample size an answer must reach (default:
            ``min(max(num_samples // 4, 400), 2000)``: 400 as for MCMC, more where many
            draws are asked for, since their precision is that of the ESS).

    Returns:
        a ``Posterior``: ``samples``, ``kind``, ``diagnostics``, ``route``, ``guide``,
        ``to_inference_data()``, ``summary()``.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([0.9, 1.4, 0.4, 1.3])
        >>> posterior = infer(model, y, seed=0, progress=False)
        >>> posterior.kind, posterior.route.stages[0].name, posterior.route.stages[0].accepted
        ('resampled', 'laplace', True)
        >>> round(float(posterior.samples["mu"].mean()), 1)  # exact: 4.0 / 4.0001 * 0.999...
        1.0
    """
    kwargs = model_keywords(infer, model, kwargs, model_kwargs)
    check_setting("infer", "num_samples", num_samples, integer=True)
    if time_budget is not None:
        check_setting("infer", "time_budget", time_budget)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"infer: stages must be a non-empty subset of {STAGES}, got {stages!r}")
    given = guide is not None
    if guide is None:
        guide = AutoFlowGuide(model, flow=list(JOINT_FLOW))
    elif not isinstance(guide, AutoFlowGuide):
        raise TypeError(f"infer: guide must be an AutoFlowGuide, got {type(guide).__name__}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    run = _Run(model, guide, args, kwargs, num_samples, progress, time_budget, min_ess, given)
    return run.go([s for s in STAGES if s in stages])


class _Run(ImportanceChecks):
    """The state of one ``infer`` call: clock, route, best answer so far."""

    def __init__(self, model, guide, args, kwargs, num_samples, progress, budget, min_ess, given):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.num_samples = num_samples
        self.progress = progress
        self.start = time.perf_counter()
        self.deadline = None if budget is None else self.start + budget
        self.min_ess = min_ess or min(max(num_samples // 4, MCMC_MIN_ESS), 2000)
        self.route = Route()
        self.best = None  # (rank, Posterior)
        self.check_seconds = 0.0  # cost of the last importance check: reserved at the end
        self.vectorised = None  # whether the model broadcasts over draws (known after setup)
        self.subsampled = ""  # why no draws can be weighed (a subsampled plate), if so
        self.modes = None  # the multi-start search (pyroflows.modes), run once, when needed
        self.missed = []  # modes the last accepted guide did not reach
        self.hierarchy = ((), "")  # plates that can be local latents, or why none
        self.given = given  # whether the user gave the guide (the locals stage makes its own)
        self.per_proposal = {}  # seconds per weighed draw, per guide (id), as last measured
        self.bad_data = set()  # observed sites whose data are not finite (after setup)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        if self.progress:
            print(f"infer: {text}", file=sys.stderr)

    def go(self, names) -> Posterior:
        for index, name in enumerate(names):
            if self.left() <= self.check_seconds:
                self.add(Stage(name, 0.0, "skipped: the time budget is spent"))
                continue
            began = time.perf_counter()
            stage = Stage(name, 0.0, "")
            getattr(self, f"stage_{name}")(stage)
            stage.seconds = time.perf_counter() - began
            if not stage.accepted and index + 1 < len(names):
                stage.outcome += f"; next: {names[index + 1]}"
            self.add(stage)
            if stage.accepted:
                break
        return self.answer()

    def add(self, stage: Stage) -> None:
        self.route.stages.append(stage)
        self.say(str(stage))

    def answer(self) -> Posterior:
        if self.best is None:
            self.setup()
            if self.subsampled:
                self.keep_guide_draws()
            else:
                self.weigh(Stage("guide", 0.0, ""))
        if self.best is None:
            raise NoFiniteWeights(
                "infer: no stage drew anything to which the model gives a finite density; "
                f"the route:\n{self.route}"
            )
        rank, posterior = self.best
        self.route.approximate = rank < 2
        posterior.route = self.route
        if self.route.approximate:
            warnings.warn(
                f"infer: the draws are approximate ({self.route.label}): no stage passed its "
                "check within the allowed stages and time. See posterior.route.",
                stacklevel=3,
            )
        return posterior

    def keep(self, rank: int, posterior: Posterior, label: str) -> None:
        """Keep an answer ranking at least as well as the best so far (later wins ties)."""
        if self.best is None or rank >= self.best[0]:
            self.best = (rank, posterior)
            self.route.label = label

    # ------------------------------------------------------------------------- stages
    def setup(self) -> None:
        self.guide.setup(*self.args, **self.kwargs)
        if self.vectorised is None:
            trace = trace_at_guide_draw(self.model, self.guide, self.args, self.kwargs)
            observed = [(n, s["value"]) for n, s in trace.nodes.items() if s.get("is_observed")]
            self.bad_data = {name for name, value in observed if not torch.isfinite(value).all()}
            self.subsampled = subsampled_plate(trace)
            self.hierarchy = hierarchy_plates(trace)
            args = (self.model, self.guide, self.args, self.kwargs)
            self.vectorised = not self.subsampled and runs_vectorised(*args, num=PARTICLES)

    def without_weights(self) -> str:
        """Why the stages working through the flow's one vector cannot run, or ``""``."""
        if self.subsampled or self.guide.local_sites:
            local = f"local latents ({', '.join(self.guide.local_sites)}) outside the flow"
            return f"skipped: {self.subsampled or local}"
        return ""

    def without_locals(self) -> str:
        if self.given:
            return "a guide was given: infer fits that one"
        if self.subsampled:  # (fit's guide already has local latents there)
            return f"{self.subsampled}; the fit stage's guide has its local latents"
        if self.guide.local_sites:
            return "the guide has local latents already"
        return "the model does not broadcast over draws"

    def stage_laplace(self, stage: Stage) -> None:
        self.setup()
        if not self.guide.laplace_proposal:  # (a start far better than the prior's, or none)
            stage.outcome = f"skipped: {self.guide.start_description}"
            return
        self.weigh(stage)

    def stage_locals(self, stage: Stage) -> None:
        self.setup()
        plates, why = self.hierarchy
        if self.given or self.guide.local_sites or self.subsampled or not self.vectorised:
            plates, why = (), self.without_locals()
        if not plates:
            stage.outcome = f"skipped: {why}"
            return
        # From the joint guide's Laplace start, if any (rats: from the prior's, it diverged)
        init = init_to_value(values=self.guide.centre()) if self.guide.preconditioned else None
        local = AutoFlowGuide(self.model, local_plates=list(plates), init_loc_fn=init)
        local.setup(*self.args, **self.kwargs)
        _, why = observation_owners(self.model, local, self.args, self.kwargs)
        joint, self.guide = self.guide, local
        if not why:  # a first small weighing: a model whose broadcasting the member weighing
            try:  # refuses is refused here, naming the site (not later, out of memory)
                self.resample(CALIBRATION_PROPOSALS, adapt=False)
            except (MembersNotSeparable, NoFiniteWeights) as error:  # it names the site, or
                why = str(error)  # says that the untrained guide draws nothing to weigh
        if why:
            stage.outcome, self.guide = f"skipped: {why}", joint
            return
        try:
            settings = dict(check_every=LOCALS_CHECK_EVERY, until_accepted=True)
            settings.update(loss="elbo", num_steps=FIT_STEPS)
            self.train(stage, f"local_plates={list(plates)}, ", **settings)
        except MembersNotSeparable as error:  # at the trained guide (which training may have
            stage.outcome += str(error)  # left far out) the owner map came out wrong
        if not stage.accepted:  # the later stages use the joint flow
            self.guide = joint

    def stage_fit(self, stage: Stage) -> None:
        self.setup()
        self.train(stage, "", weigh=not self.subsampled, loss="elbo", num_steps=FIT_STEPS)
        if self.subsampled:
            stage.outcome += f"guide draws, no k-hat: {self.subsampled}"
            self.keep_guide_draws()

    def stage_dreg(self, stage: Stage) -> None:
        self.setup()
        if self.without_weights():
            stage.outcome = self.without_weights()
            return
        if not self.vectorised:
            stage.outcome = (
                f"skipped: its {PARTICLES} particles run as one batch, and the model does not "
                f"broadcast over a leading dimension (to have this stage, {NOT_VECTORISED_HINT})"
            )
            return
        loss = "dreg" if invertible(self.guide.flow) else "iwae"
        # trained on until fresh draws pass: a check's pass judged by fresh draws at 0.51
        # sent U1 and U2 to NeuTra's chains (110 and 15 s) where 500 more steps passed
        settings = dict(
            loss=loss, num_particles=PARTICLES, num_steps=DREG_STEPS, until_accepted=True
        )
        self.train(stage, f"{loss} K={PARTICLES}, ", **settings)

    def stage_neutra(self, stage: Stage) -> None:
        self.setup()
        if self.without_weights():
            stage.outcome = self.without_weights()
            return
        if self.missed:  # a chain moves within the flow's one mode: it cannot add them
            stage.outcome = f"skipped: the flow misses {len(self.missed)} mode(s)"
            return
        if self.left() < NEUTRA_MIN_SECONDS:
            stage.outcome = f"skipped: under {NEUTRA_MIN_SECONDS:.0f} s of the time budget left"
            return
        deadline = (
            None if self.deadline is None else self.deadline - 0.02 * (self.deadline - self.start)
        )
        call = (self.model, self.guide, self.args, self.kwargs)
        settings = dict(num_samples=self.num_samples, deadline=deadline, min_ess=MCMC_MIN_ESS)
        if self.vectorised and not cannot_batch(*call):  # batched: many times faster
            try:
                chain = neutra_chains(*call, **settings)
            except NoFiniteStart as error:  # the flow draws too few points the model allows
                stage.outcome = f"not run: {error} (the flow is far from the posterior)"
                return
        else:
            settings.update(target_accept_prob=NEUTRA_TARGET_ACCEPT)
            chain = neutra_chain(*call, warmup_steps=500, **settings)
        ok = stage.accepted = chain.passes(R_HAT_LIMIT, MCMC_MIN_ESS)
        stage.outcome = chain.describe()
        diagnostics = {"r_hat": chain.r_hat, "ess": chain.ess}
        diagnostics["divergences"] = len(chain.divergences)
        sampler = f"{chain.num_chains} HMC chains" if chain.num_chains > 1 else "NUTS"
        label = f"exact MCMC on the flow (NeuTra, {sampler}), R-hat {chain.r_hat:.2f}, "
        label += f"ESS {chain.ess:.0f}"
        samples = dict(chain.samples)
        if self.vectorised:  # as resampled draws have them
            samples.update(self.deterministic_at(chain.samples))
        posterior = self.posterior(samples, "mcmc", diagnostics, chain)
        # An unaccepted chain still beats unaccepted importance draws if it mixed at all.
        usable = math.isfinite(chain.r_hat) and chain.r_hat < 1.1 and chain.ess >= 100
        self.keep(3 if ok else (1 if usable else -1), posterior, label)

    # ------------------------------------------------------------------------- helpers
    def keep_guide_draws(self) -> None:
        """The guide's own draws of every member: where nothing can weigh them."""
        samples = self.guide.sample_posterior(self.num_samples, seed=None)
        label = f"guide draws, unweighed: {self.subsampled}"
        self.keep(0, self.posterior(samples, "guide", {}, None), label)

    def deterministic_at(self, latent: dict) -> dict:
        """The model's deterministic sites at each row of ``latent`` (vectorised)."""
        probe = draw(self.model, self.guide, self.args, self.kwargs, 1)
        values = evaluate_at(self.model, self.args, self.kwargs, probe, latent)["values"]
        return {n: v for n, v in values.items() if probe.sites[n].kind == "deterministic"}

    def posterior(self, samples, kind, diagnostics, source) -> Posterior:
        samples = {k: v.detach() for k, v in samples.items()}
        call = (self.model, self.args, self.kwargs)
        return Posterior(samples, kind, diagnostics, self.route, self.guide, source, *call)
