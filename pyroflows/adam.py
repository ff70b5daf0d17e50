r"""Adam for ``fit``: dense parameters in one fused pass, and per-member rows lazily.

``Adam`` runs torch's own functional Adam (``torch.optim.adam.adam``: fused kernels, one pass
over each tensor, or foreach kernels where torch has no fused ones) on state kept here.
torch's ``Optimizer`` classes import ``torch._dynamo`` when the first one is built (their
``add_param_group`` and ``step`` are wrapped for it), about 1 s of every fresh process that
calls ``fit`` or ``infer``; the functional update is the same arithmetic without it
(``benchmarks/results/infer_route.md``, "No torch._dynamo on the way to the draws").

``RowAdam`` steps the per-member parameters of ``AutoFlowGuide``'s local latents: a member
outside the minibatch is not touched (its parameters and moments stay as they were), and a
member's row follows exactly the Adam updates of the steps that touched it. Its cost is
that of the touched rows, whatever the number of members. torch's ``SparseAdam`` does the
first but counts steps globally and, measured here, adds a sparse gradient into its dense
moments at about 8 ms per step for 100 of 1000 rows (``benchmarks/RESULTS.md``, "Local
latents").

Example:
    >>> weight = torch.nn.Parameter(torch.zeros(5, 2))
    >>> optim = RowAdam([weight], lr=0.1)
    >>> torch.nn.functional.embedding(torch.tensor([1, 3]), weight, sparse=True).sum().backward()
    >>> optim.step()
    >>> weight.detach()[:, 0]  # rows 1 and 3 moved by lr (Adam's first step); the rest not
    tensor([ 0.0000, -0.1000,  0.0000, -0.1000,  0.0000])
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam

__all__ = ["Adam", "RowAdam"]

BETAS = (0.9, 0.999)  # torch's defaults
EPS = 1e-8


class _Optimiser:
    """What ``fit``'s step reads of an optimizer: ``param_groups`` (each with its ``lr``),
    ``state`` per parameter, and ``add_param_group``."""

    def __init__(self, params, lr: float):
        self.param_groups: list[dict] = []
        self.state: dict = {}
        self.lr = lr
        self.add_param_group({"params": params})

    def add_param_group(self, group: dict) -> None:
        params = list(group["params"])
        if any(not p.is_leaf or not p.dtype.is_floating_point for p in params):
            raise ValueError(f"{type(self).__name__}: parameters must be floating-point leaves")
        self.param_groups.append({"lr": self.lr, **group, "params": params})


class Adam(_Optimiser):
    """Adam (torch's defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay) on dense
    gradients, the same arithmetic as ``torch.optim.Adam(fused=True)`` (or ``foreach=True``
    for parameters on devices without fused kernels).

    Example:
        >>> weight = torch.nn.Parameter(torch.ones(3))
        >>> optim = Adam([weight], lr=0.1)
        >>> (weight**2).sum().backward()
        >>> optim.step()
        >>> weight.detach()  # Adam's first step moves each element by lr
        tensor([0.9000, 0.9000, 0.9000])
    """

    fused_devices = ("cpu", "cuda")  # where torch has fused Adam kernels for every float dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            fused = all(p.device.type in self.fused_devices for p in params)
            for p in params:
                if p not in self.state:
                    step_dtype = torch.float32 if fused else _scalar_dtype()
                    step_device = p.device if fused else torch.device("cpu")
                    self.state[p] = {
                        "step": torch.zeros((), dtype=step_dtype, device=step_device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
            states = [self.state[p] for p in params]
            adam(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                [s["step"] for s in states],
                foreach=None if fused else True,
                fused=fused or None,
                has_complex=False,
                amsgrad=False,
                beta1=BETAS[0],
                beta2=BETAS[1],
                lr=group["lr"],
                weight_decay=0.0,
                eps=EPS,
                maximize=False,
            )


def _scalar_dtype():  # the step count's dtype, as torch keeps it for unfused Adam
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class RowAdam(_Optimiser):
    """Lazy Adam for parameters with sparse (row) gradients, such as
    ``embedding(..., sparse=True)``'s; see the module docstring."""

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = BETAS
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowAdam takes sparse gradients only")
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                        "step": torch.zeros(p.shape[0], dtype=p.dtype, device=p.device),
                    }
                step = state["step"][rows] + 1
                state["step"][rows] = step
                m = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                shape = (-1,) + (1,) * (p.dim() - 1)
                m_hat = m / (1 - beta1**step).reshape(shape)
                v_hat = v / (1 - beta2**step).reshape(shape)
                p[rows] -= group["lr"] * m_hat / (v_hat.sqrt() + EPS)
