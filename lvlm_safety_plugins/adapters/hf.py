"""Adapters for Hugging Face transformers vision-language models (4.37.x and 5.x)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import compat
from ..errors import UnsupportedModelError
from .base import ModelAdapter, SequenceLayout


class HFLlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration``.

    transformers 5.x (and late 4.x) processors expand ``<image>`` into one placeholder
    per image feature, so image positions are the placeholder positions. Up to 4.49,
    with one ``<image>`` token per image, the model splices the features in itself
    (:func:`lvlm_safety_plugins.compat.llava_splices_image_features`), which lengthens
    the sequence; the layout then reproduces that splice arithmetic, including 4.37's
    left-padding rule.
    """

    family = "HF Llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def patches_per_image(self) -> int:
        vc = self.model.config.vision_config
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2
        if getattr(self.model.config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return n

    def _splices_internally(self, input_ids: torch.Tensor) -> bool:
        if not compat.llava_splices_image_features(self.model):
            return False
        per_row = self.image_token_positions(input_ids).sum(dim=1)
        return bool(per_row.max() > 0) and int(per_row.max()) < self.patches_per_image

    def layout(self, batch: Mapping[str, Any]) -> SequenceLayout:
        input_ids = batch["input_ids"]
        if not self._splices_internally(input_ids):
            return super().layout(batch)
        attn = batch.get("attention_mask")
        attn = torch.ones_like(input_ids) if attn is None else attn
        special = self.image_token_positions(input_ids)
        P = self.patches_per_image
        B, T = input_ids.shape
        max_len = int(special.sum(dim=1).max()) * (P - 1) + T
        new_pos = torch.cumsum(special.long() * (P - 1) + 1, dim=-1) - 1
        nb_pad = max_len - 1 - new_pos[:, -1]
        pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else -1
        if not bool((input_ids[:, -1] == pad_id).any()):  # the 4.37 left-padding rule
            new_pos = new_pos + nb_pad[:, None]
        new_attn = torch.zeros(B, max_len, dtype=torch.bool, device=input_ids.device)
        image = torch.zeros_like(new_attn)
        token_index = torch.full((B, max_len), -1, dtype=torch.long, device=input_ids.device)
        rows, cols = torch.where(~special)
        new_attn[rows, new_pos[rows, cols]] = attn[rows, cols].bool()
        token_index[rows, new_pos[rows, cols]] = torch.where(attn[rows, cols].bool(), cols, torch.full_like(cols, -1))
        rows, cols = torch.where(special)
        for offset in range(P):
            image[rows, new_pos[rows, cols] - offset] = True
        return SequenceLayout(attention_mask=new_attn | image, image_mask=image, token_index=token_index)


class HFLlavaNextAdapter(ModelAdapter):
    """``LlavaNextForConditionalGeneration`` (placeholders expanded by the processor)."""

    family = "HF LlavaNext"
    model_classes = ("LlavaNextForConditionalGeneration",)
    image_keys = ("pixel_values", "image_sizes")


class HFQwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

    The text-only variant drops the ``<|vision_start|>``/``<|vision_end|>`` markers
    together with the image placeholders.
    """

    family = "HF Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    projector_paths = compat.QWEN2VL_PROJECTOR_PATHS
    image_keys = ("pixel_values", "image_grid_thw")

    def text_only_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        cfg = self.model.config
        drop = self.image_token_positions(ids)
        for key in ("vision_start_token_id", "vision_end_token_id"):
            tok = getattr(cfg, key, None)
            if tok is not None:
                drop = drop | (ids == int(tok))
        return self._drop_tokens(batch, drop)




class HFCausalLMAdapter(ModelAdapter):
    """A text-only decoder LLM (``LlamaForCausalLM``, ``MistralForCausalLM``,
    ``Qwen2ForCausalLM``, ... any ``*ForCausalLM`` with ``model.layers``).

    For the LLM side of analyses (the text safety mechanism, logit lens) and for
    steering a plain LLM with the same machinery. It has no image positions and no
    projector. Tried after every multimodal adapter.
    """

    family = "HF causal LM (text only)"
    model_classes = ("*ForCausalLM",)
    layer_paths = ("model.layers", "transformer.h", "model.decoder.layers")
    projector_paths = ()
    image_keys = ()

    @classmethod
    def matches(cls, model: Any) -> bool:
        if not type(model).__name__.endswith("ForCausalLM"):
            return False
        from .base import get_path

        return any(isinstance(get_path(model, p), torch.nn.ModuleList) for p in cls.layer_paths)

    @property
    def image_token_id(self) -> int:
        return -1  # no token id is negative: nothing is an image placeholder

    def blank_image_batch(self, batch: Mapping[str, Any], kind: str = "blank", **kwargs: Any) -> dict[str, Any]:
        raise UnsupportedModelError(f"{type(self.model).__name__} is a text-only model: it takes no image")


__all__ = ["HFCausalLMAdapter", "HFLlavaAdapter", "HFLlavaNextAdapter", "HFQwen2VLAdapter"]
