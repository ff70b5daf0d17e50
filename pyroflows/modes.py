r"""Modes a guide never draws from: found by a multi-start search, covered by a mixture.

Importance weights correct a guide only where it draws. A flow fitted by the ELBO (mode
seeking) to one of two separated modes gives weights that look healthy (PSIS k-hat 0.24 on
the two-mode ring U1) and draws that miss half the posterior. No diagnostic computed from
those draws can see it; a search can. ``search_modes`` runs local searches (L-BFGS then
Newton, as the Laplace start does) from over-dispersed starts and keeps the distinct modes
reached, each with its Laplace mass. ``ModeSearch.missed`` names those that hold a
non-negligible mass yet get far fewer of the guide's draws than that mass asks for;
``mixture_resample`` then draws from the guide (made defensive: ``pyroflows.proposal``)
mixed with a Gaussian at each of them and resamples by PSIS, whose weights give each mode
its share and whose k-hat judges the mixture.

What it cannot see: a mode that no search reaches (starts are few, and in many dimensions
basins are many). A lobe of one mode that the guide misses without a mode of its own (U4's
second ridge) is left to the defensive proposal's heavy-tailed half.

Example:
    >>> import torch
    >>> def energy(u):  # two unit modes at +-3, the guide below sits on the right one
    ...     return -torch.logsumexp(torch.stack([-0.5 * ((u - 3) ** 2).sum(),
    ...                                          -0.5 * ((u + 3) ** 2).sum()]), 0)
    >>> guide_draws = 3.0 + torch.randn(1000, 1, dtype=torch.float64)
    >>> found = search_modes(energy, guide_draws, seed=0)
    >>> missed = found.missed(guide_draws, log_evidence=0.92)
    >>> len(missed), round(float(missed[0].point[0]), 2)
    (1, -3.0)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .diagnostics import ImportanceResample
from .laplace import LAPLACE_LIMIT, descend, find_mode
from .proposal import defensive_draws
from .psis import PSISResult
from .sites import enumerated

__all__ = ["Mode", "ModeCheck", "ModeSearch", "check_modes", "mixture_resample", "search_modes"]

SEARCH_STARTS = 10  # 4 over-dispersed guide draws, 2 guide draws reflected, 4 uniform
OVERDISPERSION = 3.0  # the guide's draws spread this much about their mean, as starts
MIN_MASS = 0.01  # a missed mode with under 1% of the mass the guide covers is ignored
REACH = 0.1  # a guide reaches a mode with at least this fraction of the mode's mass share
WIDEN = 1.5  # a missed mode's mixture component: its Laplace sds times this (RESULTS.md)
MAX_PROPOSALS = 40_000  # an answer whose ESS falls short is drawn again, up to this many


@dataclass(frozen=True)
class Mode:
    """A local mode of the posterior in the guide's unconstrained space, with its Laplace
    approximation ``N(point, precond precond^T)`` and that approximation's mass."""

    point: Tensor
    precond: Tensor
    log_mass: float

    def distance(self, u: Tensor) -> Tensor:
        """The Mahalanobis distance of each row of ``u`` from this mode, in its metric."""
        diff = (u.to(self.point) - self.point).T
        return torch.linalg.solve_triangular(self.precond, diff, upper=False).norm(dim=0)

    def log_prob(self, u: Tensor) -> Tensor:
        """The Laplace approximation's log density at each row of ``u``."""
        d = len(self.point)
        half_log_det = self.precond.diagonal().log().sum()
        return -0.5 * self.distance(u).square() - 0.5 * d * math.log(2 * math.pi) - half_log_det


@dataclass
class ModeSearch:
    """The distinct modes a multi-start search reached (``found``), with how many searches
    ran and how many reached no mode (a funnel's neck, a boundary)."""

    found: list[Mode]
    starts: int
    failed: int
    seconds: float
    reasons: list[str] = field(default_factory=list)

    def missed(self, guide_draws: Tensor, log_evidence: float) -> list[Mode]:
        """The found modes that the guide does not reach, yet whose Laplace mass is at least
        ``MIN_MASS`` of ``exp(log_evidence)`` (the mass the guide's weights cover). A mode is
        reached when the share of ``guide_draws`` (unconstrained) that fall where its own
        Laplace draws do (within their 0.95 quantile of distance) is at least a tenth of its
        share of the mass: a guide that only touches a mode with its tail cannot give it its
        weight (on U1 a guide that put 3% of its draws on a mode holding half the mass had
        PSIS k-hat 0.45 and means 0.96 sd off)."""
        out = []
        for mode in self.found:
            d = len(mode.point)
            radius = math.sqrt(d + 2 * math.sqrt(2 * d))  # about the 0.95 chi quantile
            share = float((mode.distance(guide_draws) <= radius).double().mean())
            ratio = math.exp(min(mode.log_mass - log_evidence, 0.0))
            if ratio >= MIN_MASS and share < REACH * 0.95 * ratio:
                out.append(mode)
        return out

    def describe(self) -> str:
        if not self.starts:
            return f"no mode search: {self.reasons[0]}"
        capped = [r for r in self.reasons if r.endswith("the time allowed")]
        return (
            f"{self.starts} searches from over-dispersed starts reached {len(self.found)} "
            f"distinct mode{'s' * (len(self.found) != 1)}"
            + (f" ({self.failed} reached none)" if self.failed else "")
            + (f" ({capped[0]})" if capped else "")
        )


