r"""``fit``'s compiled step: one SVI step as a flat graph of tensor operations.

Pyro runs model and guide through its effect handlers at every step, and at the sizes of most
Bayesian models that bookkeeping, not arithmetic, is most of a step's cost. The compiled step
traces the step once with ``torch.fx``'s ``make_fx``: the guide's draw from given base draws,
the model's log joint (plates' scales, masks, ``pyro.factor``, observed sites), the objective
and its gradient with respect to every trained parameter (the guide's and the model's own
``pyro.param`` and ``PyroModule`` parameters). Each step then runs only that graph's ATen
operations; the draws, the NaN guard, clipping, the optimizer, the schedule and the display
stay in ``fit``, the same on both paths. Measurements: ``benchmarks/RESULTS.md``, "Compiled
step".

A trace records one run: Python branches on values are frozen in it. So the compiled step is
used only where it is exact, and ``fit`` takes Pyro's general path otherwise, saying why:

- what it cannot express: a guide other than ``AutoFlowGuide`` (or one with a Student-t
  base, whose draws depend on a parameter), an ELBO instance given by the user, subsampled
  plates (new indices every step), enumerated discrete sites, data-parallel fitting;
- a structure that changes: the sites, their distributions, shapes, supports and plates are
  compared over several runs of model and guide;
- agreement: before it is used, the graph's loss and every gradient must equal the general
  path's on the same base draws, at several draws;
- while running: every ``CHECK_EVERY`` steps the general path's loss at that step's draws must
  equal the graph's; if not (a branch taken on values the setup did not see), ``fit`` warns and
  continues on the general path.
"""

from __future__ import annotations

import time
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.distributions import transform_to

from .adapters import param_constraint
from .graph_calls import trace
from .scoring import FlowPosterior, StoppedScore
from .sites import enumerated, structure_signature

__all__ = [
    "CHECK_EVERY",
    "CompiledStep",
    "Disagreement",
    "GivenDraws",
    "base_draws",
    "compile_step",
    "general_loss",
]

CHECK_EVERY = 100  # steps between comparisons of the graph's loss with the general path's
STRUCTURE_RUNS = 3  # runs of model and guide whose structure must agree
AGREEMENT_DRAWS = 2  # base draws at which the graph must reproduce the general step
# Agreement tolerance, relative to max(1, |general|): the same operations in the same order
# agree to rounding; a frozen branch or a missing gradient is far outside it.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


class Disagreement(RuntimeError):
    """The graph's loss differs from the general path's: the model's computation depends on
    values in a way the trace froze."""


class CompiledStep:
    """A traced SVI step: ``loss_and_grads()`` sets the ``.grad`` of every trained parameter
    and returns the loss and ``{parameter: name}``, as the general path does.

    Build one with ``compile_step``.
    """

    def __init__(self, graph, objective, model, guide, args, kwargs, params, particles):
        self.graph = graph
        self.objective = objective
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.params = params  # {unconstrained tensor: param store name}, the graph's order
        self.tensors = list(params)
        self.particles = particles
        self.steps = 0
        self.compile_time = 0.0

    def draws(self) -> Tensor:
        """Standard normal base draws of the step's shape."""
        loc = self.guide.loc
        shape = (self.particles, loc.shape[-1]) if self.particles else loc.shape
        return torch.randn(shape, dtype=loc.dtype, device=loc.device)

    def loss_and_grads(self, draws: Tensor | None = None) -> tuple[Tensor, dict]:
        """One step's loss (a tensor) with the gradients in ``.grad``; every
        ``CHECK_EVERY`` steps checked against the general path (``Disagreement``)."""
        draws = self.draws() if draws is None else draws
        with torch.no_grad():
            loss, *grads = self.graph(draws, *self.tensors)
        self.steps += 1
        if self.steps % CHECK_EVERY == 0:
            general = general_loss(
                self.objective, self.model, self.guide, self.args, self.kwargs, draws
            )
            if not _close(loss, general):
                raise Disagreement(
                    f"at step {self.steps} the compiled step's loss {float(loss):.8g} differs "
                    f"from the general path's {float(general):.8g} on the same draws"
                )
        for tensor, grad in zip(self.tensors, grads, strict=True):
            tensor.grad = grad
        return loss, self.params


