"""The model adapter interface: where things are inside a vision-language model.

Methods never reach into a model except through an adapter. Attribute paths differ
between model families and between transformers 4.x and 5.x, so adapters probe a list
of candidate paths instead of hard-coding one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..compat import (
    DECODER_LAYER_PATHS,
    FINAL_NORM_PATHS,
    IMAGE_TOKEN_KEYS,
    PROJECTOR_PATHS,
    layer_hidden,
    replace_layer_hidden,
)
from ..errors import ConfigError, DataError, LayerError, UnsupportedModelError


def get_path(root: Any, path: str) -> Any:
    """``get_path(model, "model.language_model.layers")`` or ``None`` if absent."""
    obj = root
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            # ModuleAttributeError subclasses AttributeError; some properties raise others
            return None
        if obj is None:
            return None
    return obj


def layer_owner(root: Any, paths: Sequence[str]) -> tuple[nn.Module, str] | None:
    """``(module, attribute)`` of the first of ``paths`` under ``root`` that holds a
    non-empty ``nn.ModuleList`` as a registered child, or ``None``."""
    for path in paths:
        layers = get_path(root, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            parent_path, _, attr = path.rpartition(".")
            parent = get_path(root, parent_path) if parent_path else root
            if isinstance(parent, nn.Module) and parent._modules.get(attr) is layers:
                return parent, attr
    return None


@dataclass
class SequenceLayout:
    """Where the tokens of a batch sit in the sequence the LLM decoder sees.

    All masks have shape ``[batch, llm_length]`` (the length of the hidden states at a
    decoder layer during the prefill forward, which differs from ``input_ids`` for
    models that splice image features in, such as LLaVA or transformers 4.37 Llava).
    """

    attention_mask: torch.Tensor  # bool: real tokens (text or image), not padding
    image_mask: torch.Tensor  # bool: image-feature positions
    #: long: for each decoder position, the ``input_ids`` column it came from (-1 for
    #: image features and padding); ``None`` means the identity (no splicing)
    token_index: torch.Tensor | None = None

    def map_token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Carry a bool mask over ``input_ids`` positions (e.g. the retrieved-text
        tokens) into decoder coordinates. Image features and padding are never set."""
        mask = mask.to(torch.bool)
        if self.token_index is None:
            if tuple(mask.shape) != tuple(self.attention_mask.shape):
                raise DataError(f"token mask of shape {tuple(mask.shape)} does not fit the batch {tuple(self.attention_mask.shape)}")
            return mask & self.attention_mask & ~self.image_mask
        idx = self.token_index.to(mask.device)
        picked = torch.gather(mask, 1, idx.clamp(min=0))
        return picked & (idx >= 0)

    @property
    def text_mask(self) -> torch.Tensor:
        return self.attention_mask & ~self.image_mask

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token (``[batch]``)."""
        L = self.attention_mask.shape[1]
        idx = torch.arange(L, device=self.attention_mask.device).expand_as(self.attention_mask)
        return torch.where(self.attention_mask, idx, torch.full_like(idx, -1)).max(dim=1).values


def padding_side(attention_mask: torch.Tensor) -> str:
    """``"left"`` if any row starts with padding, else ``"right"``."""
    if attention_mask.shape[1] and bool((attention_mask[:, 0] == 0).any()):
        return "left"
    return "right"


def repad(rows: Sequence[torch.Tensor], pad_value: int | float, side: str) -> torch.Tensor:
    """Stack 1-D tensors of different lengths, padding on ``side``."""
    width = max((int(r.shape[0]) for r in rows), default=0)
    out = []
    for r in rows:
        pad = torch.full((width - r.shape[0], *r.shape[1:]), pad_value, dtype=r.dtype, device=r.device)
        out.append(torch.cat([pad, r]) if side == "left" else torch.cat([r, pad]))
    return torch.stack(out) if out else torch.empty(0, 0)


class ModelAdapter:
    """Answers where things are in one model family.

    Subclasses set ``family`` (a display name) and ``model_classes`` (class names the
    adapter handles; a subclass of a listed class matches too), and implement what
    differs. The built-in implementations probe ``layer_paths`` and
    ``projector_paths`` in order.
    """

    family: ClassVar[str] = "?"
    model_classes: ClassVar[tuple[str, ...]] = ()
    layer_paths: ClassVar[tuple[str, ...]] = DECODER_LAYER_PATHS  # 4.x and 5.x layouts
    projector_paths: ClassVar[tuple[str, ...]] = PROJECTOR_PATHS
    #: batch keys that carry images, removed for the text-only variant
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    pixel_key: ClassVar[str] = "pixel_values"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        names = {k.__name__ for k in type(model).__mro__}
        return bool(names & set(cls.model_classes))

    # -- structure --------------------------------------------------------------

    def _layer_owner(self) -> tuple[nn.Module, str] | None:
        """``(module, attribute)`` holding the decoder layers, or ``None``: probes
        :attr:`layer_paths` in order (adapters with a better way override this)."""
        return layer_owner(self.model, self.layer_paths)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""
        owner, attr = self.decoder_owner
        return owner._modules[attr]  # type: ignore[return-value]

    @property
    def decoder_owner(self) -> tuple[nn.Module, str]:
        """The module that holds :attr:`decoder_layers` and the attribute name it holds
        them under (``(language_model, "layers")``)."""
        found = self._layer_owner()
        if found is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: no decoder layers found at any of {', '.join(self.layer_paths)}"
            )
        return found

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def text_config(self) -> Any:
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def projector(self) -> nn.Module:
        """The vision-to-language projector (what TGA trains)."""
        for path in self.projector_paths:
            module = get_path(self.model, path)
            if isinstance(module, nn.Module):
                return module
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: no projector found at any of {', '.join(self.projector_paths)}"
        )

    @property
    def projector_extras(self) -> dict[str, nn.Module]:
        """Modules besides :attr:`projector` whose outputs also reach the LLM, by name
        (Qwen3-VL: ``deepstack.<i>``, the deepstack merger added after decoder layer
        ``i``); ``ForwardCapture(..., projector=True)`` records them too
        (:attr:`~lvlm_safety_plugins.capture.ForwardCapture.projector_outputs`). None here."""
        return {}

    def marker_token_ids(self) -> list[int]:
        """Tokens that bracket an image in ``input_ids`` (dropped from the text-only
        variant and from TGA's caption context). None here."""
        return []

    def check_image_state_layers(self, layers: Sequence[int]) -> None:
        """Raise a :class:`~lvlm_safety_plugins.errors.LayerError` naming the layers of
        ``layers`` whose image states do not hold what reaches the LLM at the image
        positions (Qwen3-VL: the deepstack layers); every layer is fine here. Called by
        ``ForwardCapture`` and ``lvlm-safety analyze`` before image states are read."""

    final_norm_paths: ClassVar[tuple[str, ...]] = FINAL_NORM_PATHS

    @property
    def final_norm(self) -> nn.Module:
        """The LLM's final normalisation before the LM head (for the logit lens)."""
        for path in self.final_norm_paths:
            module = get_path(self.model, path)
            if isinstance(module, nn.Module):
                return module
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: no final norm found at any of {', '.join(self.final_norm_paths)}"
        )

    @property
    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, nn.Module):
            raise UnsupportedModelError(f"{type(self.model).__name__}: no output embeddings (LM head)")
        return head

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for key in IMAGE_TOKEN_KEYS:
            value = getattr(cfg, key, None)
            if value is not None:
                return int(value)
        raise UnsupportedModelError(f"{type(self.model).__name__}: the config names no image token id")

    @property
    def pad_token_id(self) -> int:
        for cfg in (self.model.config, self.text_config):
            value = getattr(cfg, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Validate layer ids (``None``: all); negative ids count from the end. Two ids
        naming the same layer (``1`` and ``-3`` of 4) are an error naming both."""
        n = self.num_layers
        if layers is None:
            return list(range(n))
        out: list[int] = []
        given: dict[int, Any] = {}
        for layer in layers:
            idx = int(layer) + n if int(layer) < 0 else int(layer)
            if not 0 <= idx < n:
                raise LayerError(f"layer {layer} does not exist: {type(self.model).__name__} has {n} decoder layers (0-{n - 1})")
            if idx in given:
                raise LayerError(f"layers {given[idx]} and {layer} both name decoder layer {idx} of "
                                 f"{type(self.model).__name__} ({n} layers): each layer can be selected once")
            given[idx] = layer
            out.append(idx)
        return out

    # -- batches -----------------------------------------------------------------

    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of image placeholder tokens in ``input_ids``."""
        return input_ids == self.image_token_id

    def layout(self, batch: Mapping[str, Any]) -> SequenceLayout:
        """Image and padding positions in the LLM's sequence for a prefill ``batch``."""
        input_ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn.bool()
        return SequenceLayout(attention_mask=attn, image_mask=self.image_token_positions(input_ids) & attn)

    def image_token_mask(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Bool ``[batch, llm_length]`` mask of the image-feature positions."""
        return self.layout(batch).image_mask

    def _drop_tokens(self, batch: Mapping[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        attn = torch.ones_like(input_ids) if attn is None else attn
        side = padding_side(attn)
        keep = ~drop
        out = {k: v for k, v in batch.items() if k not in self.image_keys}
        out["input_ids"] = repad([r[k] for r, k in zip(input_ids, keep)], self.pad_token_id, side)
        out["attention_mask"] = repad([r[k] for r, k in zip(attn, keep)], 0, side)
        if "labels" in batch and batch["labels"] is not None:
            out["labels"] = repad([r[k] for r, k in zip(batch["labels"], keep)], -100, side)
        for key in ("position_ids", "token_type_ids", "mm_token_type_ids"):
            out.pop(key, None)
        return out

    def text_only_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The same prompts with the image removed: image tokens dropped, re-padded on
        the same side, image tensors removed (CMRM's ``reference: none``)."""
        return self._drop_tokens(batch, self.image_token_positions(batch["input_ids"]))

    def blank_image_batch(
        self,
        batch: Mapping[str, Any],
        kind: str = "blank",
        *,
        seed: int = 0,
        image_processor: Any = None,
        fill: int = 0,
    ) -> dict[str, Any]:
        """The same prompts with a reference image instead of the real one.

        ``kind="blank"``: a constant image. With ``image_processor`` given, an image
        filled with ``fill`` (0-255) is run through it, as the model would see it;
        without, the pixel tensor is all zeros, which after the usual mean/std
        normalisation is an image of the mean colour. ``kind="noise"``: seeded standard
        Gaussian noise in the normalised pixel space.
        """
        key = self.pixel_key
        if key not in batch or batch[key] is None:
            raise DataError(f"the batch has no {key!r}: there is no image to replace")
        pixels = batch[key]
        out = dict(batch)
        if kind == "blank":
            if image_processor is not None:
                out[key] = self._processed_constant(pixels, image_processor, fill)
            else:
                out[key] = torch.zeros_like(pixels)
        elif kind == "noise":
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            out[key] = torch.randn(pixels.shape, generator=gen, dtype=torch.float32).to(pixels.device, pixels.dtype)
        else:
            raise ConfigError(f"unknown reference image kind {kind!r}; valid: blank, noise")
        return out

    def _processed_constant(self, pixels: torch.Tensor, image_processor: Any, fill: int) -> torch.Tensor:
        from PIL import Image

        h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
        image = Image.new("RGB", (w, h), (fill, fill, fill))
        processed = image_processor(images=image, return_tensors="pt")["pixel_values"]
        single = processed[0]
        if single.shape != pixels.shape[1:]:
            raise DataError(
                f"the image processor made pixel values of shape {tuple(single.shape)}, the batch has {tuple(pixels.shape[1:])}"
            )
        return single.to(pixels.device, pixels.dtype).expand_as(pixels).clone()

    def set_trainable(self, part: str) -> list[nn.Parameter]:
        """Freeze every parameter but ``part``'s: ``"projector"`` (LLaVA's pretrain
        stage) or ``"llm"`` (decoder layers, final norm, embeddings and LM head).
        Returns the trainable parameters."""
        if part == "projector":
            modules = [self.projector]
        elif part == "llm":
            modules = [self.decoder_layers, self.final_norm, self.lm_head, self.model.get_input_embeddings()]
        else:
            raise ConfigError(f"part must be 'projector' or 'llm', got {part!r}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for module in modules:
            for p in module.parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def describe(self) -> dict[str, Any]:
        """A summary: family, class, layer count, hidden size, projector class."""
        return {
            "family": self.family,
            "model_class": type(self.model).__name__,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "projector": type(self.projector).__name__,
        }


__all__ = [
    "ModelAdapter",
    "SequenceLayout",
    "get_path",
    "layer_hidden",
    "layer_owner",
    "padding_side",
    "repad",
    "replace_layer_hidden",
]
