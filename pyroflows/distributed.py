r"""Data-parallel SVI on ``torch.distributed``: ``fit(..., distributed=True)``.

Launch one process per device with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``). Every rank runs the same script with the same seed, holds
the same guide and evaluates the model on its own shard of the data:

.. code-block:: python

    x, y = pyroflows.distributed.shard(x, y)          # this rank's rows
    pyroflows.fit(model, guide, x, y, seed=0, distributed=True)

What makes every step equal to a full-data step (up to floating-point summation order):

- the log-likelihood of every observed site is multiplied by the number of ranks ``W``;
- each rank draws the same latent sample (same seed), so prior and entropy terms agree;
- gradients are averaged across ranks: ``(1/W) sum_r (prior + entropy + W lik_r)`` is the
  full-data gradient ``prior + entropy + sum_r lik_r`` whatever the shard sizes;
- parameters are broadcast from rank 0 when they are created, so all ranks hold identical
  parameters throughout, and the loss used for progress and early stopping is averaged too.

Every observed site must therefore be sharded (a site observed whole on every rank would be
counted ``W`` times). Latent sites inside the data plate (local latents) are not supported:
each rank would hold different ones. The backend is gloo on CPU and nccl on GPU, chosen
automatically; only rank 0 shows progress.

Multi-node: ``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d
--rdzv-endpoint HOST:29400 --rdzv-id JOB script.py`` on every node (see torchrun's docs).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

__all__ = ["init", "is_enabled", "rank", "shard", "world_size"]


def is_enabled() -> bool:
    """Whether a process group is running (``torch.distributed`` initialised)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_enabled() else 1


def init(backend: str | None = None) -> None:
    """Start the process group from torchrun's environment, if not started yet.

    The backend is nccl when CUDA is available, else gloo. Under nccl each rank uses the GPU
    ``LOCAL_RANK``.
    """
    if is_enabled():
        return
    if "RANK" not in os.environ:
        raise RuntimeError(
            "distributed=True needs a process group: launch with torchrun (e.g. torchrun "
            "--standalone --nproc-per-node 2 script.py) or call "
            "torch.distributed.init_process_group first"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def shard(*tensors: torch.Tensor, dim: int = 0):
    """This rank's contiguous slice of each tensor along ``dim`` (all of it without a group).

    Example:
        >>> x, y = shard(torch.arange(10.0), torch.arange(10))  # one process: everything
        >>> x.shape, y.shape
        (torch.Size([10]), torch.Size([10]))
    """
    r, w = rank(), world_size()
    parts = [torch.tensor_split(t, w, dim=dim)[r] for t in tensors]
    return parts[0] if len(parts) == 1 else tuple(parts)


class ScaleObserved(Messenger):
    """Multiply the log-density of every observed site by ``factor`` (the number of ranks)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def _pyro_sample(self, msg):
        if msg["is_observed"] and not msg["infer"].get("_deterministic"):
            msg["scale"] = self.factor * msg["scale"]


def broadcast_(tensors) -> None:
    """Overwrite each tensor with rank 0's values."""
    for tensor in tensors:
        with torch.no_grad():
            dist.broadcast(tensor.data, src=0)


def average_gradients_(params) -> None:
    """Replace each parameter's gradient by its mean over ranks (one flat all-reduce)."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def average_scalar(value: float, device=None) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item() / world_size())
