"""``AutoFlowGuide``'s saved state: what a state dict records beside the tensors, the checks
before a state is loaded (atomically), Pyro's param store, and pickles of older versions.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlowGuide
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> state = AutoFlowGuide(model).setup().state_dict()
    >>> loaded = AutoFlowGuide(model)
    >>> _ = loaded.load_state_dict(state)
    >>> loaded.latent_dim
    1
"""

from __future__ import annotations

import math

import torch

from .adapters import check_param_store, restore, snapshot
from .architecture import describe_architecture
from .locals import LocalLatents, LocalSite, check_local_sites
from .sites import check_layout
from .state import check_entries, check_local_prior, check_same_architecture, read_saved_state

__all__ = ["SavedStateGuide"]


class SavedStateGuide:
    """Mixin of ``AutoFlowGuide``: saving, loading and pickling (see the module docstring)."""

    def __getstate__(self):
        # As Pyro's autoguides drop their model: not the model kept to run it inside the
        # guide, nor its arguments kept from setup (a pickle would carry the whole data set).
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_model_arguments", "_user_model")}

    def __setstate__(self, state):
        super().__setstate__(state)
        # Guides pickled before local latents existed have none.
        if "locals" not in self._modules:
            self.__dict__.setdefault("locals", None)
        self.__dict__.setdefault("local_plates", ())

    def _check_param_store(self):
        """Our parameters must be the tensors Pyro's store holds under our names."""
        named = [(f"{self._pyro_name}.{n}", p) for n, p in self.named_parameters(recurse=False)]
        for module in ("flow", "locals") if self.locals is not None else ("flow",):
            named += [
                (f"{self._pyro_name}.{module}$$${n}", p)
                for n, p in getattr(self, module).named_parameters()
            ]
        check_param_store(named, self._pyro_name)
        self._store_checked = True

    @property
    def architecture(self) -> dict:
        """The settings that give this guide's parameters their meaning (saved in the state
        dict; a state from another architecture is refused naming what differs)."""
        return describe_architecture(
            self._flow_spec, self._num_layers, self._hidden_dims, self._flow_kwargs
        )

    def get_extra_state(self):
        return {
            "layout": self._layout,
            "base": self._base,
            "full_rank": getattr(self, "full_rank", None),
            "preconditioned": getattr(self, "preconditioned", False),
            "architecture": self.architecture,
            "flow": repr(self.flow) if hasattr(self, "flow") else None,
            "locals": self.locals.describe() if self.locals is not None else [],
            "local_prior": self.local_prior if self.locals is not None else None,
        }

    def set_extra_state(self, state):
        pass  # read in _prepare_to_load, before the parameters are loaded

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, checked first and atomic: a state from another model
        or architecture, with missing or extra entries, wrong shapes or non-finite values is
        refused before any tensor is copied, and the guide is left as it was."""
        before = snapshot(self)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            restore(self, before)
            raise

    def _prepare_to_load(self, state_dict, prefix, *_):
        state, layout = read_saved_state(state_dict, prefix, self._base)
        if self._layout is not None:
            check_layout(layout, self._layout)
        else:
            self._layout = layout
            self.latent_dim = sum(math.prod(shape) for _, shape in layout)
            loc = state_dict.get(prefix + "loc")
            dtype = loc.dtype if loc is not None else None
            zeros = torch.zeros(self.latent_dim, dtype=dtype)
            # placeholders: the state dict's buffers overwrite them
            laplace = (zeros, torch.eye(self.latent_dim, dtype=dtype))
            self._create_parameters(
                zeros,
                laplace if state.get("preconditioned") else None,
                has_locals=bool(state.get("locals")),
            )
            if state.get("locals"):
                sites = [LocalSite(*key) for key in state["locals"]]
                self.locals = LocalLatents(sites, self.latent_dim, None, 1.0, zeros)
        check_local_sites(self.locals, state.get("locals", []))
        if state.get("locals"):  # (states saved before the model's prior learned it)
            check_local_prior(state.get("local_prior", "learned"), self.local_prior)
        check_same_architecture(state, repr(self.flow), self.architecture, self.full_rank)
        check_entries(state_dict, self.state_dict(prefix=prefix), prefix)
        # The buffers (center, precond) are loaded either way; whether they are used is the
        # saved guide's choice, not this one's start.
        self.preconditioned = bool(state.get("preconditioned"))
