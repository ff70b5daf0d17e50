"""The guide's side of local latents and plates: ``AutoFlowGuide``'s subsampled plates, its
local sites' draws (with the model's own prior where asked) and their members' start.

``AutoFlowGuide`` inherits this mixin; the local latents themselves (parameters and
conditionals) live in ``pyroflows.locals``, the model's prior in ``pyroflows.model_prior``.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 100, subsample_size=10):
    ...         pyro.sample("theta", dist.Normal(0.0, tau))
    >>> guide = AutoFlowGuide(model, local_prior="model").setup()
    >>> guide.local_sites, guide.sample_posterior(5)["theta"].shape
    (('theta',), torch.Size([5, 100]))
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import biject_to

from .model_prior import draw_members, run_to_locals, start_all_members
from .sites import arguments_signature, check_plate_sizes
from .subsampling import Reshuffled, check_subsampling, guide_plates, member_chunks

__all__ = ["LocalLatentsGuide"]


class LocalLatentsGuide:
    """Mixin of ``AutoFlowGuide``: plates and local latents (see the module docstring)."""

    @property
    def local_sites(self) -> tuple[str, ...]:
        """The names of the local latent sites (``pyroflows.locals``), in model order."""
        return () if self.locals is None else tuple(site.name for site in self.locals.sites)

    @property
    def user_model(self):
        """The model as given (``self.model`` is wrapped in Pyro's init handler, which would
        draw an initial value at every site of every run)."""
        kept = self.__dict__.get("_user_model") or self.__dict__.get("_model")
        if not kept or kept[0] is None:
            raise ValueError(
                "AutoFlowGuide: drawing the locals runs the model (local_prior='model'), and an "
                "unpickled guide has none (Pyro's autoguides drop it); save with "
                "guide.state_dict() and load it into AutoFlowGuide(model) instead"
            )
        return kept[0]

    def _model_runner(self, values, args, kwargs, local_latents):
        if getattr(self, "local_prior", "learned") == "learned":
            return None
        # (``local_latents`` passed in: reading it through PyroModule inside a trace cost
        # 0.3 ms a step, 8% of it)
        model, names = self.user_model, local_latents.names
        return lambda indices, draw: run_to_locals(
            model, args, kwargs, values, indices, draw, names
        )

    def _standardised(self, latent: Tensor) -> Tensor:
        # The networks' input on a unit scale; detached: a reparametrisation of their input,
        # not a path for gradients into loc and scale.
        return (latent - self.loc.detach()) / self.scale.detach()

    def _create_plates(self, *args, **kwargs):
        # As Pyro's, but a local plate's subsample size follows the model's for these
        # arguments (a last smaller batch, or all members for Predictive), and its members
        # are dealt in epochs (random reshuffling), not drawn afresh every step.
        sizes = self.__dict__.get("_plate_sizes", {}).get(arguments_signature(args, kwargs), {})
        user = self.create_plates(*args, **kwargs) if self.create_plates else ()
        deal = self.__dict__.get("_minibatches")
        if deal is None:  # (not setdefault: that would build one at every call)
            deal = self.__dict__["_minibatches"] = Reshuffled()
        self.plates = guide_plates(user, self._prototype_frames, sizes, deal)
        return self.plates

    def _check_plate_sizes(self, args, kwargs):
        """New arguments (by shape and value) must not change the size of a latent's plate:
        the guide's parameters were made for the sizes it was set up with. A local plate's
        subsample may change (its size is then recorded for ``_create_plates``)."""
        signature = arguments_signature(args, kwargs)
        seen = self.__dict__.setdefault("_seen_arguments", set())
        if signature not in seen:
            check_plate_sizes(self.model, self.prototype_trace, args, kwargs)
            if self.locals is not None:
                guide_plates = self.create_plates is not None
                sizes = check_subsampling(self.model, self.locals.sites, args, kwargs, guide_plates)
                self.__dict__.setdefault("_plate_sizes", {})[signature] = sizes
            seen.add(signature)

    def _draw_locals(self, latent: Tensor, args, kwargs) -> dict:
        if getattr(self, "local_prior", "learned") == "learned":
            return self.locals.draw_all(latent, self._standardised(latent))
        if not (args or kwargs):
            if "_model_arguments" not in self.__dict__:  # (an unpickled guide has none)
                raise ValueError(
                    "AutoFlowGuide: drawing the locals runs the model (local_prior='model'); "
                    "pass the model's arguments, e.g. guide.sample_posterior(1000, *args)"
                )
            args, kwargs = self._model_arguments
        chunks = self._member_chunks(args, kwargs, latent.device)
        batched, values = self._global_values(latent)
        run = self._model_runner(values, args, kwargs, self.locals)
        return draw_members(self.locals, batched, self._standardised(batched), run, chunks)

    def _member_chunks(self, args, kwargs, device) -> dict:
        sizes = self._plate_sizes.get(arguments_signature(args, kwargs), {})
        chunks = {}
        for plate in {name for site in self.locals.sites for name in site.local_plates}:
            full = self._prototype_frames[plate]
            full = full.full_size or full.size
            chunks[plate] = member_chunks(full, sizes.get(plate, full), device)
        return chunks

    def _global_values(self, latent: Tensor):
        """``(S, D)`` latents -> the same broadcast left of the model's plates, and the
        globals' constrained values."""
        nesting = max((-frame.dim for frame in self._prototype_frames.values()), default=0)
        batched = latent.reshape((len(latent),) + (1,) * nesting + latent.shape[-1:])
        values = {
            site["name"]: biject_to(site["fn"].support)(u)
            for site, u in self._unpack_latent(batched)
        }
        return batched, values

    def _start_members(self, args, kwargs) -> None:
        if self.local_prior != "model":  # the learned prior's members start wide instead
            return
        _, values = self._global_values(self.loc.detach()[None])
        # the globals as the model's own run has them (a batch of one would add a dim)
        nodes = self.prototype_trace.nodes
        values = {name: value.reshape(nodes[name]["value"].shape) for name, value in values.items()}
        chunks = self._member_chunks(args, kwargs, self.loc.device)
        start_all_members(self.locals, self.user_model, args, kwargs, values, chunks)
