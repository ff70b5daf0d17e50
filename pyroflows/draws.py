"""Guide draws with everything the diagnostics and ArviZ need, computed in one pass.

For ``S`` draws from a guide, the model is replayed at each draw, which yields every
latent, deterministic and observed site, the pointwise log-likelihood, the log joint
``log p(x, z)`` and the guide's ``log q(z)`` (both in the space of the model's latent
values, so ``log p - log q`` are the importance weights). Draws are vectorised over a
leading plate, in chunks; a model that does not broadcast is run draw by draw instead.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from .scoring import scoring
from .sites import check_vectorised_density
from .subsampling import refuse_subsampled

__all__ = [
    "NOT_VECTORISED_HINT",
    "Draws",
    "SiteInfo",
    "draw",
    "evaluate_at",
    "is_shape_error",
    "log_joint_at",
    "runs_vectorised",
    "sum_per_draw",
]

_PLATE = "_pyroflows_draws"

NOT_VECTORISED_HINT = (
    "write it to broadcast over leading dimensions, e.g. (x * beta).sum(-1) for x @ beta and "
    "y[..., 1:] for y[1:]"
)


def is_shape_error(error: BaseException) -> bool:
    """Whether an error is torch's or Pyro's complaint about shapes that do not broadcast."""
    text = str(error).lower()
    return any(w in text for w in ("size of tensor", "shape", "broadcast", "must match"))


@dataclass
class SiteInfo:
    """A model site as one (non-vectorised) run of the model sees it."""

    name: str
    kind: str  # "latent", "observed", "deterministic" or "factor"
    shape: torch.Size
    batch_shape: torch.Size
    support: object = None
    plates: dict[int, str] = field(default_factory=dict)  # value-shape index -> plate name
    in_guide: bool = True
    improper: bool = False  # an ImproperUniform (flat) prior, possibly wrapped


@dataclass
class Draws:
    """``S`` guide draws and the model evaluated at each. Every tensor leads with ``S``."""

    sites: dict[str, SiteInfo]
    values: dict[str, Tensor]
    log_likelihood: dict[str, Tensor]
    observed: dict[str, Tensor]
    log_joint: Tensor
    log_q: Tensor
    predictive: dict[str, Tensor] = field(default_factory=dict)
    max_plate_nesting: int = 0

    @property
    def log_weights(self) -> Tensor:
        """``log p(x, z_s) - log q(z_s)``: unnormalised log importance weights."""
        return self.log_joint - self.log_q

    @property
    def num_samples(self) -> int:
        return self.log_joint.shape[0]

    def latent_names(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.kind == "latent"]


@torch.no_grad()
def draw(
    model,
    guide,
    args=(),
    kwargs=None,
    num_samples: int = 1000,
    *,
    predictive: bool = False,
    chunk_size: int = 1000,
) -> Draws:
    """Draw ``num_samples`` times from ``guide`` and evaluate ``model`` at each draw."""
    kwargs = kwargs or {}
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    with scoring(guide, stopped=False):  # the cheap forward score, not STL
        guide_trace, model_trace = _traces(model, guide, args, kwargs)
        refuse_subsampled(model_trace)
        sites, mpn = _site_infos(model_trace, guide_trace)
        observed = {
            n: model_trace.nodes[n]["value"] for n, s in sites.items() if s.kind == "observed"
        }
        try:
            chunks = [
                _vectorized(model, guide, args, kwargs, n, sites, mpn, predictive)
                for n in _chunks(num_samples, chunk_size)
            ]
        except (RuntimeError, ValueError, IndexError) as error:  # does not broadcast: one by one
            # one line, the same at every call (shown once): not Pyro's trace-shape table
            name = getattr(model, "__name__", type(model).__name__)
            warnings.warn(
                f"the model {name!r} does not run vectorised over draws "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0]}); drawing "
                f"sequentially, one at a time, which is several times slower. To vectorise it, "
                f"{NOT_VECTORISED_HINT}.",
                stacklevel=3,
            )
            chunks = [_sequential(model, guide, args, kwargs, num_samples, sites, predictive)]
    cat = _concat(chunks)
    return Draws(
        sites,
        cat["values"],
        cat["log_likelihood"],
        observed,
        cat["log_joint"],
        cat["log_q"],
        cat["predictive"],
        mpn,
    )


@torch.no_grad()
def runs_vectorised(model, guide, args=(), kwargs=None, num: int = 8) -> bool:
    """Whether ``model`` and ``guide`` run vectorised over a leading plate of ``num`` draws
    (as ``draw``, multi-particle objectives and moment matching need). Try it with the
    number that will be used: a model can broadcast by accident where that number equals
    one of its own sizes."""
    kwargs = kwargs or {}
    with scoring(guide, stopped=False):
        guide_trace, model_trace = _traces(model, guide, args, kwargs)
        sites, mpn = _site_infos(model_trace, guide_trace)
        try:
            _vectorized(model, guide, args, kwargs, num, sites, mpn, False)
        except (RuntimeError, ValueError, IndexError) as error:
            if not is_shape_error(error):  # a fault of the model, not of broadcasting: say it
                raise
            return False
    return True


def evaluate_at(model, args, kwargs, draws: Draws, values: dict, predictive=False, grad=False):
    """The model at given latent values (``(S, *shape)`` per latent site), vectorised.

    Returns ``{"values", "log_likelihood", "log_joint", "predictive"}`` as ``draw`` computes
    them (``values`` holds the deterministic sites; ``predictive`` the observed sites drawn
    afresh at each row, if asked for). With ``grad``, the results carry gradients back to
    ``values`` (an energy for HMC); without, none are recorded.
    """
    num = next(iter(values.values())).shape[0]
    mpn = draws.max_plate_nesting
    data = {}
    for name, value in values.items():
        info = draws.sites[name]
        data[name] = value.reshape((num,) + (1,) * (mpn - len(info.batch_shape)) + info.shape)
    vectorized = pyro.plate(_PLATE, num, dim=-(mpn + 1))(poutine.condition(model, data=data))
    with torch.set_grad_enabled(grad):
        trace = prune_subsample_sites(poutine.trace(vectorized).get_trace(*args, **kwargs))
        out = _collect(trace, poutine.Trace(), draws.sites, num, mpn, proposal=False)
    out["values"] = {n: v for n, v in out["values"].items() if draws.sites[n].kind != "latent"}
    if predictive:
        with torch.no_grad():
            out["predictive"] = _predict(vectorized, args, kwargs, draws.sites, num, mpn)
    return out


def log_joint_at(model, args, kwargs, draws: Draws, values: dict[str, Tensor]) -> Tensor:
    """``log p(x, z)`` for each row of ``values`` (latent sites, ``(S, *shape)``)."""
    return evaluate_at(model, args, kwargs, draws, values)["log_joint"]


class _Predict(Messenger):
    """Draw the observed sites afresh; ``pyro.deterministic`` and ``pyro.factor`` sites stay
    as they are (``poutine.uncondition`` would sample from their point masses)."""

    def __init__(self, sites):
        super().__init__()
        self.names = {n for n, s in sites.items() if s.kind == "observed"}

    def _pyro_sample(self, msg):
        if msg["name"] in self.names and msg["is_observed"]:
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["infer"]["obs"] = msg["value"]
            msg["value"] = None
            msg["done"] = False


def _traces(model, guide, args, kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _samples(trace):
    return (s for s in trace.nodes.values() if s["type"] == "sample")


def _site_infos(model_trace, guide_trace):
    sites = {}
    dims = [0]
    for trace in (model_trace, guide_trace):
        for site in _samples(trace):
            dims += [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if isinstance(fn, dist.Unit):
            kind = "factor"  # pyro.factor: a log-density term, no data
        elif site["infer"].get("_deterministic"):
            kind = "deterministic"
        elif site["is_observed"]:
            kind = "observed"
        else:
            kind = "latent"
        value = site["value"]
        batch_shape = fn.batch_shape if kind != "deterministic" else torch.Size()
        extra = len(batch_shape) - (value.dim() - len(fn.event_shape))
        if kind == "observed" and extra > 0 and all(n == 1 for n in batch_shape[:extra]):
            batch_shape = batch_shape[extra:]  # data broadcast up by leading size-1 dims only
        plates = {}
        # Plates index the batch shape from the right (observed data may be shorter than the
        # batch shape it broadcasts to); a deterministic site has no batch shape of its own,
        # so its plates are aligned from the right of its value.
        dims_of = value.shape if kind == "deterministic" else batch_shape
        aligned = len(dims_of)
        for frame in site["cond_indep_stack"]:
            index = aligned + frame.dim
            if frame.vectorized and 0 <= index < aligned and dims_of[index] == frame.size:
                plates[index] = frame.name
        sites[name] = SiteInfo(
            name=name,
            kind=kind,
            shape=value.shape,
            batch_shape=batch_shape,
            support=fn.support if kind == "latent" else None,
            plates=plates,
            in_guide=name in guide_trace.nodes,
            improper=kind == "latent" and _improper(fn),
        )
    return sites, max(dims)


def _improper(fn) -> bool:
    while fn is not None:
        if isinstance(fn, dist.ImproperUniform):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _chunks(total, size):
    size = max(1, size)
    return [min(size, total - start) for start in range(0, total, size)]


def _vectorized(model, guide, args, kwargs, num, sites, mpn, predictive):
    def plated(fn):
        return pyro.plate(_PLATE, num, dim=-(mpn + 1))(fn)

    guide_trace = prune_subsample_sites(poutine.trace(plated(guide)).get_trace(*args, **kwargs))
    model_trace = prune_subsample_sites(
        poutine.trace(poutine.replay(plated(model), trace=guide_trace)).get_trace(*args, **kwargs)
    )
    out = _collect(model_trace, guide_trace, sites, num, mpn)
    check_vectorised_density(model, args, kwargs, model_trace, out["values"], out["log_joint"])
    if predictive:
        replayed = poutine.replay(plated(model), trace=guide_trace)
        out["predictive"] = _predict(replayed, args, kwargs, sites, num, mpn)
    return out


def _predict(vectorized_model, args, kwargs, sites, num, mpn) -> dict[str, Tensor]:
    """The observed sites drawn afresh by a vectorised model whose latents are fixed."""
    trace = poutine.trace(_Predict(sites)(vectorized_model)).get_trace(*args, **kwargs)
    return {
        n: _unvectorize(trace.nodes[n]["value"], num, mpn, s.shape, len(s.batch_shape))
        for n, s in sites.items()
        if s.kind == "observed"
    }


def _sequential(model, guide, args, kwargs, num, sites, predictive):
    rows = []
    for _ in range(num):
        guide_trace, model_trace = _traces(model, guide, args, kwargs)
        row = _collect(model_trace, guide_trace, sites, 1, None)
        if predictive:
            unconditioned = _Predict(sites)(poutine.replay(model, trace=guide_trace))
            trace = poutine.trace(unconditioned).get_trace(*args, **kwargs)
            row["predictive"] = {
                n: trace.nodes[n]["value"].unsqueeze(0)
                for n, s in sites.items()
                if s.kind == "observed"
            }
        rows.append(row)
    return _concat(rows)


def _collect(model_trace, guide_trace, sites, num, mpn, proposal=True):
    """Per-draw values and densities from one (possibly vectorised) pair of traces."""
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    values, log_lik = {}, {}
    log_joint = sum(sum_per_draw(s["log_prob"], num, mpn) for s in _samples(model_trace))
    log_q = sum(
        (sum_per_draw(s["log_prob"], num, mpn) for s in _samples(guide_trace)), torch.zeros(())
    )
    for name, info in sites.items():
        site = model_trace.nodes[name]
        if info.kind == "factor":
            continue
        if info.kind == "observed":
            log_lik[name] = _reshape(
                site["fn"].log_prob(site["value"]),
                num,
                mpn,
                info.batch_shape,
                len(info.batch_shape),
            )
            continue
        batch_ndim = len(info.batch_shape)
        values[name] = _reshape(site["value"], num, mpn, info.shape, batch_ndim)
        if proposal and info.kind == "latent" and not info.in_guide:
            # Drawn by the model itself (from its prior): part of the proposal, so its
            # density belongs in log q too, or the weights are wrong.
            log_q = log_q + sum_per_draw(site["log_prob"], num, mpn)
    return {
        "values": values,
        "log_likelihood": log_lik,
        "log_joint": _as_draws(log_joint, num),
        "log_q": _as_draws(log_q, num),
        "predictive": {},
    }


def _reshape(value, num, mpn, shape, batch_ndim):
    if mpn is None:  # a plain (sequential) run
        return value.reshape((1, *tuple(shape)))
    return _unvectorize(value, num, mpn, shape, batch_ndim)


def _unvectorize(value, num, mpn, shape, batch_ndim):
    """A vectorised site value ``(S, 1.., *shape)`` as ``(S, *shape)``."""
    full = (num,) + (1,) * (mpn - batch_ndim) + tuple(shape)
    value = value.expand(full) if value.numel() < math.prod(full) else value.reshape(full)
    return value.reshape((num, *tuple(shape)))


def sum_per_draw(log_prob, num, mpn):
    """A site's log-density summed over everything but the draw dimension.

    The draw dimension is ``-(mpn + 1)``; ``mpn=None`` means a plain run (one draw).
    """
    log_prob = torch.as_tensor(log_prob)
    if mpn is None or log_prob.dim() < mpn + 1:
        return log_prob.sum().expand(num) if mpn is not None else log_prob.sum().reshape(1)
    dim = log_prob.dim() - (mpn + 1)
    return log_prob.movedim(dim, 0).reshape(log_prob.shape[dim], -1).sum(-1).expand(num)


def _as_draws(value, num):
    value = torch.as_tensor(value)
    return value.expand(num) if value.dim() == 0 else value


def _concat(chunks):
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    out = {
        "log_joint": torch.cat([c["log_joint"] for c in chunks]),
        "log_q": torch.cat([c["log_q"] for c in chunks]),
    }
    for key in ("values", "log_likelihood", "predictive"):
        out[key] = {n: torch.cat([c[key][n] for c in chunks]) for n in first[key]}
    return out
