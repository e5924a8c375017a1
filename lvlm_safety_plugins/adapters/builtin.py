"""Built-in plugin: registers the model adapters that ship with the package."""

from __future__ import annotations

from typing import Callable

from ..markers import hookimpl
from .hf import (
    HFCausalLMAdapter,
    HFGemmaVisionAdapter,
    HFIdefics3Adapter,
    HFLlavaAdapter,
    HFLlavaNextAdapter,
    HFMistral3Adapter,
    HFMolmo2Adapter,
    HFOvis2Adapter,
    HFQwen2VLAdapter,
    HFQwen3VLAdapter,
    HFVisionLanguageAdapter,
    RefusedModelAdapter,
)
from .llava_pkg import LlavaPackageAdapter


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    register(HFLlavaAdapter)
    register(HFLlavaNextAdapter)
    register(HFQwen2VLAdapter)
    register(HFQwen3VLAdapter)
    register(HFIdefics3Adapter)
    register(HFGemmaVisionAdapter)
    register(HFMistral3Adapter)
    register(HFOvis2Adapter)
    register(HFMolmo2Adapter)
    register(RefusedModelAdapter)  # Mllama: refused by name with the reason
    register(LlavaPackageAdapter)
    register(HFVisionLanguageAdapter)  # any other *ForConditionalGeneration with an image token
    register(HFCausalLMAdapter)  # last: the most general
