"""One guarded SVI step: parameters traced as ``SVI.step`` does, a NaN guard, the update.

The update is one ``pyroflows.adam.Adam`` over all dense parameters (torch's fused kernels
where it has them; ``RowAdam`` for per-member rows) unless an ``optim=`` is given: Pyro's
optimizers keep one optimizer per tensor. After the update, the parameters are checked too
(and the update undone if one became non-finite) unless ``NormBound`` shows it cannot have
overflowed. Before any update the loss and every gradient are checked; a non-finite one
raises ``FitError`` naming the step and, where it can be found, the site or parameter, and
nothing is updated. The gradients come from Pyro (``SVI.step``'s way) or from ``fit``'s
compiled step (``pyroflows.compiled``).
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine

from . import distributed as dist_
from .adam import Adam, RowAdam
from .adapters import guide_model_wrapped
from .draws import NOT_VECTORISED_HINT, is_shape_error
from .progress import FitError

__all__ = ["GuardedStep", "NormBound", "NotBroadcast", "nonfinite_site"]


class NotBroadcast(ValueError):
    """The model does not broadcast over a batch of particles (a plate left of its own)."""


class GuardedStep:
    """One SVI step: parameters traced as ``SVI.step`` does, then a guarded update."""

    def __init__(self, optim, lr, clip, distributed=False):
        self.optim = optim
        self.clip = clip
        self.distributed = distributed
        self.synced: set[int] = set()
        self.dense_optim: Adam | None = None
        self.sparse_optim: RowAdam | None = None
        self.known: set[int] = set()
        self.adam_steps: dict[int, int] = {}  # Adam's step count of each dense parameter
        self.names: dict[int, str] = {}
        self.bound = NormBound()

    def step(self, elbo, model, guide, args, kwargs, lr, step, compiled=None):
        """One guarded step; its gradients from ``compiled`` (a ``CompiledStep``) if given,
        else from ``elbo`` through Pyro. Everything after the gradients is the same."""
        if compiled is not None:
            value, params = compiled.loss_and_grads()
        else:
            value, params = self._general(elbo, model, guide, args, kwargs, step)
        if self.distributed:
            value = self._synchronise(params, value)
        for param in params:  # once, here: the guard, the undo and the update read it
            if param.grad is not None and param.grad.is_sparse:
                param.grad = param.grad.coalesce()
        try:
            self._check(float(value), params, model, guide, args, kwargs, step)
            # A copy to undo a non-finite update, unless Adam's bounded steps cannot overflow.
            guarded = self.optim is not None or not self.bound.allows(params, lr)
            before = _touched(params) if guarded else {}
            if self.optim is not None:
                self.optim(list(params))
            else:
                self._torch_step(params, lr)
            if guarded:
                self._check_update(params, before, lr, step)
                self.bound.forget()
        finally:
            for param in params:  # as torch's zero_grad(set_to_none=True)
                param.grad = None
        return float(value)

    def _general(self, elbo, model, guide, args, kwargs, step):
        try:
            with poutine.trace(param_only=True) as param_capture:
                value = elbo.loss_and_grads(model, guide, *args, **kwargs)
        except (RuntimeError, ValueError) as error:
            if _batched_particles(elbo) and is_shape_error(error):
                raise NotBroadcast(
                    f"fit: num_particles={elbo.num_particles} draws the particles as one batch "
                    "(a plate left of the model's), and this model does not broadcast over it "
                    f"({NOT_VECTORISED_HINT}; {type(error).__name__}: "
                    f"{str(error).splitlines()[0]}). Or fit with num_particles=1."
                ) from error
            # Pyro's validation refuses a NaN distribution parameter before the loss exists.
            if "invalid values" not in str(error):
                raise
            pyro.infer.util.zero_grads(set(_all_params(guide)))
            site, what = nonfinite_site(model, guide, args, kwargs)
            where = f" at site {site!r}" if site else ""
            raise FitError(
                f"fit: a distribution parameter became NaN or infinite at step {step}{where}"
                f"{_because(what)} (Pyro: {str(error).splitlines()[0]}). The guide keeps the "
                f"parameters of step {step - 1}, the last finite one.",
                step,
                site,
            ) from error
        params = {
            site["value"].unconstrained(): name
            for name, site in param_capture.trace.nodes.items()
            if site["type"] == "param"
        }
        return value, params

    def setup_guide(self, guide, args, kwargs):
        """Create the guide's parameters now and make every rank hold rank 0's."""

        # A guide that sets itself up from the model (AutoFlowGuide's Laplace start) sees
        # the shard with the likelihood scaled as in training: rank 0's result is then
        # broadcast, so all ranks start alike.
        scaled = dist_.ScaleObserved(dist_.world_size())
        with guide_model_wrapped(guide, scaled), torch.random.fork_rng(devices=[]):
            with poutine.block(), torch.no_grad():
                guide(*args, **kwargs)
        if isinstance(guide, torch.nn.Module):
            tensors = list(guide.parameters()) + list(guide.buffers())
            dist_.broadcast_(tensors)
            self.synced.update(id(p) for p in tensors)

    def _synchronise(self, params, value):

        fresh = [p for p in params if id(p) not in self.synced]
        if fresh:  # e.g. pyro.param sites of the model, created at the first step
            dist_.broadcast_(fresh)
            self.synced.update(id(p) for p in fresh)
        dist_.average_gradients_(list(params))
        device = next(iter(params)).device if params else None
        return dist_.average_scalar(float(value), device)

    def _torch_step(self, params, lr):
        # Parameters with sparse gradients (the per-member rows of AutoFlowGuide's local
        # latents) take RowAdam: a row outside the minibatch neither moves nor has its
        # moments decay.
        fresh = [p for p in params if id(p) not in self.known and p.grad is not None]
        if fresh:
            self.known.update(id(p) for p in fresh)
            dense = [p for p in fresh if not p.grad.is_sparse]
            sparse = [p for p in fresh if p.grad.is_sparse]
            if dense:
                self.dense_optim = _add(self.dense_optim, dense, Adam)
            if sparse:
                self.sparse_optim = _add(self.sparse_optim, sparse, RowAdam)
        with_grad = [p for p in params if p.grad is not None and not p.grad.is_sparse]
        if self.clip is not None and with_grad:
            steps = [self.adam_steps.get(id(p), 0) for p in with_grad]  # host-side: no sync
            _clip_dense(with_grad, steps, self.dense_optim, self.clip)
        for p in with_grad:
            self.adam_steps[id(p)] = self.adam_steps.get(id(p), 0) + 1
        for optim in (self.dense_optim, self.sparse_optim):
            if optim is None:
                continue
            for group in optim.param_groups:
                group["lr"] = lr
                for p in group["params"]:
                    if self.clip is not None and p.grad is not None and p.grad.is_sparse:
                        p.grad = _clamped(p.grad, self.clip, optim.state.get(p))
            optim.step()

    def _check(self, value, params, model, guide, args, kwargs, step):
        if not math.isfinite(value):
            site, what = nonfinite_site(model, guide, args, kwargs)
            where = f" at site {site!r}" if site else ""
            raise FitError(
                f"fit: the loss is {value} at step {step}{where}{_because(what)}. The guide "
                "keeps the parameters "
                f"of step {step - 1}, the last finite one. Check the model's distributions "
                "and constraints there, or lower lr.",
                step,
                site,
            )
        named = [(name, _dense(p.grad)) for p, name in params.items() if p.grad is not None]
        bad = _first_nonfinite_norm(named)
        if bad is None:
            return
        name, grad = bad
        size = f"elements up to {grad.abs().max().item():.3g}, a norm that overflows"
        detail = size if grad.isfinite().all() else "NaN or infinite elements"
        raise FitError(
            f"fit: the gradient of parameter {name!r} is not finite at step {step} ({detail}; "
            f"the loss was {value:.6g}). The guide keeps the parameters of step {step - 1}, "
            "the last finite one.",
            step,
            name,
        )

    @staticmethod
    def _check_update(params, before, lr, step):
        now = [(params[p], p if rows is None else p[rows]) for p, (rows, _) in before.items()]
        bad = _first_nonfinite_norm(now)
        if bad is None:
            return
        with torch.no_grad():
            for p, (rows, saved) in before.items():
                if rows is None:
                    p.copy_(saved)
                else:
                    p.index_copy_(0, rows, saved)
        raise FitError(
            f"fit: the update of step {step} made parameter {bad[0]!r} not finite (learning "
            f"rate {lr:.3g}); it was undone, and the guide keeps the parameters of step "
            f"{step - 1}. Lower lr.",
            step,
            bad[0],
        )


class NormBound:
    """When the default optimizer's update can skip the undo copy and the check after it.

    Adam moves every element by at most ``ADAM_STEP * lr``: with torch's betas (0.9, 0.999),
    Cauchy-Schwarz gives ``|m_t| <= 7.27 sqrt(v_t)`` and the bias corrections add at most a
    factor 10. So from parameter norms known at one step, their norms after the next steps are
    bounded without reading the parameters; while that bound stays far below the dtype's
    overflow, no update can make a norm non-finite (the gradients were checked before it).
    At d = 1002 the copy and the check cost 1.9 ms of a 12 ms step (``benchmarks/RESULTS.md``).
    """

    ADAM_STEP = 73.0

    def __init__(self):
        self.norm = None  # an upper bound on every parameter's norm, or None (unknown)
        self.params = set()  # the ids it was computed for, with their size and dtype limit
        self.largest = self.limit = 0.0

    def forget(self):
        self.norm = None

    def allows(self, params, lr) -> bool:
        """Whether this step's update is known to keep every norm finite (sparse gradients,
        whose rows take RowAdam, are always checked)."""
        tensors = [p for p in params if p.grad is not None]
        if any(p.grad.is_sparse for p in tensors) or not tensors:
            return False
        ids = {id(p) for p in tensors}
        if ids != self.params:
            self.params, self.norm = ids, None
            self.largest = max(p.numel() for p in tensors) ** 0.5  # sqrt: norm of a step
            self.limit = min(torch.finfo(p.dtype).max for p in tensors) ** 0.5 / 4
        if self.norm is None:
            with torch.no_grad():
                norms = torch._foreach_norm(tensors)
                self.norm = float(torch.stack([n.to(norms[0].device) for n in norms]).max())
        self.norm += self.ADAM_STEP * lr * self.largest
        return math.isfinite(self.norm) and self.norm < self.limit


def _add(optim, params, kind, **options):
    if optim is None:
        return kind(params, lr=1e-3, **options)  # the rate is set before every step
    optim.add_param_group({"params": params})
    return optim


def _rows(grad):
    return grad.coalesce().indices()[0]


def _dense(grad):
    """A gradient's stored values (a sparse one's touched rows)."""
    return grad.coalesce().values() if grad.is_sparse else grad


# Gradients are clamped at ``clip`` or OUTLIER times their running RMS (Adam's moment),
# whichever is larger: rare spikes stop, steady large gradients pass. A fixed clip of 10
# turned a 1,000-group model's gradients into signs; Adam then followed their median, not
# their mean (benchmarks/RESULTS.md, "Local latents: the fixed clip").
OUTLIER = 5.0
PER_ELEMENT = 4096  # tensors this small take a bound per element (see _clip_dense)


def _correction(step):  # Adam's bias correction of the second moment (torch's beta2)
    return 1 - 0.999**step


@torch.no_grad()
def _clip_dense(params, steps, optim, clip):
    """Clamp dense gradients in place, given Adam's step count of each: a bound per element
    for tensors of up to ``PER_ELEMENT`` elements, one per tensor (its largest RMS) above.
    Per element everywhere: 2.2 ms a step at d = 1002 (fixed clip 0.12, per tensor 0.37);
    per tensor everywhere changed the quickstart's small fits."""
    for p in (p for p, t in zip(params, steps, strict=True) if t == 0):  # no moments yet
        p.grad.clamp_(-clip, clip)
    seen = [(p, t, optim.state[p]["exp_avg_sq"]) for p, t in zip(params, steps, strict=True) if t]
    large = [(p, t, v) for p, t, v in seen if v.numel() > PER_ELEMENT]
    for p, t, v in (entry for entry in seen if entry[2].numel() <= PER_ELEMENT):
        bound = (v / _correction(t)).sqrt_().mul_(OUTLIER).clamp_min_(clip)
        torch.minimum(p.grad, bound, out=p.grad)
        torch.maximum(p.grad, bound.neg_(), out=p.grad)
    if large:  # amax (moments are not negative): foreach's inf-norm took 2.8 ms, amax 0.09
        most = torch.stack([torch.amax(v).to(large[0][2].device) for *_, v in large]).tolist()
        for (p, t, _), v in zip(large, most, strict=True):
            bound = max(clip, OUTLIER * math.sqrt(v / _correction(t)))
            p.grad.clamp_(-bound, bound)


