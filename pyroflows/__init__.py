"""pyroflows: normalizing-flow variational inference for Pyro."""

from . import distributed, supports, transforms
from .density import DensityFit, Flow
from .diagnostics import globals_diagnostic, importance_resample, log_evidence, psis_diagnostic
from .fit import FitError, FitResult, fit
from .guides import AutoFlowGuide, init_to_median
from .inference import infer
from .neutra import neutra
from .objectives import ImportanceWeightedELBO, MemberImportanceELBO
from .posterior import Posterior
from .psis import khat_threshold, psis

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoFlowGuide",
    "DensityFit",
    "FitError",
    "FitResult",
    "Flow",
    "ImportanceWeightedELBO",
    "MemberImportanceELBO",
    "Posterior",
    "distributed",
    "fit",
    "globals_diagnostic",
    "importance_resample",
    "infer",
    "init_to_median",
    "khat_threshold",
    "log_evidence",
    "neutra",
    "psis",
    "psis_diagnostic",
    "supports",
    "to_inference_data",
    "transforms",
]


def __getattr__(name):
    # ArviZ takes a second to import: load it when it is first needed.
    if name == "to_inference_data":
        from .arviz import to_inference_data

        return to_inference_data
    raise AttributeError(f"module 'pyroflows' has no attribute {name!r}")
