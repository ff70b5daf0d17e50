"""What ``infer`` returns: the draws (``Posterior``) and the route that produced them
(``Route``, a list of ``Stage``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Posterior", "Route", "Stage"]


@dataclass
class Stage:
    """One stage of the route: what ran, how long it took, what it found, what came next."""

    name: str
    seconds: float
    outcome: str
    accepted: bool = False

    def __str__(self) -> str:
        mark = "accepted" if self.accepted else "not accepted"
        return f"{self.name:<8} {self.seconds:7.1f} s  {mark}: {self.outcome}"


@dataclass
class Route:
    """Every stage ``infer`` ran, with its wall time, and what the final draws are."""

    stages: list[Stage] = field(default_factory=list)
    label: str = ""
    approximate: bool = False

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def __str__(self) -> str:
        lines = [f"infer: {self.label} ({self.seconds:.1f} s)"]
        lines += [f"  {s}" for s in self.stages]
        if self.approximate:
            lines.append("  The draws are approximate: no stage reached its acceptance rule.")
        return "\n".join(lines)


@dataclass
class Posterior:
    """What ``infer`` returns.

    Attributes:
        samples: ``{site: (num_samples, *shape)}`` constrained draws of the latent sites
            and of the deterministic sites (where the model runs vectorised over draws).
        kind: ``"mcmc"`` (NeuTra draws: HMC chains, or one NUTS chain), ``"resampled"``
            (PSIS-resampled guide draws) or ``"guide"`` (the guide's own draws, where no
            weights can be computed: a subsampled model).
        diagnostics: ``k_hat`` and ``ess`` (importance weights), and for MCMC ``r_hat``,
            ``ess`` (bulk) and ``divergences``.
        route: the stages run, their times and why each next one was needed.
        guide: the fitted ``AutoFlowGuide``.
    """

    samples: dict
    kind: str
    diagnostics: dict
    route: Route
    guide: object = field(repr=False)
    source: object = field(repr=False, default=None)
    model: object = field(repr=False, default=None)
    args: tuple = field(repr=False, default=())
    kwargs: dict = field(repr=False, default_factory=dict)

    @property
    def label(self) -> str:
        return self.route.label

    def to_inference_data(self):
        """The draws as ``arviz.InferenceData``. MCMC draws form their chains (R-hat and ESS
        mean what they do for MCMC); resampled draws sit in one pseudo-chain that
        ``summary`` reports with ``kind="stats"`` only (``docs/guide/k-hat.md``)."""
        from .arviz import from_guide_draws, from_neutra

        if self.kind == "mcmc":
            chains = self.source.num_chains
            n = self.source.num_draws // chains  # equally long, one after the other
            divergent = [
                [i - c * n for i in self.source.divergences if i // n == c] for c in range(chains)
            ]
            call = (self.model, self.guide, self.args, self.kwargs, self.source.samples)
            return from_neutra(*call, chains, n, divergent)
        if self.kind == "guide":
            return from_guide_draws(self.samples, self.label)
        return self.source.to_inference_data()

    def summary(self):
        """``arviz.summary`` of the draws: with R-hat and ESS for MCMC (over the chains; one
        chain's two halves), ``kind="stats"`` (mean, sd, HDI) for importance-resampled draws."""
        import arviz as az

        from .arviz import split_chain

        if self.kind == "mcmc" and self.source.num_chains == 1:  # R-hat of its two halves
            return az.summary(split_chain(self.to_inference_data()), kind="all")
        if self.kind == "mcmc":
            return az.summary(self.to_inference_data(), kind="all")
        return az.summary(self.to_inference_data(), kind="stats")

    def __str__(self) -> str:
        return str(self.route)
