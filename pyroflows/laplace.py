r"""The Laplace start: a mode, a preconditioner, and whether to trust them, from an energy.

``laplace_start(energy, init)`` minimises ``energy(u)`` (the negative unnormalised log
posterior in an unconstrained space) with L-BFGS from ``init``, finishes with damped Newton
steps in float64, and takes the Laplace approximation ``N(mode, H^{-1})`` there. It is
accepted only at a real mode (small Newton decrement) with a positive-definite Hessian, and
where it is a sound proposal for the posterior (PSIS k-hat < 0.7, or a log-weight spread
under 1 nat, on a few draws) or at least a far better start than the prior's (by ELBO).
Otherwise the result says why not, and the caller starts elsewhere.

Why (``benchmarks/RESULTS.md``): Adam's steps of about ``lr`` in absolute units cannot
resolve posteriors whose sds are 1e-3 of the prior's or whose parameters are correlated at
0.9999; started and preconditioned at the Laplace approximation, the guide works in
whitened units. Funnels have no useful mode, and the check rejects them.

Example:
    >>> cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    >>> target = torch.distributions.MultivariateNormal(
    ...     torch.tensor([1.0, -2.0], dtype=torch.float64), cov)
    >>> start = laplace_start(lambda u: -target.log_prob(u), torch.zeros(2, dtype=torch.float64))
    >>> start.ok, torch.allclose(start.mode, target.mean, atol=1e-5)
    (True, True)
    >>> torch.allclose(start.precond @ start.precond.T, target.covariance_matrix, atol=1e-5)
    True
"""

from __future__ import annotations

import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from torch import Tensor

from .lbfgs import minimise
from .psis import psis

__all__ = [
    "START_MARGIN",
    "LaplaceStart",
    "descend",
    "describe_error",
    "find_mode",
    "laplace_start",
    "newton_step",
]

LAPLACE_LIMIT = 200  # the Hessian costs D backward passes: no Laplace start above this
NEWTON_STEPS = 5  # after L-BFGS, to reach the mode on badly conditioned posteriors
LAPLACE_CHECK_DRAWS = 200  # draws for the k-hat check of the approximation
START_MARGIN = 100.0  # nats by which a start must beat the prior's to replace it
PRIOR_ELBO_DRAWS = 50  # the prior start's ELBO, against that margin: a coarse comparison

Energy = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LaplaceStart:
    """A Laplace start (``mode``, ``precond`` = chol(H^-1)), or ``reason`` why there is none.

    ``proposal``: whether ``N(mode, precond precond^T)`` is itself a sound proposal for the
    posterior (PSIS k-hat < 0.7 on 200 draws); a start that is not is still far better than
    the prior's (by ``START_MARGIN`` nats of ELBO or more), and ``reason`` says so."""

    mode: Tensor | None = None
    precond: Tensor | None = None
    reason: str = ""
    proposal: bool = False

    @property
    def ok(self) -> bool:
        return self.mode is not None


def laplace_start(
    energy: Energy, init: Tensor, init_scale: float = 0.1, search_from: Tensor | None = None
) -> LaplaceStart:
    """The Laplace approximation of ``exp(-energy)`` near ``init``, if it is a sound start.

    It is one where it is a sound proposal (PSIS k-hat < 0.7 on 200 draws), or where its
    ELBO beats that of the prior start ``N(init, init_scale^2 I)`` by over ``START_MARGIN``
    nats: a hierarchy whose members' spread follows a scale (rats, posteriordb: k-hat 1.1 in
    65 dimensions, but the prior start 4.7e6 nats lower) then starts at its mode, while a
    funnel's mode, far from all its mass, does not. ``search_from``: where the search
    starts (default ``init``; ``pyroflows.noncentred`` gives a better one for centred
    hierarchies).

    The result has the dtype of ``init``. The search runs in float64, because the curvature
    of a badly conditioned posterior (condition numbers of 1e10 and more) is lost in float32
    rounding, unless the model cannot take float64 values (``X @ beta`` with float32 ``X``
    does not promote): then it runs in ``init``'s dtype. A rejection's ``reason`` names the
    error and the line of the model that raised it.
    """
    if len(init) > LAPLACE_LIMIT:
        return LaplaceStart(reason=f"{len(init)} latent dimensions (the limit is {LAPLACE_LIMIT})")
    found = find_mode(energy, init if search_from is None else search_from.to(init))
    if isinstance(found, str):
        return LaplaceStart(reason=found)
    mode, precond = found
    log_w = _log_weights(energy, mode, precond, LAPLACE_CHECK_DRAWS)
    if _fits(log_w):
        return LaplaceStart(mode.to(init.dtype), precond.to(init.dtype), proposal=True)
    poor = "the Laplace approximation is a poor proposal (PSIS k-hat)"
    prior_scale = torch.full_like(mode, init_scale).diag()
    with torch.random.fork_rng(devices=[]):  # (a model's run can draw): the caller's stream
        prior_log_w = _log_weights(energy, init.to(mode), prior_scale, PRIOR_ELBO_DRAWS)
    gain = _elbo(log_w, precond) - _elbo(prior_log_w, prior_scale)
    if not gain > START_MARGIN:
        return LaplaceStart(reason=poor)
    reason = f"{poor}, but a better start than the prior's by {gain:.3g} nats of ELBO"
    return LaplaceStart(mode.to(init.dtype), precond.to(init.dtype), reason)


