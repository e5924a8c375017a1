"""CMRM: cross-modality representation manipulation (Liu et al., arXiv 2410.09047).

>>> from lvlm_safety_plugins.methods.cmrm import calibrate, steer
>>> vectors = calibrate(model, processor, "calib.jsonl")            # doctest: +SKIP
>>> with steer(model, vectors, alpha=1.0):                          # doctest: +SKIP
...     model.generate(**inputs)
"""

from .calibration import ShiftAccumulator, calibrate, iter_calibration_rows
from .config import CMRMConfig
from .folding import check_savable, fold_into_weights
from .steer import SteeringHandle, apply, steer
from .vectorfile import SteeringVectors, load_checked, model_fingerprint

__all__ = [
    "CMRMConfig",
    "ShiftAccumulator",
    "SteeringHandle",
    "SteeringVectors",
    "apply",
    "calibrate",
    "check_savable",
    "fold_into_weights",
    "iter_calibration_rows",
    "load_checked",
    "model_fingerprint",
    "steer",
]
