"""A projector loss plugin: keep the image tokens' embeddings at the text tokens' scale.

The projector's output enters the LLM beside text embeddings; when its norms drift far
from theirs, the LLM reads image tokens as unlike any text. The term

    normmatch/gap = weight * (mean_i ||p_i|| / mean_t ||e_t|| - 1)^2

(``p_i`` the projector's output vectors, ``e_t`` the decoder's input at the batch's text
positions) pulls the mean image-token norm to the mean text-token norm. It reads both
through the library's public capture API (``ctx.capture``): no forward hook of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lvlm_safety_plugins import ConfigValueError, Method, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from lvlm_safety_plugins import StepContext


@dataclass
class NormMatchConfig:
    """The ``normmatch`` recipe section."""

    #: weight of the term
    weight: float = 0.1

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.weight < 0:
            raise ConfigValueError("weight", f"must be >= 0, got {cfg.weight}")


def norm_gap(projector_output: torch.Tensor, embeddings: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """``(mean image-token norm / mean text-token norm - 1)^2`` (no weight)."""
    image_norm = projector_output.float().norm(dim=-1).mean()
    text_norm = embeddings[text_mask.to(embeddings.device)].float().norm(dim=-1).mean()
    return (image_norm / text_norm.clamp(min=1e-6) - 1.0) ** 2


class NormMatch(Method):
    """Pull the projector's output norms to the text embeddings' (a training loss)."""

    name = "normmatch"
    kind = "loss"
    config_class = NormMatchConfig
    description = "image-token norm matching (example external loss plugin)"

    @hookimpl
    def before_forward(self, model: torch.nn.Module, batch: dict, ctx: "StepContext") -> None:
        ctx.scratch["normmatch"] = ctx.capture(projector=True, embeddings=True)

    @hookimpl
    def loss_terms(self, model: torch.nn.Module, batch: dict, outputs: Any, ctx: "StepContext") -> dict[str, torch.Tensor] | None:
        capture = ctx.scratch.pop("normmatch", None)
        if capture is None or not bool(capture.image_mask.any()):
            return None  # a text-only batch: nothing to match
        gap = norm_gap(capture.projector_output, capture.input_embeddings, capture.layout.text_mask)
        ctx.metrics["normmatch/ratio"] = float(gap.detach().sqrt())
        return {"normmatch/gap": float(self.config.weight) * gap}
