"""The module the ``lvlm_safety_plugins`` entry point names: its hook implementations
register the two methods, the recipe folder and the ``shiftdc`` subcommand."""

from __future__ import annotations

from importlib import resources
from typing import Callable

from lvlm_safety_plugins import hookimpl


@hookimpl
def register_methods(register: Callable[..., None]) -> None:
    from .method import ShiftDC
    from .normmatch import NormMatch

    register(ShiftDC)
    register(NormMatch)


@hookimpl
def register_recipe_dirs(register: Callable[..., None]) -> None:
    register(resources.files("lvlm_shiftdc.recipes"))


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    from .cli import add_command

    register("shiftdc", add_command)
