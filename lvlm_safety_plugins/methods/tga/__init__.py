"""TGA: text-guided vision-language alignment (Xu et al., ICLR 2025, arXiv 2410.12662)."""

from .config import TGAConfig
from .method import TGA, tga_terms

__all__ = ["TGA", "TGAConfig", "tga_terms"]