def search_modes(
    energy, guide_draws: Tensor, starts: int = SEARCH_STARTS, seed=None, seconds: float = math.inf
) -> ModeSearch:
    """Local searches for the modes of ``exp(-energy)`` (``energy`` over one unconstrained
    vector, as ``AutoFlowGuide.energy`` returns) from ``starts`` over-dispersed points of
    three kinds, taken in turn: two fifths are the guide's draws (rows of ``guide_draws``)
    spread ``OVERDISPERSION`` times about their mean; a fifth are such draws reflected
    through the origin (``-u``: where a sign symmetry puts the mirror of the guide's mode);
    the rest are uniform on ``(-2, 2)`` in every coordinate (Stan's initialisation), in
    antithetic pairs. No search starts after ``seconds``. Modes within 2 Laplace sds of one
    another count once."""
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    draws = guide_draws.detach()
    dim = draws.shape[-1]
    if dim > LAPLACE_LIMIT:
        reason = f"{dim} latent dimensions (the search's limit is {LAPLACE_LIMIT})"
        return ModeSearch([], 0, 0, time.perf_counter() - began, [reason])
    spread = (2 * starts + 4) // 5
    picked = draws[torch.randint(len(draws), (spread,), generator=generator)]
    centre = draws.mean(0)
    # Sign symmetries are the commonest source of separate modes (a factor's sign, mirrored
    # lobes): the guide's draws reflected land on the mirror mode when there is one, and
    # uniform starts in antithetic pairs (v, -v) cannot leave a half-space unsearched.
    reflected = -picked[: starts // 5]
    num_uniform = starts - spread - len(reflected)
    half = 4 * torch.rand((num_uniform + 1) // 2, dim, generator=generator) - 2
    uniform = torch.stack([half, -half], 1).reshape(-1, dim)[:num_uniform].to(draws)
    # Searched in the guide's whitened coordinates (u = centre + L w): a badly conditioned
    # posterior (diamonds) then takes L-BFGS a few iterations, not its whole budget.
    whiten = _whitening(draws)

    def whitened(w):
        return energy(centre.to(w) + whiten.to(w) @ w)

    found, reasons, ran = [], [], 0
    spread_out = centre + OVERDISPERSION * (picked - centre)
    kinds = [list(spread_out), list(reflected), list(uniform)]
    in_turn = [kind[i] for i in range(max(map(len, kinds))) for kind in kinds if i < len(kind)]
    for start in in_turn:
        if time.perf_counter() - began > seconds:
            reasons.append(f"{starts - ran} searches not started: the time allowed")
            break
        ran += 1
        w = torch.linalg.solve_triangular(whiten, (start - centre)[:, None], upper=False)[:, 0]
        descended = descend(whitened, w)
        if isinstance(descended, str):
            reasons.append(descended)
            continue
        point = centre.to(descended) + whiten.to(descended) @ descended
        if any(m.distance(point[None])[0] < 2 for m in found):
            continue  # a basin already found: spare the Newton steps and their Hessians
        result = find_mode(whitened, descended)
        if isinstance(result, str):
            reasons.append(result)
            continue
        point = centre.to(result[0]) + whiten.to(result[0]) @ result[0]
        precond = whiten.to(result[1]) @ result[1]
        with torch.no_grad():
            log_p = -float(energy(point))
        log_mass = log_p + 0.5 * dim * math.log(2 * math.pi) + float(precond.diagonal().log().sum())
        mode = Mode(point, precond, log_mass)
        same = (
            m.distance(point[None])[0] < 2 or mode.distance(m.point[None])[0] < 2 for m in found
        )
        if math.isfinite(log_mass) and not any(same):
            found.append(mode)
    failed = len(reasons) - (ran < starts)
    return ModeSearch(found, ran, failed, time.perf_counter() - began, reasons)


def _whitening(draws: Tensor) -> Tensor:
    """The Cholesky factor of the draws' covariance (float64), or the identity if singular."""
    cov = torch.cov(draws.double().T).reshape(draws.shape[-1], draws.shape[-1])
    chol, info = torch.linalg.cholesky_ex(cov)
    if info == 0 and torch.isfinite(chol).all():
        return chol
    return torch.eye(len(cov), dtype=torch.float64, device=draws.device)


@torch.no_grad()
def mixture_resample(
    model, guide, args, kwargs, modes, log_evidence: float, num_samples: int, num_draws: int
) -> ImportanceResample:
    """PSIS-resampled draws from the guide's defensive mixture (``pyroflows.proposal``)
    joined by the Laplace approximation of each of ``modes`` (which the guide misses), its sds
    ``WIDEN`` times wider, weighed against the model.

    Each mode draws a share of the ``num_samples`` proposals in proportion to its Laplace
    mass against the guide's ``exp(log_evidence)``; scoring the modes' draws under the guide
    needs the flow's inverse (``guide.flow_is_invertible``).
    """
    widened = [Mode(m.point, WIDEN * m.precond, m.log_mass) for m in modes]
    proposals = defensive_draws(model, guide, args, kwargs, num_samples, widened, log_evidence)
    result = PSISResult.from_log_weights(proposals.log_weights)
    index = torch.multinomial(result.log_weights.exp(), num_draws, replacement=True)
    samples = {name: value[index] for name, value in proposals.values.items()}
    return ImportanceResample(samples, result, 0, proposals, index)


@dataclass
class ModeCheck:
    """What ``check_modes`` found: the ``search`` (reusable for a later check of the same
    posterior), the modes the guide ``missed``, the ``mixture`` answer that adds them (or
    ``None``, with ``why_not``), and a line for a report."""

    search: ModeSearch
    missed: list[Mode]
    mixture: ImportanceResample | None
    why_not: str
    words: str


def check_modes(
    model,
    guide,
    args,
    kwargs,
    answer: ImportanceResample,
    num_draws: int,
    search: ModeSearch | None = None,
    vectorised: bool = True,
    seconds: float = math.inf,
    min_ess: int = 0,
) -> ModeCheck:
    """Whether the proposal behind an importance-resampled ``answer`` (``guide``'s draws)
    misses modes a multi-start search finds (``search``, if given, is reused; a new one
    starts no search after ``seconds``); if it does, the answer with them added
    (``mixture_resample``) where that can be computed, from as many proposals as the
    answer's, or more (up to ``MAX_PROPOSALS``) where their ESS falls short of ``min_ess``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide, importance_resample
        >>> def model():  # equal modes at -3 and 3; the guide starts on the right one
        ...     x = pyro.sample("x", dist.Normal(0.0, 10.0))
        ...     modes = torch.stack([-0.5 * (x - 3) ** 2, -0.5 * (x + 3) ** 2])
        ...     pyro.factor("two_modes", torch.logsumexp(modes, 0))
        >>> guide = AutoFlowGuide(model, init_loc_fn=lambda site: torch.tensor(3.0), init_scale=1.0)
        >>> answer = importance_resample(model, guide, num_samples=2000, seed=0)
        >>> check = check_modes(model, guide, (), {}, answer, 2000)
        >>> len(check.missed), round(float((check.mixture.samples["x"] < 0).double().mean()), 1)
        (1, 0.5)
    """
    why = None
    if any(enumerated(site) for site in guide.prototype_trace.nodes.values()):
        why = "the model has enumerated discrete sites"
    elif getattr(guide, "local_sites", ()):
        why = "local latents: the search runs in the flow's vector, which holds the globals"
    if why:
        search = ModeSearch([], 0, 0, 0.0, [why])
        return ModeCheck(search, [], None, "", search.describe())
    with torch.no_grad():
        u = guide.get_posterior().sample((answer.draws.num_samples,))
    log_w = answer.draws.log_weights.double()
    log_evidence = float(torch.logsumexp(log_w, 0)) - math.log(len(log_w))
    if search is None:
        seed = int(torch.randint(2**31, ()))  # from Pyro's seeded state: reproducible
        search = search_modes(guide.energy(*args, **kwargs), u, seed=seed, seconds=seconds)
    missed = search.missed(u, log_evidence)
    words = search.describe()
    if not missed:
        return ModeCheck(search, [], None, "", words)
    words += f", {len(missed)} outside the guide's draws"
    why_not = ""
    if not vectorised:
        why_not = "no mixture proposal: it needs a model that broadcasts over draws"
    elif not guide.flow_is_invertible:
        why_not = "no mixture proposal: it needs a flow with an inverse"
    if why_not:
        return ModeCheck(search, missed, None, why_not, f"{words} ({why_not})")
    call = (model, guide, args, kwargs, missed, log_evidence)
    proposals = answer.draws.num_samples
    mixture = mixture_resample(*call, proposals, num_draws)
    d = mixture.diagnostic
    if d.ess < min_ess and proposals < MAX_PROPOSALS:  # as the guide's own weighing does
        proposals = min(MAX_PROPOSALS, math.ceil(proposals * 1.2 * min_ess / max(d.ess, 1)))
        mixture = mixture_resample(*call, proposals, num_draws)
        d = mixture.diagnostic
    words += (
        f"; the guide mixed with their Laplace approximations: PSIS k-hat {d.k_hat:.2f}, "
        f"ESS {d.ess:.0f}"
    )
    return ModeCheck(search, missed, mixture, "", words)
