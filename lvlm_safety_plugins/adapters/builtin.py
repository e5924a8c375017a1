"""Built-in plugin: registers the model adapters that ship with the package."""

from __future__ import annotations

from typing import Callable

from ..markers import hookimpl
from .hf import HFCausalLMAdapter, HFLlavaAdapter, HFLlavaNextAdapter, HFQwen2VLAdapter
from .llava_pkg import LlavaPackageAdapter


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    register(HFLlavaAdapter)
    register(HFLlavaNextAdapter)
    register(HFQwen2VLAdapter)
    register(LlavaPackageAdapter)
    register(HFCausalLMAdapter)  # last: the most general
