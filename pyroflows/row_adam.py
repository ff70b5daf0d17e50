r"""Adam on the rows a sparse gradient touches, each row with its own step count.

``fit`` steps the per-member parameters of ``AutoFlowGuide``'s local latents with it: a
member outside the minibatch is not touched (its parameters and moments stay as they were),
and a member's row follows exactly the Adam updates of the steps that touched it. Its cost
is that of the touched rows, whatever the number of members. torch's ``SparseAdam`` does
the first but counts steps globally and, measured here, adds a sparse gradient into its
dense moments at about 8 ms per step for 100 of 1000 rows (``benchmarks/RESULTS.md``,
"Local latents").

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

__all__ = ["RowAdam"]


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for parameters with sparse (row) gradients, such as
    ``embedding(..., sparse=True)``'s; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowAdam takes sparse gradients only")
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                step = state["step"][rows] + 1
                state["step"][rows] = step
                m = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                shape = (-1,) + (1,) * (p.dim() - 1)
                m_hat = m / (1 - beta1**step).reshape(shape)
                v_hat = v / (1 - beta2**step).reshape(shape)
                p[rows] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
        return None
