"""The ``cmrm`` method plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...errors import LVLMSafetyError
from ...markers import hookimpl
from ..base import Method
from ..layers import parse_layers
from .config import CMRMConfig

if TYPE_CHECKING:  # pragma: no cover
    from ...runtime import Runtime


class CMRM(Method):
    """Cross-modality representation manipulation: subtract the image-induced shift."""

    name = "cmrm"
    kind = "steering"
    config_class = CMRMConfig
    description = "CMRM inference-time steering (Liu et al., arXiv 2410.09047)"

    def _options(self) -> dict[str, Any]:
        cfg = self.config
        alpha = cfg.alpha
        return {
            "alpha": float(alpha) if isinstance(alpha, (int, float)) else [float(a) for a in alpha],
            "layers": parse_layers(cfg.layers),
            "positions": cfg.positions.value,
            "apply_to": cfg.apply_to.value,
            "variant": cfg.variant.value,
            "composition": cfg.composition.value,
            "reference": cfg.reference.value,
            "measure_at": cfg.measure_at.value,
            "noise_seed": int(cfg.noise_seed),
            "blank_fill": int(cfg.blank_fill),
        }

    @hookimpl
    def calibrate(self, model: torch.nn.Module, processor: Any, dataset: Any, runtime: "Runtime") -> dict[str, Any] | None:
        """Dataset-level vectors, written to ``cmrm.vectors`` (atomically)."""
        from .calibration import calibrate, save_vectors

        if self.config.variant.value != "dataset":
            return None  # the sample-level variant measures at inference time
        if not self.config.vectors:
            raise LVLMSafetyError("cmrm.vectors must name the file to write the calibrated vectors to")
        vectors = calibrate(model, processor, dataset, self.config, layers=parse_layers(self.config.layers),
                            recipe_yaml=runtime.recipe.to_yaml())
        path = save_vectors(vectors, self.config.vectors)
        return {"method": self.name, "path": str(path), "layers": vectors.layers, "samples": vectors.samples}

    @hookimpl
    def install_steering(self, model: torch.nn.Module, runtime: "Runtime") -> Any:
        from .steer import apply
        from .vectorfile import load_checked

        options = self._options()
        vectors = None
        if options["variant"] == "dataset":
            if not self.config.vectors:
                raise LVLMSafetyError("dataset-level CMRM needs cmrm.vectors (run `lvlm-safety calibrate` first)")
            vectors = load_checked(self.config.vectors, model, strict=bool(self.config.strict))
            if options["layers"] is None:
                options["layers"] = vectors.layers
        return apply(model, vectors, processor=runtime.processor, strict=bool(self.config.strict), **options)
