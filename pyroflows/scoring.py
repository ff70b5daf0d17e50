r"""How a guide's posterior scores its own draws: live parameters, or stopped ones ("sticking
the landing"); and the posterior object itself, which has no closed-form moments.

The STL gradient of the ELBO (Roeder et al. 2017, arXiv:1703.09194) and the DReG gradient of
the importance-weighted bound score each draw with the guide's parameters stopped, so that
gradients reach the parameters only through the draw. For a flow that costs an inverse pass.
``scoring(guide, stopped=...)`` is the one switch between the two; ``fit`` (``loss="stl"``),
``ImportanceWeightedELBO`` (DReG) and the diagnostics (which want the cheap forward score)
all go through it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import nn

__all__ = [
    "FlowInverter",
    "FlowPosterior",
    "StoppedScore",
    "check_stopped_scoring",
    "scoring",
]


@contextmanager
def scoring(guide, *, stopped: bool):
    """Within this context ``guide`` scores its draws with stopped (or live) parameters.

    A guide that cannot score with stopped parameters is refused for ``stopped=True`` and
    left alone for ``stopped=False`` (every guide scores with live parameters).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlowGuide
        >>> guide = AutoFlowGuide(lambda: pyro.sample("x", dist.Normal(0.0, 1.0)), flow="nice")
        >>> with scoring(guide, stopped=True):
        ...     guide.stl
        True
        >>> guide.stl
        False
    """
    if stopped:
        check_stopped_scoring(guide)
    elif not hasattr(guide, "stl"):
        yield guide
        return
    before = guide.stl
    guide.stl = stopped
    try:
        yield guide
    finally:
        guide.stl = before


def check_stopped_scoring(guide) -> None:
    """Raise a clear error unless ``guide`` can score its draws with stopped parameters."""
    if not hasattr(guide, "stl") or not hasattr(guide, "latent_site_name"):
        raise TypeError(
            f"{type(guide).__name__} cannot score its draws with stopped parameters; "
            "path-derivative objectives (loss='stl' or 'dreg') need an AutoFlowGuide"
        )
    flow = getattr(guide, "flow", None)
    if flow is not None and not guide.flow_is_invertible:
        raise ValueError(
            f"{type(flow).__name__} has no analytic inverse, so the guide cannot score its "
            "draws with stopped parameters (loss='stl' or 'dreg'); use a coupling or "
            "autoregressive flow, or loss='elbo' / 'iwae'"
        )


class FlowInverter(nn.Module):
    """``u -> (x, log|du/dx|)``: a flow run backwards, with the flow's forward log-det."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, u):
        x = self.flow.inv(u)
        return x, self.flow.log_abs_det_jacobian(x, u)


class StoppedScore(dist.TorchDistribution):
    """A guide's posterior whose draws are scored by ``log_prob_fn`` (stopped parameters)."""

    arg_constraints: ClassVar[dict] = {}
    has_rsample = True

    def __init__(self, posterior, log_prob_fn):
        self.posterior = posterior
        self.log_prob_fn = log_prob_fn
        super().__init__(posterior.batch_shape, posterior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.posterior.support

    def rsample(self, sample_shape=()):
        return self.posterior.rsample(torch.Size(sample_shape))

    def sample(self, sample_shape=()):
        return self.posterior.sample(torch.Size(sample_shape))

    def log_prob(self, value):
        return self.log_prob_fn(value)


class FlowPosterior(dist.TransformedDistribution):
    """A guide's posterior: no closed-form moments, and a message that says what to use."""

    def _no_moment(self, what):
        raise NotImplementedError(
            f"a flow's posterior has no closed-form {what}; estimate it from draws: "
            "guide.sample_posterior(n) (constrained sites), guide.quantiles([...]), or "
            "guide.get_posterior().sample((n,)) for the unconstrained vector"
        )

    @property
    def mean(self):
        self._no_moment("mean")

    @property
    def variance(self):
        self._no_moment("variance")
