"""Batched generation for the evaluation harness: prompts through the processor's chat
template (when it has one), greedy decoding, answers as text.

A generator is any object with ``generate(examples) -> list[str]``,
``prompt_text(example) -> str`` (what the model is given, also part of the cache key)
and ``describe() -> dict`` (settings that change the answers, also part of the cache
key). :class:`HFGenerator` serves Hugging Face vision-language models (Llava,
LlavaNext, Qwen2-VL, ...) and text-only causal LMs; steering is installed around it by
the harness (``Runtime(recipe, model).steering()``), not by the generator.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..compat import processor_has_chat_template_api
from ..errors import ConfigError, DataError
from ..loading import open_image
from .examples import Example

#: LLaVA-1.5's conversation format, used when the processor has no chat template
DEFAULT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass
class GenerationSettings:
    """``template``: a prompt template with ``{prompt}`` (and ``<image>`` where the
    image goes; it is put first when missing, and removed for text-only items). Without
    one, the processor's chat template is used when it has one, else
    :data:`DEFAULT_TEMPLATE`. Decoding is greedy, so answers are reproducible."""

    max_new_tokens: int = 128
    batch_size: int = 8
    template: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.template is not None and "{prompt}" not in self.template:
            raise ConfigError("the prompt template must contain {prompt}")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None) or processor


def _chat_template(processor: Any) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)


def image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) and token else "<image>"


def build_prompt(processor: Any, example: Example, template: str | None = None) -> str:
    """The text the model is given for ``example`` (see :class:`GenerationSettings`)."""
    has_image = example.image is not None
    token = image_token(processor)
    if template is None and _chat_template(processor):
        if hasattr(processor, "image_processor"):
            content: Any = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": example.prompt}]
        else:
            content = example.prompt
        messages = [{"role": "user", "content": content}]
        if not processor_has_chat_template_api(processor):  # transformers < 4.43 processors
            return _tokenizer(processor).apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, chat_template=_chat_template(processor))
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = template or DEFAULT_TEMPLATE
    if token != "<image>":
        text = text.replace("<image>", token)
    text = text.replace("{prompt}", example.prompt)
    if has_image and token not in text:
        text = f"{token}\n{text}"
    if not has_image:
        text = text.replace(f"{token}\n", "").replace(token, "")
    return text


class HFGenerator:
    """Greedy batched ``model.generate`` for a Hugging Face model and its processor."""

    def __init__(self, model: Any, processor: Any, settings: GenerationSettings | None = None, model_id: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings or GenerationSettings()
        self.model_id = model_id or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)

    def describe(self) -> dict[str, Any]:
        return {"backend": "hf", "model": self.model_id, "model_class": type(self.model).__name__,
                "max_new_tokens": self.settings.max_new_tokens, "template": self.settings.template,
                "chat_template": _chat_template(self.processor) if self.settings.template is None else None,
                "decoding": "greedy"}

    def prompt_text(self, example: Example) -> str:
        return build_prompt(self.processor, example, self.settings.template)

    def _device_dtype(self) -> tuple[Any, Any]:
        param = next(self.model.parameters())
        return param.device, param.dtype

    def encode(self, texts: Sequence[str], images: Sequence[Any] = ()) -> dict[str, Any]:
        """Model inputs for ``texts`` (and PIL ``images``, one per ``<image>``): through the
        processor, left-padded, tensors on the model's device, floats in its dtype."""
        import torch

        tok = _tokenizer(self.processor)
        side = getattr(tok, "padding_side", None)
        tok.padding_side = "left"
        try:
            if hasattr(self.processor, "image_processor"):
                enc = self.processor(text=list(texts), images=list(images) or None, return_tensors="pt", padding=True)
            else:
                enc = tok(list(texts), return_tensors="pt", padding=True)
        finally:
            if side is not None:
                tok.padding_side = side
        device, dtype = self._device_dtype()
        batch = {}
        for key, value in dict(enc).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(dtype)
            batch[key] = value
        return batch

    def generate(self, examples: Sequence[Example]) -> list[str]:
        import torch

        if not examples:
            return []
        texts = [self.prompt_text(e) for e in examples]
        images = []
        for e in examples:
            if e.image is None:
                continue
            images.append(open_image(e.image, e.where or e.id) if isinstance(e.image, (str, os.PathLike)) else e.image)
        if images and not hasattr(self.processor, "image_processor"):
            raise DataError(f"{examples[0].where}: the model has no image processor but the example has an image")
        batch = self.encode(texts, images)
        tok = _tokenizer(self.processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.settings.max_new_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad)
        new = out[:, batch["input_ids"].shape[1]:].cpu()
        return [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]


def settings_dict(settings: GenerationSettings) -> dict[str, Any]:
    return asdict(settings)


__all__ = ["DEFAULT_TEMPLATE", "GenerationSettings", "HFGenerator", "build_prompt", "image_token", "settings_dict"]
