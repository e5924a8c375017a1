"""Adapter for the LLaVA framework's own models (haotian-liu/LLaVA, PyPI ``llava-torch``).

``LlavaLlamaForCausalLM.prepare_inputs_labels_for_multimodal`` removes padding, splices
the image features in at every ``IMAGE_TOKEN_INDEX`` (-200), truncates to
``tokenizer_model_max_length`` and pads again on ``tokenizer_padding_side``. The layout
here reproduces that, so image positions are known in LLaVA's expanded sequence. Only
the ``flat`` patch merge (LLaVA-1.5) has a fixed number of features per image; ``anyres``
(LLaVA-1.6) is refused with a clear error.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import UnsupportedModelError
from .base import ModelAdapter, SequenceLayout, repad

try:  # pragma: no cover - depends on whether llava is installed
    from llava.constants import IMAGE_TOKEN_INDEX as _IMAGE_TOKEN_INDEX
except Exception:  # noqa: BLE001 - llava is optional
    _IMAGE_TOKEN_INDEX = -200


class LlavaPackageAdapter(ModelAdapter):
    """``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` from the ``llava`` package."""

    family = "LLaVA (llava package)"
    model_classes = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")
    layer_paths = ("model.layers",)
    projector_paths = ("model.mm_projector",)
    image_keys = ("images", "image_sizes")
    pixel_key = "images"

    @property
    def image_token_id(self) -> int:
        return int(_IMAGE_TOKEN_INDEX)

    @property
    def pad_token_id(self) -> int:
        value = getattr(self.model.config, "pad_token_id", None)
        return int(value) if value is not None else 0

    @property
    def patches_per_image(self) -> int:
        merge = getattr(self.model.config, "mm_patch_merge_type", "flat")
        if merge != "flat":
            raise UnsupportedModelError(
                f"LLaVA mm_patch_merge_type={merge!r}: only 'flat' (LLaVA-1.5) has a fixed number of image features per image"
            )
        tower = self.model.get_vision_tower()
        if tower is None:
            raise UnsupportedModelError("this LLaVA model has no vision tower loaded")
        return int(tower.num_patches)

    def layout(self, batch: Mapping[str, Any]) -> SequenceLayout:
        input_ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn.bool()
        P = self.patches_per_image
        max_len = getattr(self.model.config, "tokenizer_model_max_length", None)
        side = getattr(self.model.config, "tokenizer_padding_side", "right")
        rows, sources = [], []
        for ids, keep in zip(input_ids, attn):
            cols = torch.nonzero(keep).flatten()
            ids = ids[keep]
            is_image = ids == self.image_token_id
            # every text token gives one position, every image token gives P positions
            counts = torch.where(is_image, torch.full_like(ids, P), torch.ones_like(ids))
            row = torch.repeat_interleave(is_image, counts)
            src = torch.repeat_interleave(torch.where(is_image, torch.full_like(cols, -1), cols), counts)
            if max_len is not None:
                row, src = row[: int(max_len)], src[: int(max_len)]
            rows.append(row)
            sources.append(src)
        image = repad(rows, False, side)
        real = repad([torch.ones_like(r) for r in rows], False, side)
        token_index = repad(sources, -1, side)
        return SequenceLayout(attention_mask=real, image_mask=image & real, token_index=token_index)


__all__ = ["LlavaPackageAdapter"]
