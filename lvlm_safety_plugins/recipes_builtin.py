"""Built-in plugin: registers the recipe folder shipped with the package."""

from __future__ import annotations

from importlib import resources
from typing import Callable

from .markers import hookimpl


@hookimpl
def register_recipe_dirs(register: Callable[..., None]) -> None:
    register(resources.files("lvlm_safety_plugins.recipes"))
