r"""L-BFGS with a strong-Wolfe line search, for the Laplace start and the mode search.

The algorithm of ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` (Nocedal & Wright,
*Numerical Optimization*, algorithms 7.4 and 3.5-3.6), on one vector, written here because
building any ``torch.optim`` optimizer imports ``torch._dynamo``: about 1 s of every fresh
process that calls ``infer``, more than the whole Laplace stage of most posteriors
(``benchmarks/results/infer_route.md``, "No torch._dynamo on the way to the draws"). One
difference: a trial step where the function is not finite (a model that returns ``inf``
or ``nan`` far from its mass) counts as too long and the line search shortens it, where
torch's search would carry the ``nan`` into the point.

Example:
    >>> import torch
    >>> def banana(x):  # Rosenbrock's function, minimum 0 at (1, 1)
    ...     return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    >>> minimise(banana, torch.tensor([-1.2, 1.0], dtype=torch.float64)).round(decimals=4)
    tensor([1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["minimise"]

C1, C2 = 1e-4, 0.9  # the strong Wolfe conditions' constants (sufficient decrease, curvature)
LINE_SEARCH_EVALS = 25
LINE_TOLERANCE = 1e-9  # a bracket this short (in the step's largest element) ends the search


def minimise(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    max_iter: int = 150,
    history_size: int = 20,
    tolerance_grad: float = 1e-9,
    tolerance_change: float = 1e-12,
) -> Tensor:
    """A local minimum of the scalar ``fn`` from ``x`` (a 1-D tensor), by L-BFGS: the point
    where the largest gradient element falls to ``tolerance_grad``, a step or a change of
    ``fn`` falls below ``tolerance_change``, or ``max_iter`` iterations (``1.25 max_iter``
    evaluations of ``fn``) have run. Errors raised by ``fn`` propagate."""
    x = x.detach().clone()
    f, g = _value_and_grad(fn, x)
    evals, max_evals = 1, max_iter * 5 // 4
    if not math.isfinite(f) or float(g.abs().max()) <= tolerance_grad:
        return x
    steps, changes, rhos = [], [], []  # the last history_size pairs (s, y) and 1 / (s'y)
    direction, t = -g, min(1.0, 1.0 / float(g.abs().sum()))
    for _ in range(max_iter):
        slope = float(g @ direction)
        if slope > -tolerance_change:  # no descent along it
            break
        line = _LineSearch(fn, x, direction, f, g, slope)
        trial = line.search(t)
        evals += line.evals
        step = trial.t * direction
        x = x + step
        change = trial.grad - g
        curvature = float(change @ step)
        if curvature > 1e-10:
            if len(steps) == history_size:
                del steps[0], changes[0], rhos[0]
            steps.append(step)
            changes.append(change)
            rhos.append(1.0 / curvature)
        previous, f, g = f, trial.value, trial.grad
        if evals >= max_evals or float(g.abs().max()) <= tolerance_grad:
            break
        if float(step.abs().max()) <= tolerance_change or abs(f - previous) < tolerance_change:
            break
        direction, t = -_two_loop(g, steps, changes, rhos), 1.0
    return x


def _two_loop(g: Tensor, steps, changes, rhos) -> Tensor:
    """The inverse-Hessian estimate of L-BFGS times ``g`` (Nocedal & Wright, algorithm 7.4),
    scaled initially by ``s'y / y'y`` of the latest pair."""
    q, alphas = g.clone(), []
    for s, y, rho in zip(reversed(steps), reversed(changes), reversed(rhos), strict=True):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        q *= 1.0 / (rhos[-1] * float(changes[-1] @ changes[-1]))
    for s, y, rho, alpha in zip(steps, changes, rhos, reversed(alphas), strict=True):
        q += (alpha - rho * float(y @ q)) * s
    return q


@dataclass
class _Trial:
    t: float
    value: float
    grad: Tensor
    slope: float


def _value_and_grad(fn, x: Tensor) -> tuple[float, Tensor]:
    x = x.detach().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return float(value.detach()), grad


class _LineSearch:
    """Step lengths along ``direction`` from ``x`` (value ``f0``, gradient ``g0``, slope
    ``slope0``) meeting the strong Wolfe conditions (Nocedal & Wright, algorithms 3.5-3.6)."""

    def __init__(self, fn, x, direction, f0, g0, slope0):
        self.fn, self.x, self.direction = fn, x, direction
        self.start = _Trial(0.0, f0, g0, slope0)
        self.evals = 0

    def at(self, length: float) -> _Trial:
        self.evals += 1
        value, grad = _value_and_grad(self.fn, self.x + length * self.direction)
        return _Trial(length, value, grad, float(grad @ self.direction))

    def too_long(self, trial: _Trial, best: _Trial | None) -> bool:
        """No sufficient decrease (or not below ``best``): the step overshot."""
        start = self.start
        return not (
            math.isfinite(trial.value)
            and trial.value <= start.value + C1 * trial.t * start.slope
            and (best is None or trial.value < best.value)
        )

    def flat(self, trial: _Trial) -> bool:  # the strong curvature condition
        return abs(trial.slope) <= -C2 * self.start.slope

    def search(self, t: float) -> _Trial:
        """A step meeting both conditions, or the best sufficient-decrease point found
        within ``LINE_SEARCH_EVALS`` evaluations (the start itself if none)."""
        previous, trial = self.start, self.at(t)
        while True:  # longer steps until the minimum along the line is bracketed
            if self.too_long(trial, previous if previous.t else None):
                low, high = previous, trial
                break
            if self.flat(trial) or self.evals >= LINE_SEARCH_EVALS:
                return trial
            if trial.slope >= 0:
                low, high = trial, previous
                break
            bounds = (trial.t + 0.01 * (trial.t - previous.t), 10 * trial.t)
            previous, trial = trial, self.at(_cubic_minimum(previous, trial, *bounds))
        return self.zoom(low, high)

    def zoom(self, low: _Trial, high: _Trial) -> _Trial:
        """Shrink ``[low, high]``: ``low`` has sufficient decrease and the lowest value."""
        scale = float(self.direction.abs().max())
        hugged = False  # whether the last trial sat within a tenth of the bracket's end
        while self.evals < LINE_SEARCH_EVALS and abs(high.t - low.t) * scale >= LINE_TOLERANCE:
            lo, hi = sorted((low.t, high.t))
            length, margin = _cubic_minimum(low, high, lo, hi), 0.1 * (hi - lo)
            # An interpolant's minimum may hug an end of the bracket once (near a minimum
            # it rightly does: the bracket then collapses); twice running, or at the end
            # itself, the trial moves a tenth of the bracket inwards.
            near_end = min(hi - length, length - lo) < margin
            if near_end and (hugged or length in (lo, hi)):
                length = hi - margin if hi - length < length - lo else lo + margin
                near_end = False
            hugged = near_end
            trial = self.at(length)
            if self.too_long(trial, low):
                high = trial
                continue
            if self.flat(trial):
                return trial
            if trial.slope * (high.t - low.t) >= 0:
                high = low
            low = trial
        return low  # (the start itself where no step improved on it)


def _cubic_minimum(a: _Trial, b: _Trial, lo: float, hi: float) -> float:
    """The minimiser within ``[lo, hi]`` of the cubic through the values and slopes of ``a``
    and ``b`` (Nocedal & Wright, eq. 3.59); the middle where it has none or a value is not
    finite."""
    if not (math.isfinite(a.value) and math.isfinite(b.value)) or a.t == b.t:
        return 0.5 * (lo + hi)
    d1 = a.slope + b.slope - 3 * (a.value - b.value) / (a.t - b.t)
    square = d1 * d1 - a.slope * b.slope
    if square < 0:
        return 0.5 * (lo + hi)
    d2 = math.copysign(math.sqrt(square), b.t - a.t)
    denominator = b.slope - a.slope + 2 * d2
    if denominator == 0:
        return 0.5 * (lo + hi)
    t = b.t - (b.t - a.t) * (b.slope + d2 - d1) / denominator
    return min(max(t, lo), hi) if math.isfinite(t) else 0.5 * (lo + hi)
