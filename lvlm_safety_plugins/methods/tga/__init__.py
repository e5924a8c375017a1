"""TGA: text-guided vision-language alignment (Xu et al., ICLR 2025, arXiv 2410.12662)."""

from .config import FORMULA_DEFAULTS, Formula, Schedule, TGAConfig, TGASettings, effective_settings
from .method import TGA, tga_terms

__all__ = ["FORMULA_DEFAULTS", "Formula", "Schedule", "TGA", "TGAConfig", "TGASettings", "effective_settings", "tga_terms"]
