"""Adapters for Hugging Face transformers vision-language models (4.37.x and 5.x)."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from .. import compat
from ..errors import ConfigError, DataError, LayerError, UnsupportedModelError
from .base import ModelAdapter, SequenceLayout, layer_owner, padding_side, repad


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

    def marker_token_ids(self) -> list[int]:
        cfg = self.model.config
        return [int(t) for t in (getattr(cfg, k, None) for k in ("vision_start_token_id", "vision_end_token_id"))
                if t is not None]

    def text_only_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        drop = self.image_token_positions(ids)
        for tok in self.marker_token_ids():
            drop = drop | (ids == tok)
        return self._drop_tokens(batch, drop)


# -- the generic adapter and the families with their own wiring (issue 30) ---------------------


class HFVisionLanguageAdapter(ModelAdapter):
    """Any HF ``*ForConditionalGeneration`` whose processor writes one placeholder token
    per image feature into ``input_ids`` (the model puts the projector's output there).

    - decoder layers through the model's own accessors (``get_decoder()``, then
      ``language_model``; :func:`~lvlm_safety_plugins.compat.language_model_of`), path
      probing only as a fallback;
    - the image token from the config (:data:`~lvlm_safety_plugins.compat.IMAGE_TOKEN_KEYS`);
    - the projector from :data:`~lvlm_safety_plugins.compat.VLM_PROJECTOR_PATHS`;
    - the text-only variant drops the placeholders and the start/end markers the config
      names (:data:`~lvlm_safety_plugins.compat.IMAGE_MARKER_KEYS`, plus a list the user
      may set as ``config.image_marker_token_ids``), and carries the token types of the
      kept columns;
    - ``blank``/``noise`` reference images keep the batch's pixel layout (one image per
      row or flattened patches), through the model's own image processor when given.

    Classes not listed in :data:`TESTED_CLASSES` are served with a one-time warning.
    """

    family = "HF vision-language (generic)"
    model_classes = ("*ForConditionalGeneration",)
    projector_paths = compat.VLM_PROJECTOR_PATHS
    image_keys = compat.VLM_IMAGE_KEYS
    #: the classes tests/test_families.py runs (the named families' subclasses add theirs)
    TESTED_CLASSES: ClassVar[tuple[str, ...]] = (
        "LlavaOnevisionForConditionalGeneration", "Mistral3ForConditionalGeneration",
        "AyaVisionForConditionalGeneration", "InternVLForConditionalGeneration",
        "Llama4ForConditionalGeneration", "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
    )
    _warned: ClassVar[set[str]] = set()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        tested = {c for k in type(self).__mro__ for c in getattr(k, "TESTED_CLASSES", ())} | set(type(self).model_classes)
        if name not in tested and name not in HFVisionLanguageAdapter._warned:
            HFVisionLanguageAdapter._warned.add(name)
            import warnings

            warnings.warn(f"{name} is served by the generic vision-language adapter but is not among the tested "
                          "families (docs/adapters.md): check that its processor writes one placeholder per image "
                          "feature before trusting image positions", UserWarning, stacklevel=3)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if cls.model_classes != HFVisionLanguageAdapter.model_classes:
            return super().matches(model)
        if not type(model).__name__.endswith("ForConditionalGeneration"):
            return False
        cfg = getattr(model, "config", None)
        if not any(getattr(cfg, k, None) is not None for k in compat.IMAGE_TOKEN_KEYS):
            return False
        return compat.language_model_of(model) is not None

    # -- structure --------------------------------------------------------------

    @property
    def text_decoder(self) -> nn.Module | None:
        """The text decoder the model's own accessors return (``get_decoder()``)."""
        return compat.language_model_of(self.model)

    def _layer_owner(self) -> tuple[nn.Module, str] | None:
        lm = self.text_decoder
        found = layer_owner(lm, compat.DECODER_LAYER_SUBPATHS) if lm is not None else None
        return found or super()._layer_owner()

    @property
    def final_norm(self) -> nn.Module:
        owner, _ = self.decoder_owner
        norm = getattr(owner, "norm", None)
        return norm if isinstance(norm, nn.Module) else super().final_norm

    def marker_token_ids(self) -> list[int]:
        """Tokens that bracket an image (dropped with the placeholders from the
        text-only variant): the config's start/end fields, and
        ``config.image_marker_token_ids`` if set."""
        cfg = self.model.config
        found = [getattr(cfg, k, None) for k in compat.IMAGE_MARKER_KEYS]
        found += list(getattr(cfg, "image_marker_token_ids", None) or ())
        out: list[int] = []
        for tok in found:
            if tok is not None and int(tok) not in out and int(tok) != self.image_token_id:
                out.append(int(tok))
        return out

    #: decoder-layer attributes that normalise the MLP's output before the residual
    #: addition (Gemma 2/3/4's sandwich norm): a bias in ``down_proj`` is then not an
    #: addition to the residual stream
    POST_MLP_NORMS: ClassVar[tuple[str, ...]] = ("post_feedforward_layernorm",)

    def fold_refusal(self) -> str | None:
        """Why CMRM vectors cannot be folded into this model's MLP output biases, or
        ``None``."""
        layer = self.decoder_layers[0]
        for name in self.POST_MLP_NORMS:
            if isinstance(getattr(layer, name, None), nn.Module):
                return (f"{type(self.model).__name__} normalises the MLP's output ({name}) before adding it to the "
                        "residual stream, so a bias in down_proj is not the steering vector")
        return None

    # -- batches -----------------------------------------------------------------

    def _drop_tokens(self, batch: Mapping[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        out = super()._drop_tokens(batch, drop)
        attn = batch.get("attention_mask")
        side = "right" if attn is None else padding_side(attn)
        for key in compat.TOKEN_TYPE_KEYS:  # the kept columns' token types, never recomputed
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(drop.shape):
                out[key] = repad([r[~d] for r, d in zip(value, drop)], 0, side)
        return out

    def text_only_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        drop = self.image_token_positions(ids)
        for tok in self.marker_token_ids():
            drop = drop | (ids == tok)
        return self._drop_tokens(batch, drop)

    def blank_image_batch(self, batch: Mapping[str, Any], kind: str = "blank", *, seed: int = 0,
                          image_processor: Any = None, fill: int = 0) -> dict[str, Any]:
        """As :meth:`ModelAdapter.blank_image_batch`, for any pixel layout: with
        ``image_processor``, a constant image of grey level ``fill`` is run through it
        and the batch's pixel tensor is filled, in the batch's own layout, with what the
        processor made of it (:func:`constant_pixels`)."""
        if kind != "blank" or image_processor is None:
            return super().blank_image_batch(batch, kind, seed=seed, image_processor=None, fill=fill)
        key = self.pixel_key
        if key not in batch or batch[key] is None:
            raise DataError(f"the batch has no {key!r}: there is no image to replace")
        out = dict(batch)
        out[key] = constant_pixels(batch[key], image_processor, fill)
        return out


def constant_pixels(pixels: torch.Tensor, image_processor: Any, fill: int) -> torch.Tensor:
    """A tensor shaped like ``pixels`` holding a constant image of grey level ``fill``
    as ``image_processor`` preprocesses it. Every resize, crop, tile or patch of a
    constant image is constant, so the layout of ``pixels`` is kept: channels-first
    images ``[..., 3, H, W]`` get the processor's per-channel values; flattened patches
    ``[..., patch_dim]`` (Qwen-style, Gemma 4, Molmo2) get the processor's own first
    patch vector, whatever order it flattens channels in."""
    from PIL import Image

    image = Image.new("RGB", (224, 224), (fill, fill, fill))
    processed = image_processor(images=image, return_tensors="pt")["pixel_values"]
    if isinstance(processed, (list, tuple)):
        processed = processed[0]
    processed = torch.as_tensor(processed).float()
    if pixels.dim() >= 3 and pixels.shape[-3] == 3 and processed.dim() >= 3 and processed.shape[-3] == 3:
        centre = processed[..., :, processed.shape[-2] // 2, processed.shape[-1] // 2].reshape(-1, 3)[0]
        view = [1] * pixels.dim()
        view[-3] = 3
        return centre.reshape(view).to(pixels.device, pixels.dtype).expand_as(pixels).clone()
    if pixels.dim() in (2, 3) and processed.shape[-1] == pixels.shape[-1]:
        patch = processed.reshape(-1, processed.shape[-1])[0]
        return patch.to(pixels.device, pixels.dtype).expand_as(pixels).clone()
    raise DataError(f"the image processor made pixel values of shape {tuple(processed.shape)}, which do not fit the "
                    f"batch's {tuple(pixels.shape)} as channels-first images or flattened patches")


#: processor attributes naming tokens that frame an image but are not in the model config
#: (Idefics3/SmolVLM ``fake_image_token``/``global_image_tag``, Mistral3/Pixtral
#: ``image_break_token``/``image_end_token``, Llama 4 tile separators and ``<|image|>``;
#: read from 4.57 and 5.25)
PROCESSOR_MARKER_ATTRIBUTES = (
    "fake_image_token", "global_image_tag", "image_break_token", "image_end_token", "image_start_token",
    "boi_token", "eoi_token", "start_of_img_token", "end_of_img_token", "tile_token", "tile_global_token",
)


def record_image_markers(model: nn.Module, processor: Any) -> list[int]:
    """Write the ids of the tokens the processor puts around an image (and the config
    does not name) to ``model.config.image_marker_token_ids``, so the text-only variant
    drops them too. Returns them. Without a tokenizer on ``processor`` nothing is
    recorded."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return []
    found: list[int] = list(getattr(model.config, "image_marker_token_ids", None) or ())
    unk = getattr(tokenizer, "unk_token_id", None)
    image_ids = {getattr(model.config, k, None) for k in compat.IMAGE_TOKEN_KEYS}
    for attr in PROCESSOR_MARKER_ATTRIBUTES:
        token = getattr(processor, attr, None)
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(str(token))
        if isinstance(tid, int) and tid != unk and tid not in image_ids and tid not in found:
            found.append(tid)
    if found:
        model.config.image_marker_token_ids = found
    return found


class HFQwen3VLAdapter(HFVisionLanguageAdapter):
    """``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``.

    Deepstack: after each of the first ``k = len(vision_config.deepstack_visual_indexes)``
    decoder layers the model adds more visual features (``visual.deepstack_merger_list``)
    to the hidden states at the image positions, outside the layer's ``forward``. So:

    - CMRM measures at text positions (the last prompt token or the text mean), which
      deepstack never writes: its shift is complete at every layer. Its steering edit is
      an addition, which commutes with the injection: steering layer ``l`` gives the same
      residual stream as steering after the injection.
    - States pooled over image positions (TGA's image term, ``ForwardCapture`` of image
      states) at layers ``< k`` would miss that layer's injection: refused
      (:meth:`check_image_state_layers`).
    - the projector is ``visual.merger`` (what enters at the embeddings); the deepstack
      mergers are :attr:`projector_extras` (``deepstack.<i>``), captured with it, and
      ``set_trainable("projector")`` trains them too, since their output reaches the LLM
      as well.
    """

    family = "HF Qwen3-VL (deepstack)"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    @property
    def deepstack_layers(self) -> int:
        return compat.deepstack_layer_count(self.model)

    def check_image_state_layers(self, layers: Sequence[int]) -> None:
        k = self.deepstack_layers
        early = [int(l) for l in layers if int(l) < k]
        if early:
            raise LayerError(
                f"{type(self.model).__name__}: layers {early} get deepstack visual features added at the image "
                f"positions after their forward (layers 0-{k - 1}), so image states read there miss them; "
                f"pool image states at layers >= {k}"
            )

    @property
    def projector_extras(self) -> dict[str, nn.Module]:
        """``deepstack.<i>``: ``visual.deepstack_merger_list[i]``, whose output is added
        at the image positions after decoder layer ``i``."""
        mergers = compat.deepstack_mergers(self.model)
        return {} if mergers is None else {f"deepstack.{i}": m for i, m in enumerate(mergers)}

    def set_trainable(self, part: str) -> list[nn.Parameter]:
        params = super().set_trainable(part)
        mergers = compat.deepstack_mergers(self.model)
        if part == "projector" and mergers is not None:
            for p in mergers.parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    params.append(p)
        return params


class HFIdefics3Adapter(HFVisionLanguageAdapter):
    """``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``: the
    decoder is ``model.text_model`` (4.57's ``get_decoder()`` returns the whole
    multimodal model), the projector ``model.connector`` (pixel shuffle + linear);
    pixel values are ``[batch, tiles, 3, H, W]`` with a ``pixel_attention_mask``."""

    family = "HF Idefics3 / SmolVLM"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    layer_paths = ("model.text_model.layers",)
    projector_paths = ("model.connector", "connector")

    def text_only_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if not getattr(self.model.config, "image_marker_token_ids", None):
            raise ConfigError(
                f"{type(self.model).__name__}: the ids of <fake_token_around_image> and <global-img> are not in the "
                "config, so the text-only variant would keep them: load the model with load_model_and_processor, or "
                "call lvlm_safety_plugins.adapters.hf.record_image_markers(model, processor) (or set "
                "model.config.image_marker_token_ids)"
            )
        return super().text_only_batch(batch)

    def blank_image_batch(self, batch: Mapping[str, Any], kind: str = "blank", *, seed: int = 0,
                          image_processor: Any = None, fill: int = 0) -> dict[str, Any]:
        """As the generic one, but a ``blank`` image needs ``image_processor``: these
        models skip an all-zero pixel tensor as a padding image."""
        if kind == "blank" and image_processor is None:
            raise ConfigError(
                f"{type(self.model).__name__} skips an all-zero pixel tensor as a padding image, so a blank reference "
                "image needs the model's image processor (pass processor=/image_processor=)"
            )
        return super().blank_image_batch(batch, kind, seed=seed, image_processor=image_processor, fill=fill)


class HFGemmaVisionAdapter(HFVisionLanguageAdapter):
    """Gemma 3, Gemma 4 and PaliGemma: the image block attends bidirectionally, by the
    batch's token types (``token_type_ids``; Gemma 4 ``mm_token_type_ids``). Steering
    only adds to hidden states and never touches the token types; the text-only variant
    carries the kept columns' token types (so PaliGemma's prefix stays a prefix) and
    drops ``<start_of_image>``/``<end_of_image>`` (Gemma 3/4 ``boi``/``eoi``). Gemma 4's
    projector is ``model.embed_vision``."""

    family = "HF Gemma 3/4, PaliGemma (image blocks)"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma4ForConditionalGeneration",
                     "PaliGemmaForConditionalGeneration")


class HFMistral3Adapter(HFVisionLanguageAdapter):
    """``Mistral3ForConditionalGeneration``: the processor writes ``[IMG_BREAK]`` after
    each row of image tokens and ``[IMG_END]`` after the last; the config names neither.
    The text-only variant drops them: ``config.image_break_token_id`` /
    ``image_end_token_id`` if set, else the Tekken tokenizer's ids (``[IMG]`` 10,
    ``[IMG_BREAK]`` 12, ``[IMG_END]`` 13) when the image token is 10; with another image
    token and neither field set, the text-only variant is refused."""

    family = "HF Mistral3"
    model_classes = ("Mistral3ForConditionalGeneration",)
    TEKKEN_MARKERS: ClassVar[dict[int, tuple[int, int]]] = {10: (12, 13)}

    def marker_token_ids(self) -> list[int]:
        found = super().marker_token_ids()
        cfg = self.model.config
        if getattr(cfg, "image_break_token_id", None) is None or getattr(cfg, "image_end_token_id", None) is None:
            tekken = self.TEKKEN_MARKERS.get(self.image_token_id)
            if tekken is None and not getattr(cfg, "image_marker_token_ids", None):
                raise ConfigError(
                    f"{type(self.model).__name__}: image token {self.image_token_id} is not Tekken's [IMG] (10), so the "
                    "[IMG_BREAK]/[IMG_END] ids are unknown: set model.config.image_break_token_id and "
                    "image_end_token_id (or image_marker_token_ids) for the text-only variant"
                )
            found += [t for t in (tekken or ()) if t not in found]
        return found


class HFOvis2Adapter(HFVisionLanguageAdapter):
    """``Ovis2ForConditionalGeneration``: besides the placeholders, the model writes
    visual embeddings (``visual_embeddings_table``, the projector) at its visual
    indicator tokens (``config.visual_indicator_token_ids``), so those are image
    positions too (steered, pooled and dropped from the text-only variant as such)."""

    family = "HF Ovis2 (indicator tokens)"
    model_classes = ("Ovis2ForConditionalGeneration",)
    projector_paths = ("model.visual_embeddings_table", "visual_embeddings_table")

    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.image_token_id
        for tok in getattr(self.model.config, "visual_indicator_token_ids", None) or ():
            mask = mask | (input_ids == int(tok))
        return mask


class HFMolmo2Adapter(HFVisionLanguageAdapter):
    """``Molmo2ForConditionalGeneration``: the placeholder is ``image_patch_id`` and the
    model *adds* the pooled features to the placeholders' embeddings (the positions are
    the same; what lands there is embedding + projector output). The projector is
    ``multi_modal_projector.image_projector`` (the MLP after the attention pooling,
    whose output is what is added). The text-only variant
    drops the placeholders and the image start/end markers (``image_start_token_id``,
    ``low_res_image_start_token_id``, ``image_end_token_id``)."""

    family = "HF Molmo2 (added features)"
    model_classes = ("Molmo2ForConditionalGeneration",)
    #: the projector's last part, whose tensor output is what is added at the
    #: placeholders (``multi_modal_projector`` itself returns a ``ModelOutput`` and
    #: holds the attention pooling too)
    projector_paths = ("model.multi_modal_projector.image_projector", "multi_modal_projector.image_projector")


class RefusedModelAdapter(ModelAdapter):
    """Classes that cannot be served right: matching one raises
    :class:`UnsupportedModelError` naming the class and why (never a silent
    approximation)."""

    family = "refused (cross-attention)"
    model_classes = ("MllamaForConditionalGeneration",)
    REASONS: ClassVar[dict[str, str]] = {
        "MllamaForConditionalGeneration": (
            "Mllama (Llama 3.2 Vision) brings the image in through cross-attention layers: the decoder's sequence has "
            "no image positions (its one <|image|> token is text), so image masks, image-position steering, TGA's "
            "image states and the projector's landing positions do not exist. Serving it needs a cross-attention "
            "formulation (CMRM's shift on the text positions with and without the image's cross-attention, TGA's "
            "pair term on the cross-attention outputs), which is not implemented (docs/adapters.md)"
        ),
    }

    def __init__(self, model: nn.Module) -> None:
        name = next((k.__name__ for k in type(model).__mro__ if k.__name__ in self.REASONS), type(model).__name__)
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {self.REASONS.get(name, 'refused')}")


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


__all__ = [
    "HFCausalLMAdapter", "HFGemmaVisionAdapter", "HFIdefics3Adapter", "HFLlavaAdapter", "HFLlavaNextAdapter",
    "HFMistral3Adapter", "HFMolmo2Adapter", "HFOvis2Adapter", "HFQwen2VLAdapter", "HFQwen3VLAdapter",
    "HFVisionLanguageAdapter", "PROCESSOR_MARKER_ATTRIBUTES", "RefusedModelAdapter", "constant_pixels",
    "record_image_markers",
]
