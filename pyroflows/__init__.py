"""pyroflows: normalizing-flow variational inference for Pyro."""

from . import supports, transforms
from .guides import AutoFlowGuide, init_to_median

__version__ = "0.1.0.dev0"

__all__ = ["AutoFlowGuide", "init_to_median", "supports", "transforms"]
