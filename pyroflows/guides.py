r"""``AutoFlowGuide``: a normalizing-flow guide that drops in where ``AutoNormal`` was.

Its semantics as a Pyro autoguide: ``docs/guide/semantics.md``; the figures behind each
default: ``benchmarks/RESULTS.md``.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> guide = AutoFlowGuide(model)
    >>> sorted(guide(torch.randn(10)))
    ['mu']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.guides import AutoGuide, prototype_hide_fn
from pyro.infer.autoguide.initialization import InitMessenger
from torch import Tensor, nn
from torch.distributions import biject_to

from . import supports as _supports  # noqa: F401  (registers extra biject_to)
from . import transforms
from .adapters import claim_param_name, restore, snapshot
from .architecture import (
    build_guide_flow,
    check_choice,
    validate_flow_spec,
)
from .guide_posterior import FlowPosteriorGuide
from .guide_state import SavedStateGuide
from .guide_summaries import GuideSummaries
from .laplace import START_MARGIN, LaplaceStart, laplace_start
from .local_guide import LocalLatentsGuide
from .locals import (
    LocalLatents,
    check_local_sites,
    find_local_sites,
    take_local_sites,
)
from .noncentred import hierarchy_search_start
from .scoring import FlowInverter
from .sites import (
    arguments_signature,
    check_dependent_supports,
    check_latent_site,
    check_layout,
    enumerated,
    init_to_median,
    init_to_unconstrained_zero,
    log_joint,
    unconstrained_energy,
)
from .subsampling import check_subsampling

__all__ = ["AutoFlowGuide", "init_to_median"]


FULL_RANK_LIMIT = 200  # affine="auto": a full lower-triangular L up to this many dimensions
DEFAULT_INIT_SCALE = 0.1  # as AutoNormal's


class AutoFlowGuide(
    FlowPosteriorGuide, GuideSummaries, SavedStateGuide, LocalLatentsGuide, AutoContinuous
):
    r"""A normalizing-flow guide: write ``AutoFlowGuide(model)`` where ``AutoNormal(model)`` was.

    The posterior over the unconstrained latent vector is ``loc + scale * flow(eps)`` with
    ``eps`` from the base distribution (behind the fixed Laplace preconditioner where
    ``init`` found one). At construction the flow is the identity, so with ``init="prior"``
    an untrained guide draws exactly what an untrained ``AutoNormal`` with the same
    ``init_loc_fn`` and ``init_scale`` draws.

    Arguments:
        model: a Pyro model.
        flow: anything ``pyroflows.transforms.build`` takes: a registered name
            (``"nsf"``, ``"realnvp"``, ``"iaf"``, ...), a list of names, a ``TransformModule``
            or a callable ``latent_dim -> TransformModule``. The default (``None``): two IAF
            blocks; with local latents, a ``"sinh_arcsinh"`` layer before them (the globals'
            own skew and tail weight: a hierarchy's scale).
        num_layers: blocks of the flow (default: 2 IAF blocks for the default flow, else
            the family's own default).
        hidden_dims: conditioner widths (default: ``architecture.default_hidden_dims``).
        base: ``"normal"``, or ``"studentt"`` for a heavy-tailed base with learnable degrees
            of freedom per dimension (tail-adaptive flows, Jaini et al. 2020,
            arXiv:1907.04481), for posteriors with Cauchy-like tails. Its degrees of freedom
            start at 30, so this guide starts close to, not exactly at, AutoNormal.
        init_loc_fn: per-site initialisation of ``loc`` (default: the prior's median, or
            the constrained image of zero where the prior cannot be sampled or where the
            model's log joint is higher, as under a prior so vague that its median lies far
            out). Given explicitly
            (it or ``init_scale``), it is a warm start: ``init="auto"`` then keeps it instead
            of searching for the Laplace start (``init="laplace"`` searches from it).
        init_scale: initial ``scale`` of every unconstrained dimension (default 0.1).
        affine: ``"full"`` (lower-triangular ``L``), ``"diagonal"``, or ``"auto"``: full for
            coupling-only flows up to 200 latent dimensions, else diagonal.
        init: ``"auto"``: the Laplace start where it is sound (``pyroflows.laplace``), else
            ``init_loc_fn``/``init_scale``; ``"laplace"``: the same (falls back likewise);
            ``"prior"``: always ``init_loc_fn``/``init_scale`` (then an untrained guide draws
            exactly what an untrained ``AutoNormal`` draws).
        stl: "sticking the landing" gradients (Roeder et al. 2017, arXiv:1703.09194): the
            guide scores its own sample with its parameters stopped, so the ELBO gradient has
            zero variance at the optimum, under plain ``SVI`` + ``Trace_ELBO`` too. It costs
            one inverse pass of the flow (one conditioner pass per coupling layer, ``D`` per
            IAF layer), and needs a flow with an analytic inverse (``transforms.invertible``).
            Off by default: far from the optimum its variance slows the start
            (``benchmarks/RESULTS.md``, "Design measurements"); it pays off close to it.
        create_plates: as for Pyro's autoguides: guide-side plates, e.g. with the indices a
            model gives its plate explicitly (``pyro.plate(..., subsample=idx)``).
        local_plates: plates whose latents are local (``pyroflows.locals``): per-member
            parameters plus a network conditioned on the globals, outside the flow. Latents
            in a subsampled plate are always local; name a full plate here to treat it so.
        local_prior: ``"model"``: a local's prior given the globals is the model's own where
            it is Gaussian in unconstrained space (``pyroflows.model_prior``: the model runs
            to its local sites inside the guide; its members start at the likelihood's
            Laplace share), else learned; ``"learned"``: always learned.
        name: the prefix of this guide's parameters in Pyro's param store (default: a
            unique ``"AutoFlowGuide"``, ``"AutoFlowGuide_2"``, ...).
        flow_kwargs: further architecture keywords for the flow (``count_bins``, ``bound``,
            ``activation``, ...).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlowGuide(model, flow="realnvp", hidden_dims=[8])
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step()
        >>> guide.latent_dim, guide.median()["x"].shape
        (2, torch.Size([2]))
    """

    def __init__(
        self,
        model,
        flow=None,
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        base: str = "normal",
        init_loc_fn=None,
        init_scale: float | None = None,
        create_plates=None,
        name: str | None = None,
        affine: str = "auto",
        stl: bool = False,
        init: str = "auto",
        local_plates: Sequence[str] = (),
        local_prior: str = "model",
        **flow_kwargs,
    ):
        # An explicit start (either argument) is a warm start and wins over init="auto".
        self._explicit_start = init_loc_fn is not None or init_scale is not None
        self._default_init_loc = init_loc_fn is None
        init_loc_fn = init_to_median if init_loc_fn is None else init_loc_fn
        init_scale = DEFAULT_INIT_SCALE if init_scale is None else init_scale
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        check_choice("base", base, ("normal", "studentt"))
        check_choice("affine", affine, ("auto", "full", "diagonal"))
        check_choice("init", init, ("auto", "laplace", "prior"))
        check_choice("local_prior", local_prior, ("learned", "model"))
        validate_flow_spec(flow, num_layers)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._user_model = (model,)  # without Pyro's init handler: run inside the guide
        self.create_plates = create_plates
        self._pyro_name = claim_param_name(name, type(self).__name__, self)
        self._flow_spec = flow
        self._num_layers = num_layers
        self._hidden_dims = hidden_dims
        self._flow_kwargs = flow_kwargs
        self._base = base
        self._affine = affine
        self.stl = stl
        self._init_scale = init_scale
        self._init = init
        self.local_plates = tuple(local_plates)
        self.local_prior = local_prior
        self.locals: LocalLatents | None = None
        self._layout: list[tuple[str, tuple[int, ...]]] | None = None
        self._store_checked = False
        self._register_load_state_dict_pre_hook(self._prepare_to_load)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _prototype_hide_fn(msg):
        # Enumerated discrete sites are marginalised by TraceEnum_ELBO, not guided.
        return prototype_hide_fn(msg) or enumerated(msg)

    def _setup_prototype(self, *args, **kwargs):
        # Atomic: a setup that fails or is interrupted leaves the guide as it found it, so
        # that the error is the whole story (not a later "no attribute 'flow'").
        before = snapshot(self)
        try:
            # Setup draws from the prior (init_to_median); fork the RNG so that it leaves the
            # user's random stream as it was: a loaded guide then draws what the saved one drew.
            with torch.random.fork_rng(devices=[]):
                self._trace_prototype(*args, **kwargs)
        except BaseException:
            restore(self, before)
            raise
        self._seen_arguments = {arguments_signature(args, kwargs)}
        self.__dict__["_model_arguments"] = (args, kwargs)

    def _trace_prototype(self, *args, **kwargs):
        AutoGuide._setup_prototype(self, *args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            check_latent_site(name, site)
        self._start_where_denser(args, kwargs)
        # Before the locals leave the prototype: their supports must not move either.
        check_dependent_supports(self.model, self.prototype_trace, args, kwargs)
        local_sites = find_local_sites(self.prototype_trace, self.local_plates)
        local_init = take_local_sites(self.prototype_trace, local_sites)
        if local_sites:
            sizes = check_subsampling(
                self.model, local_sites, args, kwargs, self.create_plates is not None
            )
            self.__dict__["_plate_sizes"] = {arguments_signature(args, kwargs): sizes}
        sites = list(self.prototype_trace.iter_stochastic_nodes())
        if not sites:
            raise ValueError(
                "AutoFlowGuide found no latent sample sites in the model (every site is "
                "observed or enumerated); there is nothing to fit."
                if not local_sites
                else "AutoFlowGuide: every latent site of the model is local "
                f"({', '.join(s.name for s in local_sites)}); the flow needs a global one"
            )
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        for name, site in sites:
            transform = biject_to(site["fn"].support)
            self._unconstrained_shapes[name] = transform.inv(site["value"]).shape
            self._cond_indep_stacks[name] = site["cond_indep_stack"]
        self.latent_dim = sum(math.prod(s) for s in self._unconstrained_shapes.values())
        layout = [(name, tuple(shape)) for name, shape in self._unconstrained_shapes.items()]
        if self._layout is not None:  # parameters came from a state dict
            check_layout(self._layout, layout)
            check_local_sites(self.locals, local_sites)
        else:
            self._layout = layout
            init_loc = self._init_loc()
            laplace = None
            explicit = self._init == "auto" and getattr(self, "_explicit_start", False)
            self.start_description = "prior start (init='prior')"
            if explicit:
                self.start_description = "warm start (an explicit init_loc_fn or init_scale)"
            if local_sites:
                self.start_description = "prior start (local latents: no joint Laplace start)"
            elif self._init != "prior" and not explicit:
                start = self._laplace_start(init_loc, args, kwargs)
                self.start_description = f"prior start (no sound Laplace start: {start.reason})"
                if start.ok:
                    laplace = start.mode, start.precond
                    self.start_description = f"Laplace start ({start.reason})".replace(" ()", "")
                elif self._init == "laplace":
                    warnings.warn(
                        f"AutoFlowGuide: no sound Laplace start for this model ({start.reason}); "
                        "starting from init_loc_fn instead",
                        stacklevel=4,
                    )
            self._create_parameters(init_loc, laplace, has_locals=bool(local_sites))
            self.laplace_proposal = laplace is not None and start.proposal
            if local_sites:
                self.locals = LocalLatents(
                    local_sites, self.latent_dim, local_init, self._init_scale, init_loc
                )
                self._start_members(args, kwargs)

    def _start_where_denser(self, args, kwargs) -> None:
        """The default start: the prior's median, or the constrained image of zero
        (``AutoNormal``'s default start) where the model's log joint is higher there by
        more than ``START_MARGIN``. A prior vague enough that its median lies far out
        (``InverseGamma(0.001, 0.001)``: about 1e34 in float32, and a hierarchy's members
        then drawn at that scale) would otherwise start the guide where every draw has zero
        density. The margin keeps the median where the two are close: zero is often an
        exact stationary point of a symmetric posterior (the centre of a ring), from which
        no search moves (benchmarks/results/infer_route.md)."""
        if not self._default_init_loc:
            return
        zero_model = InitMessenger(init_to_unconstrained_zero)(self._user_model[0])
        hidden = poutine.block(zero_model, self._prototype_hide_fn)
        # its own random stream: the flow's initial weights, drawn next, stay as they were
        with torch.random.fork_rng(devices=[]):
            try:
                at_zero = poutine.block(poutine.trace(hidden).get_trace)(*args, **kwargs)
                zero_joint = log_joint(self._user_model[0], at_zero, args, kwargs)
            except (ValueError, RuntimeError, ArithmeticError):  # the model refuses that
                return  # point: no start (the median, which it accepted, stays)
        median_joint = log_joint(self._user_model[0], self.prototype_trace, args, kwargs)
        if zero_joint > median_joint + START_MARGIN:
            self.prototype_trace = at_zero

    def setup(self, *args, **kwargs) -> AutoFlowGuide:
        """Trace the model and create the parameters now, with the model's arguments (the
        first call does it otherwise); ``start_description`` then says how it started.

        Example:
            >>> import pyro, pyro.distributions as dist
            >>> def model():
            ...     pyro.sample("x", dist.Normal(0.0, 1.0))
            >>> AutoFlowGuide(model).setup().start_description
            'Laplace start'
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
            self._create_plates(*args, **kwargs)  # as a first call would: NeuTra needs them
            self.__dict__.pop("_minibatches", None)  # (not a step: the first starts an epoch)
        return self

    def _laplace_start(self, init_loc: Tensor, args, kwargs) -> LaplaceStart:
        """The Laplace start on ``-log p(x, z(u)) - log|dz/du|`` (``pyroflows.laplace``)."""
        if any(enumerated(m) for m in self.prototype_trace.nodes.values()):
            return LaplaceStart(reason="the model has enumerated discrete sites")
        energy = self.energy(*args, **kwargs)
        start = laplace_start(energy, init_loc, self._init_scale)
        if start.ok:
            return start
        # A centred hierarchy's spike (scales -> 0) can catch the search (pyroflows.noncentred)
        call = (self.user_model, self.prototype_trace, self._unconstrained_shapes, energy)
        with torch.random.fork_rng(devices=[]):  # the flow's initial weights stay as they were
            point = hierarchy_search_start(*call, init_loc, args, kwargs)
            if point is None:
                return start
            from_there = laplace_start(energy, init_loc, self._init_scale, search_from=point)
        return from_there if from_there.ok else start

    def energy(self, *args, **kwargs):
        """``u -> -log p(x, z(u)) - log|dz/du|`` for one latent vector ``u`` (the Laplace start
        and ``pyroflows.modes`` minimise it)."""
        shapes = self._unconstrained_shapes
        return unconstrained_energy(self.model, self.prototype_trace, shapes, args, kwargs)

    def _create_parameters(self, init_loc: Tensor, laplace=None, has_locals=False) -> None:
        dim = len(init_loc)
        # The guide works relative to a fixed affine "preconditioner" z = center + P w: the
        # Laplace approximation when available (then w starts at N(0, I)), else the identity
        # (then w starts at N(init_loc, init_scale^2)). Buffers, so saved and loaded.
        if laplace is not None:
            center, precond = laplace
            start, init_scale = torch.zeros_like(init_loc), 1.0
        else:
            center, precond = torch.zeros_like(init_loc), torch.eye(dim, dtype=init_loc.dtype)
            start, init_scale = init_loc.detach().clone(), self._init_scale
        self.register_buffer("center", center.to(init_loc.device))
        self.register_buffer("precond", precond.to(init_loc.device))
        self.preconditioned = self.laplace_proposal = laplace is not None  # (see setup)
        self.loc = nn.Parameter(start)
        # Not "*_unconstrained": PyroModule reserves it and would hide it from SVI's optimizer.
        raw_scale = math.log(math.expm1(init_scale))  # softplus(raw) == init_scale
        self.scale_raw = nn.Parameter(init_loc.new_full((dim,), raw_scale))
        if self._base == "studentt":
            # df = 1 + softplus(raw) starts at 30: nearly Gaussian, tails learnable per dimension.
            self.df_raw = nn.Parameter(init_loc.new_full((dim,), math.log(math.expm1(29.0))))
        spec = (self._flow_spec, dim, self._num_layers, self._hidden_dims, self._flow_kwargs)
        flow = build_guide_flow(*spec, has_locals)
        self.flow = flow.to(dtype=init_loc.dtype, device=init_loc.device)
        # Whether L is full lower-triangular (else diagonal): fixed once the flow exists.
        if self._affine == "auto":
            self.full_rank = dim <= FULL_RANK_LIMIT and not transforms.mixes_all_pairs(self.flow)
        else:
            self.full_rank = self._affine == "full"
        if self.full_rank:  # strictly lower part of L; starts at zero (L = diag(init_scale))
            self.scale_lower = nn.Parameter(init_loc.new_zeros(dim, dim))
        if self.stl and not transforms.invertible(self.flow):
            raise ValueError(
                f"stl=True needs a flow with an analytic inverse; {type(self.flow).__name__} "
                "has none. Use stl=False or a coupling/autoregressive flow."
            )
        # Not a registered submodule: the flow is registered once, under the guide.
        self.__dict__["_inverter"] = FlowInverter(self.flow)

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        elif not torch.jit.is_tracing():
            self._check_plate_sizes(args, kwargs)
        if not self._store_checked:
            self._check_param_store()
        result = super().forward(*args, **kwargs)
        local_latents = self.locals
        if local_latents is not None:
            g = self._globals_draw
            run = self._model_runner(result, args, kwargs, local_latents)
            result.update(local_latents.sample(g, self._standardised(g), self.plates, run))
        return result


# Guides pickled before scoring.py existed hold a FlowInverter under this name.
_FlowInverter = FlowInverter
