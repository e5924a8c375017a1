"""Model adapters: one small class per model family."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError
from .base import ModelAdapter, SequenceLayout, layer_hidden, replace_layer_hidden

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..plugins import SafetyPluginManager


def get_adapter(model: "nn.Module", pm: "SafetyPluginManager | None" = None) -> ModelAdapter:
    """The adapter for ``model`` from the registered adapters (third-party ones first).

    Raises :class:`UnsupportedModelError` listing the supported families.
    """
    from ..registry import adapters

    classes = adapters(pm)
    for cls in classes:
        if cls.matches(model):
            return cls(model)
    supported = "; ".join(f"{c.family} ({', '.join(c.model_classes)})" for c in classes)
    raise UnsupportedModelError(
        f"no adapter for {type(model).__name__}. Supported families: {supported}. "
        "Third-party adapters are added through the register_adapters hook."
    )


__all__ = ["ModelAdapter", "SequenceLayout", "get_adapter", "layer_hidden", "replace_layer_hidden"]
