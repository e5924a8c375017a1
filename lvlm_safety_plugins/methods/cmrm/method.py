"""The ``cmrm`` method plugin."""

from __future__ import annotations

from ..base import Method
from .config import CMRMConfig


class CMRM(Method):
    """Cross-modality representation manipulation: subtract the image-induced shift."""

    name = "cmrm"
    kind = "steering"
    config_class = CMRMConfig
    description = "CMRM inference-time steering (Liu et al., arXiv 2410.09047)"