def compile_step(objective, model, guide, args, kwargs, particles: int = 0):
    """``(CompiledStep, "")`` where the compiled step is exact, else ``(None, reason)``.

    Arguments:
        objective: ``FlowELBO`` or ``ImportanceWeightedELBO`` (they have ``surrogate``).
        model, guide, args, kwargs: as for the general path; the guide is set up.
        particles: the number of vectorised particles (0: one draw, no particle plate).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> from pyroflows.objectives import FlowELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoFlowGuide(model).setup()
        >>> step, reason = compile_step(FlowELBO(), model, guide, (), {})
        >>> loss, params = step.loss_and_grads()
        >>> reason, len(params) == len(list(guide.parameters()))
        ('', True)
    """
    start = time.perf_counter()
    reason = _unsupported(objective, guide)
    if reason:
        return None, reason
    if not hasattr(objective, "surrogate") or not hasattr(objective, "guess_plate_nesting"):
        return None, f"the loss {type(objective).__name__} has no traceable surrogate"
    draw_shape = (particles, guide.latent_dim) if particles else (guide.latent_dim,)
    loc = guide.loc

    def draws():
        return torch.randn(draw_shape, dtype=loc.dtype, device=loc.device)

    with torch.random.fork_rng(devices=[loc.device] if loc.is_cuda else []):
        try:
            step, reason = _build(objective, model, guide, args, kwargs, particles, draws)
        except (ValueError, RuntimeError) as error:  # the general path reports it as fit does
            return None, f"running model and guide raised {type(error).__name__}"
    if step is None:
        return None, reason
    step.compile_time = time.perf_counter() - start
    return step, ""


def _build(objective, model, guide, args, kwargs, particles, draws):
    objective.guess_plate_nesting(model, guide, args, kwargs)
    one_draw = torch.zeros(guide.latent_dim, dtype=guide.loc.dtype, device=guide.loc.device)
    reason, params = _check_structure(
        model, guide, args, kwargs, lambda: torch.randn_like(one_draw)
    )
    if reason:
        return None, reason
    try:
        graph = _trace(objective, model, guide, args, kwargs, params, draws())
    except Exception as error:  # the general path runs it, or raises its own clear error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"tracing it failed ({type(error).__name__}: {first})"
    step = CompiledStep(graph, objective, model, guide, args, kwargs, params, particles)
    for _ in range(AGREEMENT_DRAWS):
        reason = _disagreement(step, draws())
        if reason:
            return None, reason
    return step, ""


def general_loss(objective, model, guide, args, kwargs, draws: Tensor) -> Tensor:
    """The general path's loss at the given base draws (no gradient)."""
    with torch.no_grad(), base_draws(guide, draws):
        return objective.surrogate(model, guide, args, kwargs)[0]


def _unsupported(objective, guide) -> str:
    if not hasattr(guide, "latent_site_name") or not hasattr(guide, "loc"):
        return f"the guide is {type(guide).__name__}, not an AutoFlowGuide"
    if getattr(guide, "_base", "normal") != "normal":
        return "the guide's Student-t base draws through a learnable parameter"
    if getattr(guide, "local_sites", ()):
        return "the guide has local latents, drawn per member outside the flow's vector"
    return ""


def _check_structure(model, guide, args, kwargs, draws):
    """Run model and guide as the general path does; the reason they cannot be traced (or
    ``""``) and the trained parameters ``{tensor: name}``."""
    signatures, params = [], {}
    for _ in range(STRUCTURE_RUNS):
        with poutine.trace(param_only=True) as capture, base_draws(guide, draws()):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        for name, site in capture.trace.nodes.items():
            params.setdefault(site["value"].unconstrained(), name)
        for name, site in model_trace.nodes.items():
            if enumerated(site):
                return f"site {name!r} is enumerated", {}
            for frame in site.get("cond_indep_stack", ()):
                if frame.full_size is not None and frame.full_size != frame.size:
                    return (
                        f"site {name!r} is in plate {frame.name!r}, subsampled ({frame.size} "
                        f"of {frame.full_size}): the indices change every step"
                    ), {}
        signatures.append(structure_signature(model_trace) + structure_signature(guide_trace))
    for signature in signatures[1:]:
        if signature != signatures[0]:
            changed = next(a for a, b in zip(signature, signatures[0], strict=False) if a != b)
            return (
                "the model's structure changes from run to run (first at site "
                f"{changed[0]!r}): stochastic or value-dependent control flow"
            ), {}
    return "", params


class base_draws(Messenger):
    """Within this handler an ``AutoFlowGuide``'s posterior transforms the given base draws
    instead of drawing its own: ``(D,)`` for one draw, ``(K, D)`` for ``K`` vectorised
    particles. The compiled step and its checks compare two ways of computing a step on the
    same random numbers with it.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> guide = AutoFlowGuide(lambda: pyro.sample("x", dist.Normal(0.0, 1.0))).setup()
        >>> with base_draws(guide, torch.zeros(1)):
        ...     bool(guide()["x"] == guide()["x"])
        True
    """

    def __init__(self, guide, draws: Tensor):
        super().__init__()
        self.site, self.draws = guide.latent_site_name, draws

    def _pyro_sample(self, msg):
        if msg["name"] != self.site:
            return
        msg["fn"] = self.given(msg["fn"])

    def given(self, fn):
        if isinstance(fn, dist.ExpandedDistribution):  # broadcast by a particle plate
            return self.given(fn.base_dist).expand(fn.batch_shape)
        if isinstance(fn, StoppedScore):  # scored with stopped parameters (STL, DReG)
            return StoppedScore(self.given(fn.posterior), fn.log_prob_fn)
        return FlowPosterior(GivenDraws(fn.base_dist, self.draws), fn.transforms)


