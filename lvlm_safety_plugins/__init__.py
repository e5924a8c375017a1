"""lvlm-safety-plugins: carry an LLM's text safety behaviour over to images.

Public API (everything a plugin author or an integrator needs; see
docs/plugin-authoring.md, "The public API")::

    from lvlm_safety_plugins import hookimpl, Method, Runtime, StepContext, load_recipe
    from lvlm_safety_plugins import steering   # the steering primitive (apply, add_vectors)

Importing the package root loads neither torch nor transformers: ``hookimpl``,
``hookspec``, ``__version__`` and the error types come from modules without heavy
imports, and every other name is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CaptureError,
    ConfigError,
    ConfigValueError,
    DataError,
    DependencyError,
    GradientError,
    LayerError,
    LVLMSafetyError,
    OutputError,
    PluginError,
    RecipeError,
    RecipeValueError,
    ServingError,
    StepError,
    SteeringError,
    UnknownHookError,
    UnsupportedModelError,
    VectorFileError,
)
from .markers import hookimpl, hookspec
from .version import __version__

#: public name -> the module that defines it (imported on first use)
_LAZY: dict[str, str] = {
    "ModelAdapter": "adapters",
    "SequenceLayout": "adapters",
    "get_adapter": "adapters",
    "ForwardCapture": "capture",
    "HiddenCapture": "capture",
    "pool": "capture",
    "Method": "methods.base",
    "parse_layers": "methods.layers",
    "get_plugin_manager": "plugins",
    "register_plugin": "plugins",
    "reset_plugin_manager": "plugins",
    "Recipe": "recipe",
    "available_recipes": "recipe",
    "load_recipe": "recipe",
    "recipe_from_dict": "recipe",
    "EXTRAS_KEY": "runtime",
    "Runtime": "runtime",
    "StepContext": "runtime",
    "StepResult": "runtime",
    "atomic_output_path": "fileio",
    "atomic_write_text": "fileio",
    "SteeringVectors": "methods.cmrm.vectorfile",
    "load_vectors": "methods.cmrm.vectorfile:load_checked",
    "calibrate_cmrm": "methods.cmrm.calibration:calibrate",
}
#: the modules whose ``__all__`` names are public (a plugin imports nothing else; a test
#: checks the example plugin against this list)
PUBLIC_MODULES: tuple[str, ...] = (
    "lvlm_safety_plugins",
    "lvlm_safety_plugins.steering",
    "lvlm_safety_plugins.testing",
    "lvlm_safety_plugins.errors",
    "lvlm_safety_plugins.registry",
    "lvlm_safety_plugins.progress",
    "lvlm_safety_plugins.integrations.hf",
    "lvlm_safety_plugins.integrations.hf_training",
    "lvlm_safety_plugins.integrations.llava",
)
#: public submodules, imported on first use
_SUBMODULES = ("compat", "registry", "steering", "testing")

if TYPE_CHECKING:  # pragma: no cover
    from . import compat, registry, steering, testing
    from .adapters import ModelAdapter, SequenceLayout, get_adapter
    from .capture import ForwardCapture, HiddenCapture, pool
    from .fileio import atomic_output_path, atomic_write_text
    from .methods.base import Method
    from .methods.cmrm.vectorfile import SteeringVectors
    from .methods.cmrm.calibration import calibrate as calibrate_cmrm
    from .methods.cmrm.vectorfile import load_checked as load_vectors
    from .methods.layers import parse_layers
    from .plugins import get_plugin_manager, register_plugin, reset_plugin_manager
    from .recipe import Recipe, available_recipes, load_recipe, recipe_from_dict
    from .runtime import EXTRAS_KEY, Runtime, StepContext, StepResult


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
    elif name in _LAZY:
        where, _, attr = _LAZY[name].partition(":")
        module = getattr(importlib.import_module(f"{__name__}.{where}"), attr or name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CaptureError",
    "ConfigError",
    "ConfigValueError",
    "DataError",
    "DependencyError",
    "EXTRAS_KEY",
    "ForwardCapture",
    "GradientError",
    "HiddenCapture",
    "LVLMSafetyError",
    "OutputError",
    "LayerError",
    "Method",
    "ModelAdapter",
    "PUBLIC_MODULES",
    "PluginError",
    "Recipe",
    "RecipeError",
    "RecipeValueError",
    "Runtime",
    "ServingError",
    "SequenceLayout",
    "StepContext",
    "StepError",
    "StepResult",
    "SteeringError",
    "SteeringVectors",
    "UnknownHookError",
    "UnsupportedModelError",
    "VectorFileError",
    "__version__",
    "atomic_output_path",
    "atomic_write_text",
    "available_recipes",
    "calibrate_cmrm",
    "compat",
    "get_adapter",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load_recipe",
    "load_vectors",
    "parse_layers",
    "pool",
    "recipe_from_dict",
    "register_plugin",
    "registry",
    "reset_plugin_manager",
    "steering",
    "testing",
]
