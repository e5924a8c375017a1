"""The ``tga`` recipe section."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import ConfigValueError
from ..layers import parse_layers


class Pooling(enum.Enum):
    mean = "mean"
    last = "last"


class Schedule(enum.Enum):
    paper = "paper"  # pair term x (1 - r), rank term x (1 - r)^2, r = step / max_steps
    constant = "constant"  # both factors 1
    none = "none"  # both factors 0: terms are computed and logged but do not train


class CaptionContext(enum.Enum):
    """Where the caption stands in its teacher pass."""

    prompt = "prompt"  # the training prompt's template up to the image, the caption in the image slot
    bare = "bare"  # the caption alone, with the tokenizer's special tokens (BOS), every token pooled


@dataclass
class TGAConfig:
    """Settings of the TGA loss.

    total = host loss + pair_weight * a(r) * mean exp(-cos(img, cap))
                      + rank_weight * b(r) * mean exp(cos(ret, cap) - cos(img, cap))

    with img, cap, ret the hidden states pooled per layer over the image tokens, the
    caption (a separate no-grad text-only pass of the same model) and the retrieved-text
    tokens, and a, b the schedule factors. The reference code's values are the defaults:
    its layers ``hidden_states[10..18]`` of 32, which are layers 9-17 in this library's
    numbering (layer l = the output of decoder layer l, from 0), weights 1/4 and 1/10,
    the ``paper`` schedule.
    """

    #: "9-17", a list of layer ids, "all", or "auto" (read from ``analysis``)
    layers: Any = "9-17"
    #: JSON written by ``lvlm-safety analyze``; used when ``layers: auto``
    analysis: Optional[str] = None
    pooling: Pooling = Pooling.mean
    pair_weight: float = 0.25
    rank_weight: float = 0.1
    schedule: Schedule = Schedule.paper
    #: inserted right before the image placeholder; ``{text}`` is the retrieved text
    retrieved_template: str = "Retrieved Text: {text}. "
    #: example fields holding the caption and the retrieved text
    caption_key: str = "image_caption"
    retrieved_key: str = "retrieved_caption"
    #: the image placeholder in prompts, before which the retrieved text goes
    image_placeholder: str = "<image>"
    #: longest caption (tokens) in the teacher pass
    caption_max_length: int = 128
    #: the caption's teacher pass: in the training prompt's template (prompt) or alone (bare)
    caption_context: CaptionContext = CaptionContext.prompt

    @staticmethod
    def check(cfg: Any) -> None:
        layers = cfg.layers
        if isinstance(layers, str) and layers.strip().lower() == "auto":
            if not cfg.analysis:
                raise ConfigValueError("analysis", "layers: auto needs `analysis`, the JSON written by `lvlm-safety analyze`")
        else:
            try:
                parse_layers(layers)
            except ValueError as exc:
                raise ConfigValueError("layers", str(exc)) from None
        for key in ("pair_weight", "rank_weight"):
            if float(getattr(cfg, key)) < 0:
                raise ConfigValueError(key, f"{key} must be >= 0, got {getattr(cfg, key)}")
        if "{text}" not in cfg.retrieved_template:
            raise ConfigValueError("retrieved_template", "retrieved_template must contain {text}")
        if int(cfg.caption_max_length) < 1:
            raise ConfigValueError("caption_max_length", "caption_max_length must be >= 1")
