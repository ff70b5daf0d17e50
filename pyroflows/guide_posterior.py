"""``AutoFlowGuide``'s ``q`` over the latent vector: a base distribution, the flow, then an
affine map (``u -> center + P (loc + L u)``), sampled and scored as Pyro's autoguides are.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> q = AutoFlowGuide(model).setup().get_posterior()
    >>> q.sample((3,)).shape
    torch.Size([3, 1])
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineTransform, ComposeTransform, LowerCholeskyAffine
from torch import Tensor, nn

from . import transforms
from .scoring import FlowPosterior, StoppedScore

__all__ = ["FlowPosteriorGuide"]


class FlowPosteriorGuide:
    """Mixin of ``AutoFlowGuide``: its posterior over the latent vector (module docstring)."""

    @property
    def scale(self) -> Tensor:
        """The diagonal of ``L``."""
        return nn.functional.softplus(self.scale_raw)

    @property
    def scale_tril(self) -> Tensor:
        """``L``: lower-triangular with positive diagonal (diagonal if not full rank)."""
        if self.full_rank:
            return self.scale_lower.tril(-1) + torch.diag_embed(self.scale)
        return torch.diag_embed(self.scale)

    def get_base_dist(self, stop: bool = False):
        zeros = torch.zeros_like(self.loc)
        if self._base == "studentt":
            df = 1.0 + nn.functional.softplus(self.df_raw)
            return dist.StudentT(df.detach() if stop else df, zeros, 1.0).to_event(1)
        return dist.Normal(zeros, 1.0).to_event(1)

    def get_transform(self, *args, **kwargs):
        return ComposeTransform([self.flow, self._affine_transform()])

    def _affine_transform(self, stop: bool = False):
        """``u -> center + P (loc + L u)``; with ``stop``, parameters detached (for STL)."""
        loc = self.loc.detach() if stop else self.loc
        # The affine caches too: scoring the guide's own sample then inverts nothing (an
        # uncached affine would hand the flow a new tensor and force a real inverse pass).
        if self.preconditioned:  # fold the fixed preconditioner into one affine map
            if self.full_rank:
                tril = self.precond @ (self.scale_tril.detach() if stop else self.scale_tril)
            else:  # P diag(s): scale P's columns, O(D^2) rather than a D^3 product
                tril = self.precond * (self.scale.detach() if stop else self.scale)
            return LowerCholeskyAffine(self.center + self.precond @ loc, tril, cache_size=1)
        if self.full_rank:
            tril = self.scale_tril.detach() if stop else self.scale_tril
            return LowerCholeskyAffine(loc, tril, cache_size=1)
        scale = self.scale.detach() if stop else self.scale
        return AffineTransform(loc, scale, event_dim=1, cache_size=1)

    def get_posterior(self, *args, **kwargs):
        """q over the unconstrained latent vector: sample and score it; a flow has no
        closed-form ``mean`` or ``variance`` (they raise, pointing to the estimates)."""
        return FlowPosterior(self.get_base_dist(), self.get_transform())

    def sample_latent(self, *args, **kwargs):
        posterior = self.get_posterior()
        if self.stl:
            if torch.jit.is_tracing():
                raise RuntimeError(
                    "stl=True evaluates the flow with stopped parameters through "
                    "torch.func.functional_call, which JitTrace_ELBO cannot trace; use Trace_ELBO"
                )
            posterior = StoppedScore(posterior, self._stopped_log_prob)
        latent = pyro.sample(self.latent_site_name, posterior, infer={"is_auxiliary": True})
        self.__dict__["_globals_draw"] = latent  # the locals' networks condition on it
        return latent

    @property
    def flow_is_invertible(self) -> bool:
        """Whether the flow has an analytic inverse (needed by ``stl`` and DReG)."""
        return transforms.invertible(self.flow)

    @property
    def latent_site_name(self) -> str:
        """The name of the auxiliary sample site that holds the unconstrained latent vector."""
        return f"_{self._pyro_name}_latent"

    def _stopped_log_prob(self, z: Tensor) -> Tensor:
        """log q(z) with every parameter detached: gradients reach only through z."""
        affine = self._affine_transform(stop=True)
        u = affine.inv(z)
        stopped = {name: p.detach() for name, p in self._inverter.named_parameters()}
        x, flow_log_det = torch.func.functional_call(self._inverter, stopped, (u,))
        log_det = flow_log_det + affine.log_abs_det_jacobian(u, z)
        return self.get_base_dist(stop=True).log_prob(x) - log_det
