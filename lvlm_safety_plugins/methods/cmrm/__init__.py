"""CMRM: cross-modality representation manipulation (Liu et al., arXiv 2410.09047)."""

from .config import CMRMConfig

__all__ = ["CMRMConfig"]
