"""NUTS on the model reparametrised by a fitted flow (NeuTra)."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from .adapters import end_warmup
from .draws import draw, evaluate_at
from .hmc import batched_hmc, finite_starts
from .traced import traced_gradient

__all__ = [
    "CHAINS",
    "HMC_TARGET_ACCEPT",
    "NeutraChain",
    "cannot_batch",
    "flow_energy",
    "neutra",
    "neutra_chain",
    "neutra_chains",
]

CHAINS = 16  # of neutra_chains at most: batched, they cost about one chain's time each step
DRAWS_PER_CHAIN = 250  # at least, while 4+ chains: R-hat - 1 ~ 1 / ESS per chain (RESULTS.md)
# Measured on centred eight schools' fitted flow (16 chains): target 0.9 gave 152 divergences
# and ESS 353 in 10,000 draws, 0.95 gave 35 and ESS 673 for 1.3x the time, 0.99 13 for 5x.
HMC_TARGET_ACCEPT = 0.95


def neutra(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    num_chains: int = 1,
    seed: int | None = None,
    progress: bool = False,
    jit: bool = True,
    **kwargs,
):
    """NUTS on the model reparametrised by the fitted flow (NeuTra, Hoffman et al. 2019).

    The guide maps a standard base distribution to the posterior; if the fit is good, the
    model seen through that map is close to a standard normal, which NUTS samples with long
    steps and shallow trees. Draws are exact (MCMC) whatever the guide's quality; a good
    guide only makes them cheaper. Uses Pyro's ``NeuTraReparam`` (``AutoFlowGuide`` is an
    ``AutoContinuous``); the guide's parameters are frozen while sampling.

    Arguments:
        model, guide, args, kwargs: a model and a fitted ``AutoContinuous`` guide.
        num_samples, warmup_steps, num_chains: NUTS settings (per chain).
        seed: seeds Pyro before sampling.
        progress: Pyro's MCMC progress bar.
        jit: compile the potential with the PyTorch JIT (Pyro's ``jit_compile``); measured on
            centred eight schools it makes NUTS several times faster. Turn it off for a
            model the JIT cannot trace.

    Returns:
        ``arviz.InferenceData`` with ``posterior`` (chains of every latent and
        deterministic site), ``observed_data`` and ``sample_stats`` (divergences,
        tree depth), so R-hat and ESS mean what they do for MCMC.

    References:
        Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan (2019), NeuTra-lizing Bad
        Geometry in Hamiltonian Monte Carlo Using Neural Transport, arXiv:1903.03704.
    """
    _check_guide(guide)
    if seed is not None:
        pyro.set_rng_seed(seed)
    with _frozen(guide):
        reparam = NeuTraReparam(guide)
        reparam_model = poutine.reparam(model, config=lambda _: reparam)
        kernel = NUTS(reparam_model, jit_compile=jit, ignore_jit_warnings=True)
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=num_chains,
            disable_progbar=not progress,
        )
        mcmc.run(*args, **kwargs)
        samples = mcmc.get_samples(group_by_chain=True)
        (shared,) = [v for k, v in samples.items() if k.endswith("_shared_latent")]
        chains, draws_per_chain = shared.shape[:2]
        latent = _to_sites(guide, reparam, shared.reshape(chains * draws_per_chain, -1))
    divergences = mcmc.diagnostics().get("divergences", {})
    divergent = [divergences.get(f"chain {c}", []) for c in range(chains)]
    from .arviz import from_neutra  # ArviZ takes a second to import: only when needed

    return from_neutra(model, guide, args, kwargs, latent, chains, draws_per_chain, divergent)


@dataclass
class NeutraChain:
    """One NeuTra chain: draws of the latent sites and what says how far to trust them.

    Attributes:
        samples: ``{site: (num_draws, *shape)}``.
        num_draws, warmup_steps: draws kept, and warm-up iterations run.
        divergences: indices of divergent transitions among the kept draws (chain after
            chain, as ``samples`` holds them).
        num_chains: chains run (``samples`` holds them one after the other, equally long).
        untraced: why the chains' steps were not traced (``pyroflows.traced``), or ``""``.
        r_hat: the largest split R-hat over the flow's base coordinates.
        ess: the smallest bulk effective sample size over them.
        seconds: wall time of the chain (tracing and compilation included).
        stopped: why the chain ended before ``num_samples`` draws, or ``""``.
    """

    samples: dict = field(repr=False)
    num_draws: int
    warmup_steps: int
    divergences: list
    r_hat: float
    ess: float
    seconds: float
    stopped: str = ""
    num_chains: int = 1
    untraced: str = ""

    def passes(self, r_hat_limit: float = 1.01, min_ess: float = 400) -> bool:
        """Whether the chain can be trusted: split R-hat below ``r_hat_limit``, bulk ESS at
        least ``min_ess``, no divergence, and it ran to the end."""
        good = self.r_hat < r_hat_limit and self.ess >= min_ess
        return good and not self.divergences and not self.stopped

    def describe(self) -> str:
        """One line: draws, warm-up, R-hat, ESS, divergences, and why it stopped early."""
        draws = f"{self.num_draws} draws"
        if self.num_chains > 1:
            draws = f"{self.num_chains} chains x {self.num_draws // self.num_chains} draws"
        return (
            f"{draws} after {self.warmup_steps} warm-up, R-hat "
            f"{self.r_hat:.3f}, ESS {self.ess:.0f}, {len(self.divergences)} divergences"
            + (f"; {self.stopped}" if self.stopped else "")
            + (f"; not traced: {self.untraced}" if self.untraced else "")
        )


def _start_at_a_draw(site):
    """``init_to_sample``, except for a site whose prior cannot be sampled (a flat
    ``ImproperUniform``): the reparametrisation replaces the model's own sites' values by the
    flow's, so there a feasible point serves, and the draws of every other site are unchanged."""
    try:
        return init_to_sample(site)
    except NotImplementedError:
        fn = site["fn"]  # Pyro's init_to_feasible samples too, for the shape
        return torch.distributions.transform_to(fn.support)(torch.zeros(fn.shape()))


def neutra_chain(
    model,
    guide,
    args=(),
    kwargs=None,
    *,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    deadline: float | None = None,
    jit: bool = True,
    target_accept_prob: float = 0.8,
    min_ess: float | None = None,
    max_samples: int | None = None,
) -> NeutraChain:
    """One NeuTra NUTS chain driven step by step, so that it can end at a deadline.

    ``deadline`` is a ``time.perf_counter()`` value: past it, warm-up ends early and the
    chain keeps the draws it has (at least ten are needed for a diagnostic). The chain starts
    at a draw of the flow's base distribution: the fitted guide's own typical set.
    ``target_accept_prob`` is NUTS's (higher: smaller steps, fewer divergences). With
    ``min_ess``, a chain whose bulk ESS falls short of it after ``num_samples`` draws runs on
    (in steps sized by the ESS per draw so far) up to ``max_samples`` draws (default
    ``4 * num_samples``) or the deadline, and keeps every draw.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 2.0))
        >>> guide = AutoFlowGuide(model).setup()   # the Laplace start: exact here
        >>> chain = neutra_chain(model, guide, num_samples=200, warmup_steps=100, jit=False)
        >>> chain.num_draws, chain.samples["x"].shape
        (200, torch.Size([200]))
    """
    _check_guide(guide)
    kwargs = kwargs or {}
    start = time.perf_counter()
    with _frozen(guide):
        reparam = NeuTraReparam(guide)
        reparam_model = poutine.reparam(model, config=lambda _: reparam)
        kernel = NUTS(
            reparam_model,
            jit_compile=jit,
            ignore_jit_warnings=True,
            init_strategy=_start_at_a_draw,
            target_accept_prob=target_accept_prob,
        )
        with warnings.catch_warnings():
            # Pyro's jit_compile calls torch.jit.trace, deprecated in torch 2.13 but working;
            # the user did not call it and cannot act on the warning.
            warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
            kernel.setup(warmup_steps, *args, **kwargs)
        try:
            params = kernel.initial_params
            (name,) = [k for k in params if k.endswith("_shared_latent")]
            warmup, stopped = 0, ""
            while warmup < warmup_steps:
                params = kernel.sample(params)
                warmup += 1
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = f"the time budget ended warm-up after {warmup} iterations"
                    break
            # An adaptation cut short still leaves a valid chain (the kernel stops adapting):
            # skipping the rest of warm-up is honest as long as the diagnostics say so.
            end_warmup(kernel, warmup)
            draws, target = [], num_samples
            limit = max_samples or 4 * num_samples
            while len(draws) < target:
                params = kernel.sample(params)
                draws.append(params[name].detach().clone())
                if deadline is not None and time.perf_counter() > deadline and len(draws) >= 10:
                    stopped = stopped or f"the time budget ended the chain at {len(draws)} draws"
                    break
                if len(draws) == target and min_ess is not None and target < limit:
                    ess = _diagnostics(torch.stack(draws))[1]
                    if ess < min_ess:  # run on, sized by the ESS per draw so far
                        target = min(limit, math.ceil(target * 1.2 * min_ess / max(ess, 1.0)))
            divergences = list(kernel.diagnostics()["divergences"])
        finally:
            kernel.cleanup()
        shared = torch.stack(draws)
        latent = _to_sites(guide, reparam, shared)
    r_hat, ess = _diagnostics(shared)
    seconds = time.perf_counter() - start
    return NeutraChain(latent, len(draws), warmup, divergences, r_hat, ess, seconds, stopped)


def flow_energy(model, guide, args=(), kwargs=None):
    """``z -> -log p(x, T(z)) - log|det dT/dz|`` for rows ``z`` of the fitted guide's base
    space (``(C, D) -> (C,)``): the model seen through the flow, vectorised over the rows
    (the model must broadcast over a leading dimension, as ``draw`` needs)."""
    if not hasattr(guide, "latent_to_sites"):
        raise TypeError(f"flow_energy needs an AutoFlowGuide, got {type(guide).__name__}")
    kwargs = kwargs or {}
    probe = draw(model, guide, args, kwargs, 1)
    why = _unguided(probe)
    if why:
        raise ValueError(f"flow_energy: {why}; neutra_chain (Pyro's NUTS) sums it out")
    transform = guide.get_transform()

    def energy(z):
        u = transform(z)
        values, log_det = guide.latent_to_sites(u, log_det=True)
        # Without validation: a diverging trajectory of one row can underflow a scale to 0,
        # which must make that row's energy infinite (a divergence), not stop every row.
        with pyro.validation_enabled(False):
            log_joint = evaluate_at(model, args, kwargs, probe, values, grad=True)["log_joint"]
        return -(log_joint + log_det + transform.log_abs_det_jacobian(z, u))

    return energy


def cannot_batch(model, guide, args=(), kwargs=None) -> str:
    """Why ``flow_energy`` (and so ``neutra_chains``) cannot serve the model, or ``""``: a
    latent site outside the flow (an enumerated discrete one) would be drawn afresh at each
    evaluation, not summed out."""
    return _unguided(draw(model, guide, args, kwargs or {}, 1))


def _unguided(probe) -> str:
    names = [n for n, info in probe.sites.items() if info.kind == "latent" and not info.in_guide]
    if names:
        return f"site {names[0]!r} is not in the flow (enumerated?): the energy would draw it"
    return ""


def neutra_chains(
    model,
    guide,
    args=(),
    kwargs=None,
    *,
    num_samples: int = 1000,
    num_chains: int | None = None,
    warmup_steps: int = 300,
    deadline: float | None = None,
    target_accept_prob: float = HMC_TARGET_ACCEPT,
    min_ess: float | None = None,
    max_samples: int | None = None,
) -> NeutraChain:
    """NeuTra with ``num_chains`` HMC chains stepped as one batch (``pyroflows.hmc``):
    ``num_samples`` draws in all, R-hat and ESS over the chains. Needs a model that
    broadcasts over a leading dimension (``neutra_chain`` runs Pyro's NUTS, one chain, where
    it does not). By default 4-16 chains of ``DRAWS_PER_CHAIN`` draws or more. ``deadline``,
    ``min_ess`` and ``max_samples`` as in ``neutra_chain``.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 2.0))
        >>> guide = AutoFlowGuide(model).setup()
        >>> run = neutra_chains(model, guide, num_samples=400, num_chains=4, warmup_steps=60)
        >>> run.num_draws, run.samples["x"].shape
        (400, torch.Size([400]))
    """
    _check_guide(guide)
    start = time.perf_counter()
    num_chains = num_chains or min(CHAINS, max(4, num_samples // DRAWS_PER_CHAIN))
    per_chain = math.ceil(num_samples / num_chains)
    limit = math.ceil((max_samples or 4 * num_samples) / num_chains)
    energy = flow_energy(model, guide, args, kwargs)  # runs the guide: before freezing it
    with _frozen(guide):
        init = finite_starts(energy, guide.get_base_dist(), num_chains)
        gradient, untraced = traced_gradient(energy, init)
        settings = dict(target_accept=target_accept_prob, deadline=deadline, gradient=gradient)
        run = batched_hmc(energy, init, per_chain, warmup_steps, **settings)
        warmup, runs = run.warmup, [run]
        r_hat, ess = _diagnostics(run.draws)
        while min_ess is not None and ess < min_ess and not run.stopped:
            drawn = sum(r.draws.shape[1] for r in runs)
            more = min(limit, math.ceil(drawn * 1.2 * min_ess / max(ess, 1.0))) - drawn
            if more <= 0:
                break  # run on, sized by the ESS per draw so far, up to the limit
            settings.update(step_size=run.step_size, inv_metric=run.inv_metric)
            run = batched_hmc(energy, run.draws[:, -1], more, 0, **settings)
            runs.append(run)
            r_hat, ess = _diagnostics(torch.cat([r.draws for r in runs], 1))
        chains = torch.cat([r.draws for r in runs], 1)  # (chain, draw, dim)
        divergent = torch.cat([r.divergent for r in runs], 1).reshape(-1)
        latent = _to_sites(guide, None, chains.reshape(-1, chains.shape[-1]))
    seconds = time.perf_counter() - start
    divergences = divergent.nonzero().flatten().tolist()
    untraced = untraced or (gradient.given_up if gradient else "")
    stats = (warmup, divergences, r_hat, ess, seconds, run.stopped, num_chains, untraced)
    return NeutraChain(latent, chains.numel() // chains.shape[-1], *stats)


def _diagnostics(draws) -> tuple[float, float]:
    """The largest split R-hat and the smallest bulk ESS of draws ``(draw, dim)`` of one
    chain or ``(chain, draw, dim)`` of several."""
    base = draws.double()
    base = base.unsqueeze(0) if base.dim() == 2 else base  # (chain, draw, dim)
    r_hat = float(split_gelman_rubin(base, chain_dim=0, sample_dim=1).max())
    return r_hat, float(effective_sample_size(base, chain_dim=0, sample_dim=1).min())


def _check_guide(guide):
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            f"neutra needs an AutoContinuous guide (e.g. AutoFlowGuide), got {type(guide).__name__}"
        )
    if getattr(guide, "prototype_trace", None) is None:
        raise RuntimeError("neutra: fit the guide first (it has not seen the model)")
    if getattr(guide, "local_sites", ()):
        raise ValueError(
            f"neutra: the guide's local latents ({', '.join(guide.local_sites)}) are drawn per "
            "member outside the flow, and NeuTra runs NUTS through the flow's vector, which "
            "holds only the globals. For NUTS over every latent, fit an AutoFlowGuide "
            "without local_plates on the full data"
        )


@contextmanager
def _frozen(guide):
    """The guide's parameters without gradients while NUTS runs, restored afterwards."""
    grads = {p: p.requires_grad for p in guide.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)


@torch.no_grad()
def _to_sites(guide, reparam, flat):
    """Base-space draws ``(N, dim)`` -> ``{site: (N, *shape)}`` in the model's space."""
    if hasattr(guide, "latent_to_sites"):
        return guide.latent_to_sites(guide.get_transform()(flat))
    nodes = guide.prototype_trace.nodes  # another AutoContinuous: Pyro's map, reshaped
    return {
        n: v.reshape((flat.shape[0], *nodes[n]["value"].shape))
        for n, v in reparam.transform_sample(flat).items()
    }