class GivenDraws(dist.TorchDistribution):
    """A base distribution whose draws are given: ``rsample`` returns them, reshaped to the
    requested shape; ``log_prob`` is the base's."""

    arg_constraints: ClassVar[dict] = {}
    has_rsample = True

    def __init__(self, base, draws):
        self.base, self.draws = base, draws
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return GivenDraws(self.base.expand(batch_shape), self.draws)

    def rsample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        if self.draws.numel() != shape.numel():
            raise ValueError(
                f"base draws of shape {tuple(self.draws.shape)} given where the guide "
                f"draws {tuple(shape)}"
            )
        return self.draws.reshape(shape)

    def log_prob(self, value):
        return self.base.log_prob(value)


class _ParamInputs(Messenger):
    """``pyro.param`` returns the traced input for the named parameters."""

    def __init__(self, values: dict[str, Tensor]):
        super().__init__()
        self.values = values

    def _pyro_param(self, msg):
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["done"] = True


class _Holder(nn.Module):
    """Holds the modules whose parameters become the graph's inputs (``functional_call``)."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, thunk):
        return thunk()


def _trace(objective, model, guide, args, kwargs, params, example_draws):
    """The graph ``(draws, *tensors) -> (loss, *grads)`` over the trained tensors."""
    tensors = list(params)
    modules = {"guide": guide}
    if isinstance(model, nn.Module):
        modules["model"] = model
    holder = _Holder(modules)
    # Module parameters go in by functional_call; the rest (the model's pyro.param sites,
    # PyroModule's constrained PyroParams) by their name in the param store.
    module_names = {}
    for prefix, module in modules.items():
        for name, tensor in module.named_parameters():
            if tensor in params and not name.endswith("_unconstrained"):
                module_names[tensor] = f"parts.{prefix}.{name}"

    def step(draws, *inputs):
        by_module, by_store = {}, {}
        for tensor, value in zip(tensors, inputs, strict=True):
            if tensor in module_names:
                by_module[module_names[tensor]] = value
            else:
                name = params[tensor]
                by_store[name] = transform_to(param_constraint(name))(value)

        def objective_at_inputs():
            with base_draws(guide, draws), _ParamInputs(by_store):
                return objective.surrogate(model, guide, args, kwargs)

        with pyro.validation_enabled(False):
            call = (objective_at_inputs,)
            loss, surrogate = torch.func.functional_call(holder, by_module, call)
            grads = torch.autograd.grad(surrogate, inputs, allow_unused=True)
        pairs = zip(inputs, grads, strict=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in pairs]
        return (loss, *grads)

    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    return trace(step, example_draws, *inputs)


def _disagreement(step: CompiledStep, draws: Tensor) -> str:
    """Why the graph does not reproduce the general path's step at ``draws`` ("" if it does)."""
    tensors = step.tensors
    saved = [t.grad for t in tensors]
    try:
        for t in tensors:
            t.grad = None
        with base_draws(step.guide, draws):
            general_loss_, surrogate = step.objective.surrogate(
                step.model, step.guide, step.args, step.kwargs
            )
            general = torch.autograd.grad(surrogate, tensors, allow_unused=True)
        with torch.no_grad():
            loss, *grads = step.graph(draws, *tensors)
    finally:
        for t, g in zip(tensors, saved, strict=True):
            t.grad = g
    if not _close(loss, general_loss_):
        return (
            f"the traced loss {float(loss):.8g} differs from the general path's "
            f"{float(general_loss_):.8g} on the same draws: value-dependent control flow"
        )
    for tensor, want, got in zip(tensors, general, grads, strict=True):
        want = torch.zeros_like(tensor) if want is None else want
        if not _close(got, want):
            return (
                f"the traced gradient of {step.params[tensor]!r} differs from the general "
                "path's: the parameter is used in a way the trace cannot follow (e.g. an "
                "nn.Module's parameter read outside pyro.param), or control flow depends on values"
            )
    return ""


def _close(got: Tensor, want: Tensor) -> bool:
    tolerance = TOLERANCE.get(want.dtype, 1e-4)
    return torch.allclose(got, want, rtol=tolerance, atol=tolerance, equal_nan=True)
