r"""``Flow``: a trainable flow distribution for density estimation and generative modelling.

The same registered transforms that make ``AutoFlowGuide`` flexible also make a density
model: a standard normal on :math:`\mathbb{R}^d` pushed through a flow, fitted to data by
maximum likelihood, sampled from, and -- with ``context_dim`` -- conditional on a context
(:math:`p(x \mid c)`, the building block of amortized posteriors and conditional generators).

A ``Flow`` is an ``nn.Module`` whose call returns a Pyro distribution, so it also drops into
a Pyro model or guide: ``pyro.module("flow", flow)`` then ``pyro.sample("x", flow(c))``.

Data are modelled in standardised units: the first ``Flow.fit`` (with
``standardize=True``) stores the data's mean and standard deviation as buffers and the flow
ends with that fixed affine map, so a default architecture fits data on any scale. Scoring
needs the flow's inverse: coupling and autoregressive families have one (``nsf`` and
``realnvp`` are one pass in both directions; ``maf`` scores in one pass but samples in
``d``; ``iaf`` the other way round); planar, radial, Sylvester and BNAF have none and are
refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions.transforms import AffineTransform, ComposeTransform

from . import transforms
from .progress import FitError, Progress, check_setting

__all__ = ["DensityFit", "Flow"]


@dataclass
class DensityFit:
    """What ``Flow.fit`` returns.

    Attributes:
        losses: mean negative log-likelihood per datum, one per step (on the mini-batch).
        num_steps: steps taken.
        wall_time: seconds.
        validation_loss: mean negative log-likelihood of ``validation`` data after training
            (``None`` when no validation data were given).
    """

    losses: list[float] = field(repr=False)  # thousands of numbers: summarised below
    num_steps: int
    wall_time: float
    validation_loss: float | None = None

    def __repr__(self) -> str:
        validation = (
            "" if self.validation_loss is None else f", validation {self.validation_loss:.4g}"
        )
        return (
            f"DensityFit({self.num_steps} steps in {self.wall_time:.1f} s, final loss "
            f"{self.final_loss:.4g}{validation})"
        )

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last tenth of the steps (less noisy than the last)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    def plot(self, ax=None):
        """The loss curve (matplotlib ``Axes``)."""
        from .plots import plot_losses

        return plot_losses(self.losses, ax=ax, ylabel="negative log-likelihood per datum")


class Flow(nn.Module):
    r"""A standard normal on :math:`\mathbb{R}^{dim}` pushed through a registry flow.

    Arguments:
        dim: dimension of the data.
        flow: a registry spec (a name such as ``"nsf"``, a list of names, a
            ``TransformModule`` or a callable), as for ``pyroflows.transforms.build``.
            The default pairs an affine coupling, which sets location and scale, with a
            spline coupling, which shapes: a spline alone is the identity outside its
            interval, so where the data are much narrower than the base (a sharp
            conditional, a tight cluster) its linear tails scatter far-out samples
            (``benchmarks/RESULTS.md``, "Design measurements").
        num_layers: how many times to stack the spec (default 3; ``None``: the family's own
            default for a single name).
        context_dim: if positive, the flow is conditional: every call takes a ``context``
            of that size and the distribution is :math:`p(x \mid \text{context})`.
        architecture: ``hidden_dims``, ``count_bins``, ``bound``, ... (as for ``build``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> data = torch.randn(500, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]]) + 3.0
        >>> flow = Flow(2, "nsf", num_layers=2, hidden_dims=[16])
        >>> result = flow.fit(data, num_steps=200, progress=False)
        >>> flow.log_prob(data).shape, flow.sample((7,)).shape
        (torch.Size([500]), torch.Size([7, 2]))
        >>> cond = Flow(2, "nsf", context_dim=3, hidden_dims=[16])  # p(x | c)
        >>> cond.sample(context=torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        dim: int,
        flow: transforms.registry.FlowSpec = ("realnvp", "nsf"),
        *,
        num_layers: int | None = 3,
        context_dim: int = 0,
        **architecture,
    ):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Flow: dim must be a positive integer, got {dim!r}")
        names = [flow] if isinstance(flow, str) else flow if _is_names(flow) else []
        for name in names:
            if not transforms.family(name).analytic_inverse:
                raise ValueError(
                    f"Flow: {name!r} has no analytic inverse, so it cannot score data; "
                    "use a coupling or autoregressive flow such as 'nsf', 'realnvp' or 'maf'"
                )
        self.transform_module = transforms.build(
            flow,
            dim,
            num_layers=num_layers if names else None,  # a module or callable is built as is
            context_dim=context_dim,
            **architecture,
        )
        conditional = isinstance(self.transform_module, ConditionalTransformModule)
        if bool(context_dim) != conditional:
            raise ValueError(
                f"Flow: context_dim={context_dim} but the flow given is "
                f"{'' if conditional else 'not '}conditional"
            )
        self.dim = dim
        self.context_dim = context_dim
        self.register_buffer("data_loc", torch.zeros(dim))
        self.register_buffer("data_scale", torch.ones(dim))
        self.register_buffer("standardized", torch.tensor(False))

    def transform(self, context: Tensor | None = None):
        """The map from standard-normal noise to data (conditioned on ``context`` if given)."""
        self._check_context(context)
        flow = self.transform_module
        if self.context_dim:
            flow = flow.condition(context)
        if not self.standardized:
            return flow
        return ComposeTransform([flow, AffineTransform(self.data_loc, self.data_scale, 1)])

    def forward(self, context: Tensor | None = None, base: dist.Distribution | None = None):
        """The distribution: a Pyro ``TransformedDistribution`` with event shape ``(dim,)``.

        Its batch shape is ``context.shape[:-1]``. ``base`` replaces the standard normal
        (e.g. a Gaussian with an encoder's mean and scale: the flow then refines it).
        """
        if base is None:
            batch = () if context is None else context.shape[:-1]
            zero = self.data_loc.new_zeros(())
            base = dist.Normal(zero, 1.0).expand((*batch, self.dim)).to_event(1)
        elif base.event_shape != (self.dim,):
            raise ValueError(
                f"Flow: the base distribution has event shape {tuple(base.event_shape)}, "
                f"expected ({self.dim},)"
            )
        return dist.TransformedDistribution(base, [self.transform(context)])

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log density of each row of ``x`` (shape ``x.shape[:-1]``)."""
        self._check_data(x, "x")
        return self(context).log_prob(x)

    def sample(self, sample_shape=(), context: Tensor | None = None) -> Tensor:
        """Draws without gradients; shape ``sample_shape + context.shape[:-1] + (dim,)``."""
        with torch.no_grad():
            return self(context).sample(torch.Size(sample_shape))

    def rsample(self, sample_shape=(), context: Tensor | None = None) -> Tensor:
        """Reparametrised draws (gradients flow to the flow's parameters)."""
        return self(context).rsample(torch.Size(sample_shape))

    def fit(
        self,
        data: Tensor,
        context: Tensor | None = None,
        *,
        num_steps: int = 2000,
        batch_size: int | None = 256,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        clip: float | None = 5.0,
        standardize: bool = True,
        validation: tuple | Tensor | None = None,
        progress: bool | str = True,
        seed: int | None = None,
    ) -> DensityFit:
        """Maximum likelihood by Adam on mini-batches, with a cosine learning-rate decay.

        Arguments:
            data: ``(n, dim)`` rows.
            context: ``(n, context_dim)`` rows for a conditional flow.
            num_steps: optimisation steps (each one mini-batch).
            batch_size: rows per step, drawn without replacement within an epoch
                (``None``: the whole data set every step).
            lr: peak learning rate (a 5% linear warm-up, then cosine decay to zero).
            weight_decay: AdamW decoupled weight decay.
            clip: clip gradients to this global norm (``None``: no clipping).
            standardize: on the first fit, store the data's mean and standard deviation so
                the flow works in standardised units (see the module docstring).
            validation: held-out data (or ``(data, context)``) scored after training.
            progress: as for ``pyroflows.fit``.
            seed: seeds torch's generator first.

        Raises:
            ValueError: data of the wrong shape or with non-finite values.
            FitError: a non-finite loss or gradient; the parameters stay those of the last
                finite step.
        """
        self._check_settings(lr=lr, num_steps=num_steps, batch_size=batch_size)
        self._check_data(data, "data")
        self._check_context(context, rows=data.shape[0])
        if seed is not None:
            torch.manual_seed(seed)
        if standardize and not self.standardized:
            self._standardize(data)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warmup = max(1, num_steps // 20)

        def rate(step):  # step counts from 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, num_steps - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        n = data.shape[0]
        batch_size = n if batch_size is None else min(batch_size, n)
        order, position = torch.randperm(n, device=data.device), 0
        bar = Progress(progress, num_steps, label="NLL", sign=1.0)
        losses, start = [], time.perf_counter()
        for step in range(1, num_steps + 1):
            if position + batch_size > n:
                order, position = torch.randperm(n, device=data.device), 0
            rows = order[position : position + batch_size]
            position += batch_size
            batch_context = None if context is None else context[rows]
            try:  # data and context were checked once above, not every step
                loss = -self(batch_context).log_prob(data[rows]).mean()
            except ValueError as error:  # distribution validation met the flow's NaNs
                if "invalid values" not in str(error):
                    raise
                loss = torch.tensor(math.nan)
            if not torch.isfinite(loss):
                bar.close()
                raise FitError(
                    f"Flow.fit: the negative log-likelihood is {loss.item()} at step {step}; "
                    "try a smaller lr, a tighter clip, or fewer/smaller layers",
                    step,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
            if not torch.isfinite(norm):
                bar.close()
                raise FitError(f"Flow.fit: non-finite gradient at step {step}", step)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(step, loss.item())
        bar.close()
        validation_loss = None
        if validation is not None:
            held, held_context = validation if isinstance(validation, tuple) else (validation, None)
            with torch.no_grad():
                validation_loss = -self.log_prob(held, held_context).mean().item()
        return DensityFit(losses, num_steps, time.perf_counter() - start, validation_loss)

    @staticmethod
    def _check_settings(lr, num_steps, batch_size) -> None:
        check_setting("Flow.fit", "lr", lr)
        check_setting("Flow.fit", "num_steps", num_steps, integer=True)
        if batch_size is not None:
            check_setting("Flow.fit", "batch_size", batch_size, integer=True)

    @torch.no_grad()
    def _standardize(self, data: Tensor) -> None:
        scale = data.std(0) if data.shape[0] > 1 else torch.ones_like(data[0])
        self.data_loc.copy_(data.mean(0))
        self.data_scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
        self.standardized.fill_(True)

    def _check_data(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Flow: {what} must have shape (..., {self.dim}), got {shape}")
        dtype = self.data_loc.dtype
        if x.dtype != dtype:
            raise ValueError(
                f"Flow: {what} are {x.dtype} but the flow is {dtype}; convert one of them "
                f"(x.to({dtype}) or flow.to({x.dtype}))"
            )
        finite = torch.isfinite(x).all(-1)
        if not finite.all():
            bad = (~finite).nonzero()[:5].tolist()
            raise ValueError(f"Flow: {what} has non-finite values in rows {bad}")

    def _check_context(self, context: Tensor | None, rows: int | None = None) -> None:
        if not self.context_dim:
            if context is not None:
                raise ValueError("Flow: a context was given but the flow has context_dim=0")
            return
        if context is None:
            raise ValueError(
                f"Flow: this flow is conditional; pass a context of size {self.context_dim}"
            )
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"Flow: context must have shape (..., {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        if rows is not None and (context.dim() != 2 or context.shape[0] != rows):
            raise ValueError(
                f"Flow: context must have one row per data row ({rows}), got {tuple(context.shape)}"
            )
        finite = torch.isfinite(context).all(-1)
        if not finite.all():
            bad = (~finite).nonzero()[:5].tolist()
            raise ValueError(f"Flow: context has non-finite values in rows {bad}")


def _is_names(spec) -> bool:
    return isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
