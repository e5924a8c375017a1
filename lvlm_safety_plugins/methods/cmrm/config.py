"""The ``cmrm`` recipe section."""

from __future__ import annotations

import enum
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ...errors import ConfigValueError
from ..layers import parse_layers


def check_alpha_values(values: Sequence[Any], what: str = "alpha") -> list[float]:
    """``values`` as floats; a non-number, NaN or an infinity is a
    :class:`ConfigValueError` naming ``what`` and the position (NaN steering gives NaN
    logits, an infinite one overflows)."""
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy / torch scalars
            except (TypeError, ValueError):
                raise ConfigValueError("alpha", f"{what} must be a number or a list of numbers, got {value!r}") from None
        if not math.isfinite(float(value)):
            where = f"{what}[{i}]" if len(values) > 1 else what
            raise ConfigValueError("alpha", f"{where} is {float(value)}: alpha must be a finite number")
        out.append(float(value))
    return out


def alpha_by_layer(alpha: Any, layers: Sequence[int]) -> dict[int, float]:
    """``alpha`` (one number, or one per layer in ``layers`` order) as ``{layer: float}``;
    a length mismatch, a non-finite value or a repeated layer is a
    :class:`ConfigValueError` naming ``alpha`` (``layers``)."""
    scalar = isinstance(alpha, numbers.Real) or getattr(alpha, "ndim", 1) == 0
    values = check_alpha_values([alpha] * len(layers) if scalar else list(alpha))
    if len(values) != len(layers):
        raise ConfigValueError("alpha", f"alpha has {len(values)} values for {len(layers)} steered layers")
    repeated = sorted({int(l) for l in layers if list(layers).count(l) > 1})
    if repeated:
        raise ConfigValueError("layers", f"layer(s) {repeated} listed twice: each layer is steered once")
    return dict(zip(layers, values))


class Variant(enum.Enum):
    dataset = "dataset"  # one calibrated vector per layer, from a dataset
    sample = "sample"  # the shift of each input, computed at prefill with extra forwards


class Reference(enum.Enum):
    """The image of the "with image" forward; the other forward is always text-only
    (the prompt with its image tokens removed)."""

    blank = "blank"  # a constant image (the model's own processor, or the mean colour)
    noise = "noise"  # seeded Gaussian noise in the normalised pixel space
    none = "none"  # no synthetic reference: the sample's own image


class Positions(enum.Enum):
    from_image = "from_image"  # the image tokens and everything after them, in rows with an image
    image = "image"  # the image tokens only
    text = "text"  # the prompt's text tokens (before and after the image) and the generated tokens
    all = "all"  # every real position: BOS, system prompt, image, text, generated


class Composition(enum.Enum):
    """How the per-layer shifts of several steered layers combine (see docs/cmrm.md)."""

    sequential = "sequential"  # layer l's shift is measured with the earlier steered layers already steered
    independent = "independent"  # every layer's shift is measured on the unsteered model (compounds)


class CalibrationStore(enum.Enum):
    """Where sequential calibration keeps each batch's states between layers."""

    auto = "auto"  # by size: the accelerator, then CPU memory, then disk (docs/cmrm.md)
    device = "device"  # the model's device
    cpu = "cpu"  # CPU memory
    disk = "disk"  # a memory-mapped file in a temporary folder, removed afterwards


class Phase(enum.Enum):
    prompt = "prompt"  # the prefill forward
    generated = "generated"  # the decode steps of generate
    both = "both"


class MeasureAt(enum.Enum):
    last = "last"  # the last real token of the prompt
    mean = "mean"  # the mean over the real tokens of the prompt


@dataclass
class CMRMConfig:
    """Settings of CMRM steering.

    The shift at layer l is ``v_l = h_l(prompt, reference image) - h_l(prompt, text
    only)`` measured at ``measure_at`` (averaged over a calibration set for the dataset
    variant, per input for the sample variant); steering subtracts ``alpha_l * v_l`` from
    the layer's output at the chosen positions. With ``composition: sequential`` (the
    default) ``h_l(prompt, reference image)`` is measured with the earlier steered
    layers already steered, so the state at every steered layer lands at
    ``h_l - alpha_l * shift_l`` instead of having the earlier layers' edits subtracted
    again; the vectors are then tied to the alpha, layers and positions they were
    calibrated with.
    """

    variant: Variant = Variant.dataset
    #: one float, or one float per steered layer
    alpha: Any = 1.0
    #: "all", a range such as "10-20" (inclusive), or a list of layer ids
    layers: Any = "all"
    #: which positions are steered (from_image: image tokens and everything after them)
    positions: Positions = Positions.from_image
    #: how the shifts of several steered layers combine
    composition: Composition = Composition.sequential
    #: steer the prompt (prefill), the generated tokens, or both
    apply_to: Phase = Phase.both
    #: what the shift is measured against
    reference: Reference = Reference.blank
    #: which token position(s) the shift is measured at
    measure_at: MeasureAt = MeasureAt.last
    #: calibrated vector file (safetensors) for the dataset variant
    vectors: Optional[str] = None
    #: seed of the noise reference
    noise_seed: int = 0
    #: grey level (0-255) of the blank reference image when a processor is available
    blank_fill: int = 0
    #: calibration batch size
    batch_size: int = 8
    #: where sequential calibration keeps the states between layers
    calibration_store: CalibrationStore = CalibrationStore.auto
    #: refuse vector files whose model fingerprint differs (False: warn)
    strict: bool = True

    @staticmethod
    def check(cfg: Any) -> None:
        """Checks the types OmegaConf cannot express; raises ValueError with ``.key``."""
        alpha = cfg.alpha
        values = list(alpha) if not isinstance(alpha, (int, float, str)) else [alpha]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigValueError("alpha", f"alpha must be a number or a list of numbers, got {alpha!r}")
        values = check_alpha_values(values)
        negative = [v for v in values if v < 0]
        if negative:
            warnings.warn(f"cmrm.alpha is negative ({', '.join(f'{v:g}' for v in negative)}): that adds the image-induced "
                          "shift instead of removing it (inverts CMRM)", UserWarning, stacklevel=2)
        try:
            layers = parse_layers(cfg.layers)
        except ValueError as exc:
            raise ConfigValueError("layers", str(exc)) from None
        if len(values) > 1 and layers is not None and len(values) != len(layers):
            raise ConfigValueError("alpha", f"alpha has {len(values)} values but {len(layers)} layers are steered")
        from .steer import steered_positions

        try:
            steered_positions(cfg.positions.value, cfg.apply_to.value)
        except ValueError as exc:
            raise ConfigValueError("apply_to", str(exc)) from None
        if not 0 <= int(cfg.blank_fill) <= 255:
            raise ConfigValueError("blank_fill", f"blank_fill must be in 0-255, got {cfg.blank_fill}")
        if int(cfg.batch_size) < 1:
            raise ConfigValueError("batch_size", f"batch_size must be >= 1, got {cfg.batch_size}")
