"""lvlm-safety-plugins: carry an LLM's text safety behaviour over to images.

Public API::

    from lvlm_safety_plugins import hookimpl, load_recipe, Runtime, get_adapter
    from lvlm_safety_plugins import steering   # the steering primitive (steer, add_vectors)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import ModelAdapter, SequenceLayout, get_adapter
from .capture import HiddenCapture
from .errors import (
    CaptureError,
    GradientError,
    LVLMSafetyError,
    PluginError,
    RecipeError,
    UnsupportedModelError,
    VectorFileError,
)
from .markers import hookimpl, hookspec
from .methods.base import Method
from .plugins import get_plugin_manager, register_plugin, reset_plugin_manager
from .recipe import Recipe, available_recipes, load_recipe, recipe_from_dict
from .runtime import Runtime, StepContext
from . import compat, steering  # noqa: E402 - submodules of the public API

__all__ = [
    "CaptureError",
    "GradientError",
    "HiddenCapture",
    "LVLMSafetyError",
    "Method",
    "ModelAdapter",
    "PluginError",
    "Recipe",
    "RecipeError",
    "Runtime",
    "SequenceLayout",
    "StepContext",
    "UnsupportedModelError",
    "VectorFileError",
    "__version__",
    "compat",
    "steering",
    "available_recipes",
    "get_adapter",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load_recipe",
    "recipe_from_dict",
    "register_plugin",
    "reset_plugin_manager",
]