def find_mode(energy: Energy, init: Tensor) -> tuple[Tensor, Tensor] | str:
    """The mode of ``exp(-energy)`` that a local search from ``init`` reaches and
    ``chol(H^-1)`` there, both in the search's dtype (float64 where the model takes it),
    or a string saying why there is none."""
    mode = descend(energy, init)
    if isinstance(mode, str):
        return mode
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a search towards no mode warns of NaN
            # L-BFGS stalls on badly conditioned posteriors (e.g. a regression on an
            # uncentred covariate); Newton steps are affine invariant and finish the job.
            for _ in range(NEWTON_STEPS):
                mode, _, chol_h, decrement = newton_step(energy, mode)
                if not decrement > 1e-6:
                    break
            if not (torch.isfinite(mode).all() and torch.isfinite(chol_h).all()):
                return "the search reached no finite mode"
            # A mode, not a point where the search gave up: the Newton decrement g' H^-1 g
            # (the predicted gain of one more Newton step, in nats) must be small.
            if not decrement < 1e-2:
                return f"no mode found (Newton decrement {decrement:.3g})"
            precond = torch.linalg.cholesky(torch.cholesky_inverse(chol_h))
    except torch.linalg.LinAlgError:  # (torch names its class _LinAlgError: no use to a user)
        return "the search ended where the Hessian is not positive definite (a saddle or a ridge)"
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as error:  # no density
        return f"the search failed: {describe_error(error)}"
    if not torch.isfinite(precond).all():
        return "the Hessian at the mode is singular"
    return mode.detach(), precond


def descend(energy: Energy, init: Tensor) -> Tensor | str:
    """L-BFGS on ``energy`` from ``init`` (float64 where the model takes it): the point it
    ends at, or a string saying why the search failed. ``find_mode`` finishes from there."""
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a search towards no mode warns of NaN
            point = minimise(energy, init.detach().to(_search_dtype(energy, init)))
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as error:
        return f"the search failed: {describe_error(error)}"
    if not torch.isfinite(point).all():
        return "the search reached no finite mode"
    return point


def _search_dtype(energy: Energy, init: Tensor) -> torch.dtype:
    """float64 where the model takes it, else the start's own dtype."""
    if init.dtype == torch.float64:
        return torch.float64
    try:
        with torch.no_grad():
            energy(init.detach().double())
    except (RuntimeError, TypeError):  # a dtype clash in the model; any other fault recurs
        return init.dtype
    return torch.float64


def describe_error(error: BaseException) -> str:
    """``"Type: first line (at file:line)"``, the line being the innermost one outside
    torch, Pyro and pyroflows: the user's code that raised, not the library's."""
    libraries = tuple(os.path.dirname(m.__file__) for m in (torch, pyro, sys.modules["pyroflows"]))
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith(libraries):
            where = f" (at {frame.filename}:{frame.lineno}: {frame.line})"
            break
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}{where}"


def newton_step(energy: Energy, u: Tensor):
    """One damped Newton step on ``energy`` from ``u``: ``(u', grad, chol(H), decrement)``.

    The gradient, Cholesky factor and decrement returned are those at the *returned* point.
    Raises ``RuntimeError`` where the Hessian is not positive definite.
    """

    def derivatives(point):
        point = point.detach().requires_grad_(True)
        value = energy(point)
        (grad,) = torch.autograd.grad(value, point)
        hessian = torch.autograd.functional.hessian(energy, point.detach())
        chol = torch.linalg.cholesky(0.5 * (hessian + hessian.T))
        step = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        return value.detach(), grad, chol, step, grad @ step

    value, grad, chol, step, decrement = derivatives(u)
    if not decrement > 1e-6:
        return u, grad, chol, decrement
    for damping in (1.0, 0.5, 0.25, 0.125):
        candidate = u - damping * step
        with torch.no_grad():
            new_value = energy(candidate)
        if torch.isfinite(new_value) and new_value <= value:
            _, grad, chol, _, decrement = derivatives(candidate)
            return candidate, grad, chol, decrement
    return u, grad, chol, decrement


def _elbo(log_w: Tensor, chol: Tensor) -> float:
    """The ELBO of ``N(mean, chol chol^T)`` from ``_log_weights`` of its draws (``-inf``
    where a draw has no density)."""
    entropy = chol.diagonal().log().sum() + 0.5 * len(chol) * (1.0 + math.log(2 * math.pi))
    return float(log_w.nan_to_num(nan=-math.inf).mean() + entropy)


def _log_weights(energy: Energy, mean: Tensor, chol: Tensor, num: int) -> Tensor:
    """``-energy(u) + 0.5 |e|^2`` at ``u = mean + chol e`` for ``num`` fixed draws ``e``."""
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(num, len(mean), generator=generator, dtype=mean.dtype)
    log_w = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in eps:
            try:
                log_w.append(-energy(mean + chol @ e) + 0.5 * (e @ e))
            except ValueError:  # the model refuses the draw (a scale that underflowed to 0):
                log_w.append(torch.tensor(-math.inf, dtype=mean.dtype))  # no density there
    return torch.stack(log_w)


def _fits(log_w: Tensor) -> bool:
    """Whether a Laplace approximation whose draws have these ``_log_weights`` is a sound
    proposal. A mode can exist where it is useless: Neal's funnel has its mode at v = -40.5
    (with the Jacobian), far from all its mass, and PSIS k-hat shows it."""
    if not torch.isfinite(log_w).any():
        return False
    # With 200 draws k-hat is noisy near 0.7; a small spread of the log weights (the
    # Laplace approximation within about a nat of the posterior everywhere it draws)
    # is accepted as well.
    finite = log_w[torch.isfinite(log_w)]
    return bool(psis(log_w)[1] < 0.7 or (len(finite) == len(log_w) and finite.std() < 1.0))