def _clamped(grad, clip, state=None):
    """A sparse gradient's touched rows clamped elementwise at ``max(clip, OUTLIER x their
    running RMS)`` (RowAdam's row state; the rows are few, so a bound per element)."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    if state:
        step = state["step"][rows].clamp_min(1)  # never touched: v = 0, so the bound is clip
        v = state["exp_avg_sq"][rows] / _correction(step.reshape((-1,) + (1,) * (values.dim() - 1)))
        bound = v.sqrt_().mul_(OUTLIER).clamp_min_(clip)
        values = torch.maximum(torch.minimum(values, bound), -bound)
    else:
        values = values.clamp(-clip, clip)
    return torch.sparse_coo_tensor(grad.indices(), values, grad.shape, check_invariants=False)


@torch.no_grad()
def _touched(params) -> dict:
    """``{param: (rows or None, a copy of them)}``: whole tensors, but only the touched
    rows of a parameter with a sparse gradient (a step's cost must not grow with the
    number of rows)."""
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    dense = [p for p in params if p.grad is None or not p.grad.is_sparse]
    copies = torch._foreach_mul(dense, 1.0) if dense else []
    saved = dict(zip(dense, ((None, c) for c in copies), strict=True))
    for p in sparse:
        rows = _rows(p.grad)
        saved[p] = (rows, p[rows])
    return saved


def _batched_particles(elbo) -> bool:
    return getattr(elbo, "vectorize_particles", False) and elbo.num_particles > 1


def _because(what: str) -> str:
    if not what:  # say so, rather than name nothing
        return (
            " (re-running the guide and model did not reproduce it, so no site can be named:"
            " a rare draw, such as an overflow of exp in a scale)"
        )
    return f": {what}"


def _first_nonfinite_norm(named):
    """The first ``(name, tensor)`` whose norm is NaN or infinite (one host sync for all)."""
    if not named:
        return None
    norms = torch._foreach_norm([t for _, t in named])
    finite = torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])]


def _all_params(guide):
    return guide.parameters() if isinstance(guide, torch.nn.Module) else ()


@torch.no_grad()
def nonfinite_site(model, guide, args, kwargs, attempts: int = 10) -> tuple[str | None, str]:
    """Re-run guide and model: the first site whose data, value or density is not finite,
    and what is not finite there (``(None, "")`` if a re-run does not reproduce it)."""
    with pyro.validation_enabled(False):  # let NaN flow into log_prob instead of raising
        return _find_nonfinite_site(model, guide, args, kwargs, attempts)


def _find_nonfinite_site(model, guide, args, kwargs, attempts):
    for _ in range(attempts):
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        except (ValueError, RuntimeError) as error:  # the failure may be the non-finite value
            return None, f"re-running guide and model raised {type(error).__name__}: {error}"
        for name, site in model_trace.nodes.items():  # data first: the same at every re-run
            if site["type"] == "sample" and site["is_observed"] and _nonfinite(site["value"]):
                return name, f"the observed data of site {name!r} contain NaN or infinite values"
        for trace in (guide_trace, model_trace):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if _nonfinite(site["value"]):
                    return name, f"the value of site {name!r} is not finite"
                try:
                    log_prob = site["fn"].log_prob(site["value"])
                except (ValueError, RuntimeError, NotImplementedError):  # names this site
                    return name, f"the density of site {name!r} cannot be evaluated"
                if _nonfinite(torch.as_tensor(log_prob)):
                    return name, f"the log density of site {name!r} is not finite"
    return None, ""


def _nonfinite(value) -> bool:
    return torch.is_tensor(value) and not bool(torch.isfinite(value).all())
