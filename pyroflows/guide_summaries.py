"""``AutoFlowGuide``'s summaries of ``q``: draws of every site, quantiles and medians (a flow
has no closed-form moments, so they are Monte Carlo estimates).

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> guide = AutoFlowGuide(model).setup()
    >>> guide.sample_posterior(100)["x"].shape
    torch.Size([100])
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .sites import unpack_latent, unpack_with_log_det

__all__ = ["GuideSummaries"]


class GuideSummaries:
    """Mixin of ``AutoFlowGuide``: its draws and quantiles (see the module docstring)."""

    @torch.no_grad()
    def sample_posterior(self, num_samples: int = 1000, *args, seed: int | None = 0, **kwargs):
        """Draws of every latent site in constrained space, ``{name: (num_samples, *shape)}``.

        ``pyro.deterministic`` sites are not included: use ``pyro.infer.Predictive`` for those.
        """
        self._require_setup()
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            latent = self.get_posterior().sample((num_samples,))
            local = {}
            if self.locals is not None:
                local = self._draw_locals(latent, args, kwargs)
        return {**self.latent_to_sites(latent), **local}

    def latent_to_sites(self, latent: Tensor, log_det: bool = False):
        """Map unconstrained latent vectors ``(N, D)`` to constrained site values ``(N, *shape)``
        (with ``log_det``: ``(values, log|dz/du|)``, the latter ``(N,)``).

        Unlike ``_unpack_latent`` (which places batch dims left of the model's plate dims
        for vectorised inference), each site gets a plain leading dimension ``N``.
        """
        self._require_setup()
        shapes = self._unconstrained_shapes
        values, jacobian = unpack_with_log_det(self.prototype_trace, shapes, latent)
        return (values, jacobian) if log_det else values

    def _unpack_latent(self, latent: Tensor):
        # Pyro's, but without torch.broadcast_shapes (``sites.unpack_latent`` says why)
        return unpack_latent(self.prototype_trace, self._unconstrained_shapes, latent)

    def centre(self) -> dict:
        """Each latent site's value where the flow maps its base's centre (zero): for an
        untrained guide with a Laplace start, the mode. (Local latents are not included.)"""
        self._require_setup()
        zero = torch.zeros_like(self.loc)[None]
        with torch.no_grad():
            return {k: v[0] for k, v in self.latent_to_sites(self.get_transform()(zero)).items()}

    def quantiles(self, quantiles, *args, num_samples: int = 4000, **kwargs):
        """Elementwise posterior quantiles of each site, estimated from ``num_samples`` draws.

        A flow has no closed-form quantiles; the Monte Carlo error of a quantile is about
        ``sqrt(q (1 - q) / num_samples) / density`` (about 0.02 sd at the median by default).
        The draws use a fixed seed, so repeated calls agree.
        """
        samples = self.sample_posterior(num_samples)
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        return {name: torch.quantile(value, q, dim=0) for name, value in samples.items()}

    def median(self, *args, num_samples: int = 4000, **kwargs):
        """Elementwise posterior medians (Monte Carlo, see ``quantiles``)."""
        return {k: v[0] for k, v in self.quantiles([0.5], num_samples=num_samples).items()}

    def _require_setup(self):
        if self._layout is None or not hasattr(self, "loc"):
            raise RuntimeError(
                "this AutoFlowGuide has not seen the model yet: call it once with the model's "
                "arguments (e.g. svi.step(...)) or load a state dict"
            )
        if self.prototype_trace is None:
            raise RuntimeError(
                "this AutoFlowGuide was loaded from a state dict; call it once with the model's "
                "arguments so that it can map its latent vector back to the model's sites"
            )
