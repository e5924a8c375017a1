"""The ``comparative`` recipe section."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from ...errors import ConfigValueError

CROP_PARTS = ("image", "context", "retrieved")


class Ablation(enum.Enum):
    drop = "drop"  # CmpDrop: nested dropout masks
    crop = "crop"  # CmpCrop: nested input crops


class Site(enum.Enum):
    mlp = "mlp"  # the output of every decoder layer's MLP
    layers = "layers"  # the output of every decoder layer
    projector = "projector"  # the image features the projector gives the LLM
    dropout = "dropout"  # the model's own nn.Dropout modules (the paper's CmpDrop)


class Target(enum.Enum):
    ultra = "ultra"  # dummy score 0: every model's loss is pushed towards 0
    best = "best"  # dummy score = the best score among the models (detached)
    first = "first"  # (f + b) / 2 if the full model's f beats the best ablated b, else b


class Mode(enum.Enum):
    add = "add"  # host loss + weight * comparative loss
    replace = "replace"  # weight * comparative loss alone (the host loss cancelled)


class Granularity(enum.Enum):
    example = "example"  # one loss per example and model; pairs ranked per example (CmpLoss code)
    batch = "batch"  # one loss per model: the batch's mean token loss


@dataclass
class ComparativeConfig:
    """Settings of the comparative loss.

    Model 0 is the full model (the host's own forward, with the model's dropout modules
    off); ablated model i (1..c) runs the same batch with ablation rate
    ``1 - (1 - p)^i`` from one shared random state per step, so what model i removes
    contains what model i-1 removed. Scores are ``e_k = -loss_k / temperature``; with
    the dummy set by ``target`` appended last, the comparative loss is the mean over all
    pairs k < j of ``max(0, e_j - e_k)``.
    """

    ablation: Ablation = Ablation.drop
    #: c, the number of ablated models (extra forwards per step)
    num_ablated: int = 2
    #: p, the base dropout rate of CmpDrop; null with drop_site: dropout uses each
    #: dropout module's own rate
    dropout: Optional[float] = 0.1
    drop_site: Site = Site.mlp
    #: what CmpCrop removes: image tokens, prompt context, TGA's retrieved text
    crop_parts: list[str] = field(default_factory=lambda: ["image"])
    #: p of CmpCrop: the share of image / context tokens removed by the first ablated model
    crop_share: float = 0.2
    #: crop_parts 'context' may also remove the question's tokens (the earlier releases'
    #: behaviour; the paper removes only input that is irrelevant to the answer)
    crop_question: bool = False
    #: the example field holding the question; where absent, the first human turn of
    #: ``conversations`` or ``prompt``, less the image placeholder and TGA's retrieved text
    question_key: str = "question"
    temperature: float = 1.0
    target: Target = Target.ultra
    #: whether the dummy takes part in the pairs; null: as the CmpLoss code, yes with
    #: mode replace (the comparative loss alone), no with mode add (a pairwise
    #: regulariser beside the host loss)
    include_dummy: Optional[bool] = None
    mode: Mode = Mode.add
    weight: float = 1.0
    granularity: Granularity = Granularity.example
    #: seed of the shared random state (mixed with the step and micro-batch)
    seed: int = 0

    @staticmethod
    def check(cfg: Any) -> None:
        if int(cfg.num_ablated) < 1:
            raise ConfigValueError("num_ablated", f"must be >= 1, got {cfg.num_ablated}")
        site = cfg.drop_site.value if isinstance(cfg.drop_site, enum.Enum) else str(cfg.drop_site)
        if cfg.dropout is None:
            if site != "dropout":
                raise ConfigValueError("dropout", "null (each dropout module's own rate) needs drop_site: dropout")
        elif not 0.0 < float(cfg.dropout) < 1.0:
            raise ConfigValueError("dropout", f"must be in (0, 1), got {cfg.dropout}")
        if not 0.0 < float(cfg.crop_share) < 1.0:
            raise ConfigValueError("crop_share", f"must be in (0, 1), got {cfg.crop_share}")
        if float(cfg.temperature) <= 0:
            raise ConfigValueError("temperature", f"must be > 0, got {cfg.temperature}")
        if float(cfg.weight) < 0:
            raise ConfigValueError("weight", f"must be >= 0, got {cfg.weight}")
        mode = cfg.mode.value if isinstance(cfg.mode, enum.Enum) else str(cfg.mode)
        if mode == "replace" and cfg.include_dummy is False:
            raise ConfigValueError("include_dummy", "mode: replace needs the dummy: without it no term holds the task loss itself")
        bad = [p for p in cfg.crop_parts if p not in CROP_PARTS]
        if bad or not cfg.crop_parts:
            raise ConfigValueError("crop_parts", f"must list some of {', '.join(CROP_PARTS)}; got {list(cfg.crop_parts)}")
