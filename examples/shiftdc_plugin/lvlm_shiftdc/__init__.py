"""An example external lvlm-safety-plugins plugin: ShiftDC-style steering, a projector
loss (normmatch), two packaged recipes and an ``lvlm-safety shiftdc`` subcommand."""

from .method import ShiftDC, ShiftDCConfig, safety_directions
from .normmatch import NormMatch, NormMatchConfig, norm_gap

__all__ = ["NormMatch", "NormMatchConfig", "ShiftDC", "ShiftDCConfig", "norm_gap", "safety_directions"]
