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


class Formula(enum.Enum):
    """Which TGA objective is trained (see docs/tga.md, "The loss")."""

    #: the paper's equation (arXiv 2410.12662): per layer -cos(I, C) + softplus(cos(R, C) - cos(I, C)),
    #: summed over the layers, averaged over the rows; no weights, no schedule
    paper = "paper"
    #: the released code's formula (xsc1234/VLM_Safety_Transfer): w_pair (1-r) mean exp(-cos(I, C))
    #: + w_rank (1-r)^2 mean exp(cos(R, C) - cos(I, C)), here in torch, so with gradients
    reference = "reference"


class Schedule(enum.Enum):
    #: the released code's decay: pair term x (1 - r), rank term x (1 - r)^2, r = step / max_steps
    decay = "decay"
    #: the earlier name of ``decay`` (the schedule is the released code's; the paper states none)
    paper = "decay"
    constant = "constant"  # both factors 1
    #: both factors 0: the terms are computed and logged, never trained. This is what the
    #: released code trains: its terms are Python floats (``math.exp``), without gradient,
    #: so its training is the cross-entropy loss with the retrieved text in the prompt
    none = "none"


class CaptionContext(enum.Enum):
    """Where the caption stands in its teacher pass."""

    prompt = "prompt"  # the training prompt's template up to the image, the caption in the image slot
    bare = "bare"  # the caption alone, with the tokenizer's special tokens (BOS), every token pooled


#: what ``pair_weight``, ``rank_weight`` and ``schedule`` are when left unset (null), per formula
FORMULA_DEFAULTS: dict[Formula, tuple[float, float, Schedule]] = {
    Formula.paper: (1.0, 1.0, Schedule.constant),  # the paper's equation: no weights, no schedule
    Formula.reference: (0.25, 0.1, Schedule.decay),  # the released code's weights 1/4, 1/10 and its decay
}


@dataclass(frozen=True)
class TGASettings:
    """The loss settings in effect: a section's unset weights and schedule filled in from
    its formula's defaults (:data:`FORMULA_DEFAULTS`)."""

    formula: Formula
    pair_weight: float
    rank_weight: float
    schedule: Schedule


def _enum(cls: type[enum.Enum], value: Any) -> Any:
    return value if isinstance(value, cls) else cls[str(value)]


def effective_settings(cfg: Any) -> TGASettings:
    """The formula, weights and schedule a ``tga`` section trains with: ``pair_weight``,
    ``rank_weight`` and ``schedule`` left unset take the formula's defaults; a value set
    in the recipe is used as it is, with either formula."""
    formula = _enum(Formula, getattr(cfg, "formula", None) or Formula.paper)
    pair, rank, schedule = FORMULA_DEFAULTS[formula]
    return TGASettings(
        formula=formula,
        pair_weight=pair if cfg.pair_weight is None else float(cfg.pair_weight),
        rank_weight=rank if cfg.rank_weight is None else float(cfg.rank_weight),
        schedule=schedule if cfg.schedule is None else _enum(Schedule, cfg.schedule),
    )


@dataclass
class TGAConfig:
    """Settings of the TGA loss.

    ``formula: paper`` (the default), the paper's equation (arXiv 2410.12662), per row::

        pair_weight * a(r) * sum_l -cos(img_l, cap_l)
      + rank_weight * b(r) * sum_l softplus(cos(ret_l, cap_l) - cos(img_l, cap_l))

    averaged over the rows, with weights 1 and no schedule (a = b = 1) unless set;
    ``formula: reference``, the released code's formula (with gradients here)::

        pair_weight * a(r) * mean_l,b exp(-cos(img, cap))
      + rank_weight * b(r) * mean_l,b exp(cos(ret, cap) - cos(img, cap))

    with weights 1/4, 1/10 and the ``decay`` schedule unless set. img, cap, ret are the
    hidden states pooled per layer over the image tokens, the caption (a separate no-grad
    text-only pass of the same model) and the retrieved-text tokens. The default layers
    are the released code's ``hidden_states[10..18]`` of 32, which are layers 9-17 in this
    library's numbering (layer l = the output of decoder layer l, from 0), chosen there on
    LLaVA-1.6-Mistral (Mistral-7B-Instruct-v0.2); for another LLM use ``layers: auto``.
    """

    #: "9-17", a list of layer ids, "all", or "auto" (read from ``analysis``)
    layers: Any = "9-17"
    #: JSON written by ``lvlm-safety analyze``; used when ``layers: auto``
    analysis: Optional[str] = None
    pooling: Pooling = Pooling.mean
    #: ``paper`` (the paper's equation) or ``reference`` (the released code's formula, with gradients)
    formula: Formula = Formula.paper
    #: weight of the alignment term; null: the formula's (paper 1, reference 0.25)
    pair_weight: Optional[float] = None
    #: weight of the ranking term; null: the formula's (paper 1, reference 0.1)
    rank_weight: Optional[float] = None
    #: factors over training; null: the formula's (paper ``constant``, reference ``decay``)
    schedule: Optional[Schedule] = None
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
            value = getattr(cfg, key)
            if value is not None and float(value) < 0:
                raise ConfigValueError(key, f"{key} must be >= 0 (or null: the formula's default), got {value}")
        if "{text}" not in cfg.retrieved_template:
            raise ConfigValueError("retrieved_template", "retrieved_template must contain {text}")
        if int(cfg.caption_max_length) < 1:
            raise ConfigValueError("caption_max_length", "caption_max_length must be >= 1")
