r"""``AutoFlowGuide``: a normalizing-flow guide that drops in where ``AutoNormal`` was.

Pyro semantics, settled here:

- **An** ``AutoContinuous``. All continuous latent sites are mapped to one unconstrained
  vector with ``biject_to`` (as in ADVI), so Pyro's ``NeuTraReparam``, ``AutoGuideList``,
  ``Predictive`` and ``get_posterior`` work unchanged. The variational distribution is
  ``base -> flow -> affine(loc, L) -> unconstrained latent``: the flow acts in a
  standardised space, so spline bounds and initialisation do not depend on the posterior's
  location and scale; an identity flow leaves exactly ``AutoNormal``'s starting point.
- **The affine.** ``L`` is diagonal or lower-triangular. ``affine="auto"`` makes it full
  (up to 200 dimensions, beyond which ``D^2`` parameters dominate the cost) only for flows
  with no layer that mixes every pair of dimensions, i.e. stacks of coupling layers, whose
  alternating halves never condition some pairs on each other: then the guide contains
  ``AutoMultivariateNormal`` and the flow models only what is not linear. Autoregressive,
  LU, Householder, Sylvester and BNAF layers mix by themselves, and for them a full ``L``
  measurably hurts: with the default IAF it raised the funnel's KL from 0.45 to 0.55 and let
  one of three seeds diverge on centred eight schools.
- **Lazy setup, loadable without a call.** As with every Pyro autoguide, the model is traced
  on the first call (the guide needs the model's arguments to see its sites). The latent
  layout (site names and shapes) is part of ``state_dict()``, so a fresh guide can
  ``load_state_dict`` before it has ever been called; the first call then checks that the
  model still has that layout and raises a clear error if it does not.
- **Parameter names.** Parameters live on the guide (an ``nn.Module``) and are registered in
  Pyro's global param store under the guide's ``name``, which is unique: if the store or
  another live guide already uses ``"AutoFlowGuide"``, the new guide becomes
  ``"AutoFlowGuide_2"`` and so on, so two guides never share state silently. Pass ``name=``
  to choose it yourself. Save and restore with ``guide.state_dict()`` or ``torch.save(guide)``.
- **Local latents.** Latent sites inside a plate of fixed size are simply part of the latent
  vector. Sites inside a *subsampled* plate are refused with an error naming the site: a
  single flow over the whole vector cannot be indexed by a minibatch. Give them their own
  guide with ``AutoGuideList`` (see the error message).
- **Defaults, by measurement** (``benchmarks/guides.py``, ``benchmarks/results/``; 5000
  steps of plain SVI, 1 particle, lr 1e-2 to 1e-3, 3 seeds): two IAF blocks
  (``flow="iaf", num_layers=2``, log-scale bound 6) behind a diagonal affine, conditioner
  width ``2 d`` clipped to ``[32, 128]``. Affine autoregressive layers change scale with the
  other coordinates, which funnels need; a spline with identity tails cannot rescale, and
  spline couplings stayed at KL 1.9-2.1 on Neal's funnel (d = 10), no better than
  AutoMultivariateNormal (2.0). Means over 3 seeds, default vs AutoIAFNormal vs
  AutoMultivariateNormal: funnel KL 0.40 / 0.54 / 2.03, max |Δmean|/sd 0.11 / 0.23 / 0.53,
  max |log sd ratio| 0.40 / 0.53 / 1.83; centred eight schools max |Δmean|/sd
  0.35 / 0.42 / 1.42, max |log sd ratio| 0.15 / 0.33 / 2.15. Four affine blocks started at
  ``init_scale=0.1`` diverged on eight schools; two blocks rather than one keep non-Gaussian
  shapes (on Rezende's ring the ELBO gain over AutoMultivariateNormal is 0.18 nats with two,
  0.10 with one).
- **Discrete sites** must be enumerated (``infer={"enumerate": "parallel"}`` with
  ``TraceEnum_ELBO``); they are then hidden from this guide. Any other discrete site is an
  error naming the site.
- **Supports that depend on other latents** (``b ~ Uniform(0, 1 - a)``) cannot be handled by
  a fixed ``biject_to`` per site (Pyro's autoguides silently draw outside the support). Such
  sites are detected at setup and refused with an error naming the site and the fix.

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
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineTransform, ComposeTransform, LowerCholeskyAffine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.guides import AutoGuide, prototype_hide_fn
from pyro.infer.autoguide.initialization import init_to_median as _pyro_init_to_median
from torch import Tensor, nn
from torch.distributions import biject_to, constraints

from . import supports as _supports  # noqa: F401  (registers extra biject_to)
from . import transforms

__all__ = ["AutoFlowGuide", "init_to_median"]

_LIVE_NAMES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

FULL_RANK_LIMIT = 200  # affine="auto": a full lower-triangular L up to this many dimensions
DEFAULT_NUM_LAYERS = 2  # blocks of the default flow (see the module docstring)


def _init_to_unconstrained_zero(site):
    """A feasible point without sampling: the constrained image of 0 (flat priors too)."""
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.shape())
    zero = torch.zeros(shape, dtype=torch.get_default_dtype())
    return transform(zero).detach()


def init_to_median(site=None, num_samples: int = 15):
    """Pyro's ``init_to_median``, falling back to a point needing no sampling.

    Pyro's own fallback samples from the prior, which fails for ``ImproperUniform`` flat
    priors; this one uses the constrained image of zero.

    Example:
        >>> from torch.distributions import constraints
        >>> flat = dist.ImproperUniform(constraints.positive, (), (2,))
        >>> site = {"fn": flat, "is_observed": False, "type": "sample", "value": None,
        ...         "name": "s", "infer": {}}
        >>> init_to_median(site)
        tensor([1., 1.])
    """
    if site is None:
        return lambda site: init_to_median(site, num_samples)
    try:
        return _pyro_init_to_median(site, num_samples, fallback=_init_to_unconstrained_zero)
    except NotImplementedError:  # Pyro's multivariate path samples even where it cannot
        return _init_to_unconstrained_zero(site)


def _enumerated(msg) -> bool:
    return msg["type"] == "sample" and msg["infer"].get("enumerate") in ("parallel", "sequential")


def _support_key(support) -> tuple:
    """The tensors that define a constraint (e.g. an interval's bounds), for comparison."""
    parts = []
    for value in vars(support).values():
        if isinstance(value, Tensor):
            parts.append(value.detach())
        elif isinstance(value, constraints.Constraint):
            parts.extend(_support_key(value))
    return tuple(parts)


def _unique_name(base: str) -> str:
    store = pyro.get_param_store()

    def taken(name: str) -> bool:
        prefixes = (name + ".", name + "$$$")
        return name in _LIVE_NAMES or any(k.startswith(prefixes) for k in store.keys())

    if not taken(base):
        return base
    i = 2
    while taken(f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


class AutoFlowGuide(AutoContinuous):
    r"""A normalizing-flow guide: write ``AutoFlowGuide(model)`` where ``AutoNormal(model)`` was.

    The posterior over the unconstrained latent vector is ``loc + scale * flow(eps)`` with
    ``eps`` from the base distribution. At construction the flow is the identity, so an
    untrained guide draws exactly what an untrained ``AutoNormal`` with the same
    ``init_loc_fn`` and ``init_scale`` draws.

    Arguments:
        model: a Pyro model.
        flow: anything :func:`pyroflows.transforms.build` takes: a registered name
            (``"nsf"``, ``"realnvp"``, ``"iaf"``, ...), a list of names, a ``TransformModule``
            or a callable ``latent_dim -> TransformModule``.
        num_layers: blocks of the flow (default: 2 for the default flow, else the family's
            own default).
        hidden_dims: conditioner widths (default: see :func:`default_hidden_dims`).
        base: ``"normal"``, or ``"studentt"`` for a heavy-tailed base with learnable degrees
            of freedom per dimension (tail-adaptive flows, Jaini et al. 2020,
            arXiv:1907.04481), for posteriors with Cauchy-like tails. Its degrees of freedom
            start at 30, so this guide starts close to, not exactly at, AutoNormal.
        init_loc_fn: per-site initialisation of ``loc`` (default: prior median, or the
            constrained image of zero where the prior cannot be sampled).
        init_scale: initial ``scale`` of every unconstrained dimension.
        affine: ``"full"`` (lower-triangular ``L``), ``"diagonal"``, or ``"auto"``: full for
            coupling-only flows up to 200 latent dimensions, else diagonal.
        stl: "sticking the landing" gradients (Roeder et al. 2017, arXiv:1703.09194): the
            guide scores its own sample with its parameters stopped, so the ELBO gradient has
            zero variance at the optimum, under plain ``SVI`` + ``Trace_ELBO`` too. It costs
            one inverse pass of the flow (one conditioner pass per coupling layer, ``D`` per
            IAF layer), and needs a flow with an analytic inverse (not planar, radial,
            Sylvester or BNAF). Off by default: measured on a conjugate regression (1500 steps,
            lr 1e-2 to 1e-3), plain gradients reached KL 0.15 and STL 0.93, its variance far
            from the optimum slowing the start; it pays off close to the optimum.
        create_plates: as for Pyro's autoguides.
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
        flow="iaf",
        num_layers: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        base: str = "normal",
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
        create_plates=None,
        name: str | None = None,
        affine: str = "auto",
        stl: bool = False,
        **flow_kwargs,
    ):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if base not in ("normal", "studentt"):
            raise ValueError(f"base must be 'normal' or 'studentt', got {base!r}")
        if affine not in ("auto", "full", "diagonal"):
            raise ValueError(f"affine must be 'auto', 'full' or 'diagonal', got {affine!r}")
        _validate_flow_spec(flow)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates
        self._pyro_name = name if name is not None else _unique_name(type(self).__name__)
        _LIVE_NAMES[self._pyro_name] = self
        self._flow_spec = flow
        if num_layers is None and isinstance(flow, str) and flow == "iaf":
            num_layers = DEFAULT_NUM_LAYERS
        self._num_layers = num_layers
        self._hidden_dims = hidden_dims
        self._flow_kwargs = flow_kwargs
        self._base = base
        self._affine = affine
        self.stl = stl
        self._init_scale = init_scale
        self._layout: list[tuple[str, tuple[int, ...]]] | None = None
        self._store_checked = False
        self._register_load_state_dict_pre_hook(self._prepare_to_load)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _prototype_hide_fn(msg):
        # Enumerated discrete sites are marginalised by TraceEnum_ELBO, not guided.
        return prototype_hide_fn(msg) or _enumerated(msg)

    def _setup_prototype(self, *args, **kwargs):
        # Setup draws from the prior (init_to_median); fork the RNG so that it leaves the
        # user's random stream as it was: a loaded guide then draws what the saved one drew.
        with torch.random.fork_rng(devices=[]):
            self._trace_prototype(*args, **kwargs)

    def _trace_prototype(self, *args, **kwargs):
        AutoGuide._setup_prototype(self, *args, **kwargs)
        sites = list(self.prototype_trace.iter_stochastic_nodes())
        if not sites:
            raise ValueError(
                "AutoFlowGuide found no latent sample sites in the model (every site is "
                "observed or enumerated); there is nothing to fit."
            )
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        for name, site in sites:
            self._check_site(name, site)
            transform = biject_to(site["fn"].support)
            self._unconstrained_shapes[name] = transform.inv(site["value"]).shape
            self._cond_indep_stacks[name] = site["cond_indep_stack"]
        self.latent_dim = sum(math.prod(s) for s in self._unconstrained_shapes.values())
        self._check_dependent_supports(*args, **kwargs)
        layout = [(name, tuple(shape)) for name, shape in self._unconstrained_shapes.items()]
        if self._layout is not None:  # parameters came from a state dict
            _check_layout(self._layout, layout)
        else:
            self._layout = layout
            self._create_parameters(self._init_loc())

    def _check_site(self, name, site):
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"AutoFlowGuide: latent site {name!r} is discrete ({fn.support}); flows need "
                "continuous latents. Enumerate it (infer={'enumerate': 'parallel'} with "
                "TraceEnum_ELBO) so that it is marginalised, or give it its own guide."
            )
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"AutoFlowGuide: latent site {name!r} is in the subsampled plate "
                    f"{frame.name!r} (size {frame.full_size}, subsample {frame.size}). One flow "
                    "over all latents cannot be indexed by a minibatch. Give local latents "
                    "their own guide: guide = AutoGuideList(model); guide.append(AutoFlowGuide("
                    f"poutine.block(model, hide=[{name!r}]))); guide.append(AutoNormal("
                    f"poutine.block(model, expose=[{name!r}])))."
                )

    def _check_dependent_supports(self, *args, **kwargs):
        """Re-run the model at a perturbed point; a site whose support moved depends on others."""
        generator = torch.Generator().manual_seed(0)
        moved = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            transform = biject_to(site["fn"].support)
            u = transform.inv(site["value"].detach())
            noise = torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)
            moved[name] = transform(u + 0.5 * noise)
        try:
            conditioned = poutine.condition(self.model, data=moved)
            trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        except Exception:  # the model may reject the perturbed point; then we cannot tell
            return
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            before = _support_key(site["fn"].support)
            after = _support_key(trace.nodes[name]["fn"].support)
            same = len(before) == len(after) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after, strict=True)
            )
            if not same:
                raise ValueError(
                    f"AutoFlowGuide: the support of latent site {name!r} ({site['fn'].support}) "
                    "depends on other latent variables, so no fixed transform maps the flow "
                    "into it. Reparametrise, e.g. b = (1 - a) * u with u ~ Uniform(0, 1) (add "
                    "pyro.factor(..., log(1 - a)) if the density of b must be kept)."
                )

    def _create_parameters(self, init_loc: Tensor) -> None:
        dim = len(init_loc)
        self.loc = nn.Parameter(init_loc.detach().clone())
        # Not "*_unconstrained": PyroModule reserves that suffix and would hide the parameter
        # from SVI's optimizer.
        raw_scale = math.log(math.expm1(self._init_scale))  # softplus(raw) == init_scale
        self.scale_raw = nn.Parameter(init_loc.new_full((dim,), raw_scale))
        if self._base == "studentt":
            # df = 1 + softplus(raw) starts at 30: nearly Gaussian, tails learnable per dimension.
            self.df_raw = nn.Parameter(init_loc.new_full((dim,), math.log(math.expm1(29.0))))
        flow = transforms.build(
            self._flow_spec,
            dim,
            num_layers=self._num_layers,
            **_architecture(self._flow_spec, dim, self._hidden_dims, self._flow_kwargs),
        )
        self.flow = flow.to(dtype=init_loc.dtype, device=init_loc.device)
        # Whether L is full lower-triangular (else diagonal): fixed once the flow exists.
        if self._affine == "auto":
            self.full_rank = dim <= FULL_RANK_LIMIT and not _mixes_all_pairs(self.flow)
        else:
            self.full_rank = self._affine == "full"
        if self.full_rank:  # strictly lower part of L; starts at zero (L = diag(init_scale))
            self.scale_lower = nn.Parameter(init_loc.new_zeros(dim, dim))
        if self.stl and not _invertible(self.flow):
            raise ValueError(
                "stl=True needs a flow with an analytic inverse; "
                f"{type(self.flow).__name__} has none (planar, radial, Sylvester and BNAF cannot "
                "be inverted). Use stl=False or a coupling/autoregressive flow."
            )
        # Not a registered submodule: the flow is registered once, under the guide.
        self.__dict__["_inverter"] = _FlowInverter(self.flow)

    # ----------------------------------------------------------------------- the posterior
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
        """``u -> loc + L u``; with ``stop``, its parameters detached (for STL scoring)."""
        loc = self.loc.detach() if stop else self.loc
        # The affine caches too: scoring the guide's own sample then inverts nothing (an
        # uncached affine would hand the flow a new tensor and force a real inverse pass).
        if self.full_rank:
            tril = self.scale_tril.detach() if stop else self.scale_tril
            return LowerCholeskyAffine(loc, tril, cache_size=1)
        scale = self.scale.detach() if stop else self.scale
        return AffineTransform(loc, scale, event_dim=1, cache_size=1)

    def get_posterior(self, *args, **kwargs):
        return dist.TransformedDistribution(self.get_base_dist(), self.get_transform())

    def sample_latent(self, *args, **kwargs):
        posterior = self.get_posterior()
        if self.stl:
            if torch._C._get_tracing_state():
                raise RuntimeError(
                    "stl=True evaluates the flow with stopped parameters through "
                    "torch.func.functional_call, which JitTrace_ELBO cannot trace; use Trace_ELBO"
                )
            posterior = _StoppedScore(posterior, self._stopped_log_prob)
        return pyro.sample(self.latent_site_name, posterior, infer={"is_auxiliary": True})

    @property
    def flow_is_invertible(self) -> bool:
        """Whether the flow has an analytic inverse (needed by ``stl`` and DReG)."""
        return _invertible(self.flow)

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

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self._store_checked:
            self._check_param_store()
        return super().forward(*args, **kwargs)

    def _check_param_store(self):
        """Our parameters must be the tensors Pyro's store holds under our names."""
        store = pyro.get_param_store()
        named = [(f"{self._pyro_name}.{n}", p) for n, p in self.named_parameters(recurse=False)]
        named += [(f"{self._pyro_name}.flow$$${n}", p) for n, p in self.flow.named_parameters()]
        for fullname, param in named:
            held = store._params.get(fullname)
            if held is not None and held is not param:
                raise RuntimeError(
                    f"Pyro's param store holds another tensor under {fullname!r}: two guides "
                    f"share the name {self._pyro_name!r}. Give this guide another name= or "
                    "call pyro.clear_param_store() before creating it."
                )
        self._store_checked = True

    # ------------------------------------------------------------------ summaries of q
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
        return self.latent_to_sites(latent)

    def latent_to_sites(self, latent: Tensor) -> dict[str, Tensor]:
        """Map unconstrained latent vectors ``(N, D)`` to constrained site values ``(N, *shape)``.

        Unlike ``_unpack_latent`` (which places batch dims left of the model's plate dims
        for vectorised inference), each site gets a plain leading dimension ``N``.
        """
        self._require_setup()
        num = latent.shape[0]
        out, pos = {}, 0
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            u = latent[..., pos : pos + size].reshape(num, *shape)
            out[name] = biject_to(site["fn"].support)(u)
            pos += size
        return out

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
        """Elementwise posterior medians (Monte Carlo, see :meth:`quantiles`)."""
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

    # ------------------------------------------------------------------ save and load
    def get_extra_state(self):
        return {
            "layout": self._layout,
            "base": self._base,
            "full_rank": getattr(self, "full_rank", None),
        }

    def set_extra_state(self, state):
        pass  # read in _prepare_to_load, before the parameters are loaded

    def _prepare_to_load(self, state_dict, prefix, *_):
        state = state_dict.get(prefix + "_extra_state")
        if not state or not state.get("layout"):
            raise ValueError("this state dict does not come from a set-up AutoFlowGuide")
        if state["base"] != self._base:
            raise ValueError(
                f"the state dict is from a guide with base={state['base']!r}, this one has "
                f"base={self._base!r}"
            )
        layout = [(name, tuple(shape)) for name, shape in state["layout"]]
        if self._layout is not None:
            _check_layout(layout, self._layout)
        else:
            self._layout = layout
            self.latent_dim = sum(math.prod(shape) for _, shape in layout)
            loc = state_dict.get(prefix + "loc")
            dtype = loc.dtype if loc is not None else None
            self._create_parameters(torch.zeros(self.latent_dim, dtype=dtype))
        if state.get("full_rank") != self.full_rank:
            kinds = ["full" if f else "diagonal" for f in (state.get("full_rank"), self.full_rank)]
            raise ValueError(
                f"the state dict is from a guide with a {kinds[0]} affine, this one is "
                f"{kinds[1]}; pass affine='{kinds[0]}' to match"
            )


class _FlowInverter(nn.Module):
    """``u -> (x, log|dx/du|... as the flow's forward log-det)``: the flow run backwards."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, u):
        x = self.flow.inv(u)
        return x, self.flow.log_abs_det_jacobian(x, u)


class _StoppedScore(dist.TorchDistribution):
    """The guide's posterior, scored by a function with stopped parameters (STL)."""

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


def _mixes_all_pairs(flow) -> bool:
    """Whether some layer lets every dimension depend on every other (so a full L is moot)."""
    parts = flow.parts if isinstance(flow, transforms.Stack) else [flow]
    mixing = (
        transforms.LULinear,
        transforms.Householder,
        transforms.Sylvester,
        transforms.BlockAutoregressive,
    )
    return any(
        isinstance(p, mixing) or (isinstance(p, transforms.MaskedAutoregressive) and p.passes > 1)
        for p in parts
    )


def _invertible(flow) -> bool:
    """Whether every part of a flow of ours overrides the inverse (foreign modules: no)."""
    parts = flow.parts if isinstance(flow, transforms.Stack) else [flow]
    base = transforms.VectorTransformModule.inverse_and_log_det
    return all(
        isinstance(p, transforms.VectorTransformModule) and type(p).inverse_and_log_det is not base
        for p in parts
    )


def _check_layout(expected, actual):
    if list(expected) != list(actual):
        raise ValueError(
            "the state dict belongs to a model with other latent sites: it has "
            f"{_describe(expected)}, this model has {_describe(actual)}"
        )


def _describe(layout):
    return ", ".join(f"{name}{list(shape)}" for name, shape in layout)


def _validate_flow_spec(flow):
    """Unknown names fail at construction, not at the first SVI step."""
    names = [flow] if isinstance(flow, str) else flow
    if isinstance(names, (list, tuple)):
        for name in names:
            transforms.family(name)


def default_hidden_dims(latent_dim: int) -> list[int]:
    """The conditioner width policy: ``2 * latent_dim`` clipped to ``[32, 128]``, two layers.

    Wide enough for small models, and bounded so that the cost per step grows linearly with
    the latent dimension, not quadratically. The cap was set by measurement: at d = 1000 the
    step is dominated by the optimizer's pass over the conditioners' O(d * width) weights;
    a cap of 256 cost 2.7-3.1x an AutoNormal step there.
    """
    width = min(max(2 * latent_dim, 32), 128)
    return [width, width]


def _architecture(spec, dim, hidden_dims, flow_kwargs):
    kwargs = dict(flow_kwargs)
    if isinstance(spec, nn.Module) or (callable(spec) and not isinstance(spec, (str, list, tuple))):
        return kwargs
    names = [spec] if isinstance(spec, str) else list(spec)
    takes_hidden = any("hidden_dims" in transforms.family(n).keywords for n in names)
    if takes_hidden:
        kwargs["hidden_dims"] = (
            list(hidden_dims) if hidden_dims is not None else default_hidden_dims(dim)
        )
    elif hidden_dims is not None:
        raise ValueError(f"flow {spec!r} has no hidden layers; hidden_dims does not apply")
    return kwargs
