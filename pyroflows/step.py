"""One guarded SVI step: parameters traced as ``SVI.step`` does, a NaN guard, the update.

The update is one ``torch.optim.Adam`` over all parameters (``foreach`` kernels) unless an
``optim=`` is given: Pyro's optimizers keep one optimizer per tensor. Before any update the
loss and every gradient are checked; a non-finite one raises ``FitError`` naming the step and,
where it can be found, the site or parameter, and nothing is updated.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine

from . import distributed as dist_
from .adapters import guide_model_wrapped
from .progress import FitError

__all__ = ["GuardedStep", "nonfinite_site"]


class GuardedStep:
    """One SVI step: parameters traced as ``SVI.step`` does, then a guarded update."""

    def __init__(self, optim, lr, clip, distributed=False):
        self.optim = optim
        self.clip = clip
        self.distributed = distributed
        self.synced: set[int] = set()
        self.torch_optim: torch.optim.Adam | None = None
        self.known: set[int] = set()
        self.names: dict[int, str] = {}

    def step(self, elbo, model, guide, args, kwargs, lr, step):
        try:
            with poutine.trace(param_only=True) as param_capture:
                value = elbo.loss_and_grads(model, guide, *args, **kwargs)
        except ValueError as error:
            # Pyro's validation refuses a NaN distribution parameter before the loss exists.
            if "invalid values" not in str(error):
                raise
            pyro.infer.util.zero_grads(set(_all_params(guide)))
            site = nonfinite_site(model, guide, args, kwargs)
            where = f" at site {site!r}" if site else ""
            raise FitError(
                f"fit: a distribution parameter became NaN or infinite at step {step}{where} "
                f"(Pyro: {str(error).splitlines()[0]}). The guide keeps the parameters of step "
                f"{step - 1}, the last finite one.",
                step,
                site,
            ) from error
        params = {
            site["value"].unconstrained(): name
            for name, site in param_capture.trace.nodes.items()
            if site["type"] == "param"
        }
        if self.distributed:
            value = self._synchronise(params, value)
        try:
            self._check(value, params, model, guide, args, kwargs, step)
            if self.optim is not None:
                self.optim(list(params))
            else:
                self._torch_step(params, lr)
        finally:
            pyro.infer.util.zero_grads(set(params))
        return float(value)

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
        fresh = [p for p in params if id(p) not in self.known]
        if fresh:
            self.known.update(id(p) for p in fresh)
            if self.torch_optim is None:
                self.torch_optim = torch.optim.Adam(fresh, lr=lr, foreach=True)
            else:
                self.torch_optim.add_param_group({"params": fresh})
        for group in self.torch_optim.param_groups:
            group["lr"] = lr
        with_grad = [p for p in params if p.grad is not None]
        if self.clip is not None and with_grad:
            torch.nn.utils.clip_grad_value_(with_grad, self.clip, foreach=True)
        self.torch_optim.step()

    def _check(self, value, params, model, guide, args, kwargs, step):
        if not math.isfinite(value):
            site = nonfinite_site(model, guide, args, kwargs)
            where = f" at site {site!r}" if site else ""
            raise FitError(
                f"fit: the loss is {value} at step {step}{where}. The guide keeps the parameters "
                f"of step {step - 1}, the last finite one. Check the model's distributions "
                "and constraints there, or lower lr.",
                step,
                site,
            )
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all()):
            return
        bad = next(
            name for p, name in params.items() if p.grad is not None and not p.grad.isfinite().all()
        )
        raise FitError(
            f"fit: the gradient of parameter {bad!r} is not finite at step {step} (the loss "
            f"was {value:.6g}). The guide keeps the parameters of step {step - 1}, the last "
            "finite one.",
            step,
            bad,
        )


def _all_params(guide):
    return guide.parameters() if isinstance(guide, torch.nn.Module) else ()


@torch.no_grad()
def nonfinite_site(model, guide, args, kwargs, attempts: int = 10) -> str | None:
    """Re-run guide and model and name the first site whose value or density is not finite."""
    with pyro.validation_enabled(False):  # let NaN flow into log_prob instead of raising
        return _find_nonfinite_site(model, guide, args, kwargs, attempts)


def _find_nonfinite_site(model, guide, args, kwargs, attempts):
    for _ in range(attempts):
        try:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        except Exception:  # the failure itself may be the non-finite value
            return None
        for trace in (guide_trace, model_trace):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                value = site["value"]
                if torch.is_tensor(value) and not torch.isfinite(value).all():
                    return name
                try:
                    log_prob = site["fn"].log_prob(value)
                except Exception:
                    return name
                if not torch.isfinite(torch.as_tensor(log_prob)).all():
                    return name
    return None
