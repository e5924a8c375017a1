"""The built-in ``lvlm-safety`` subcommands, registered through the same
``register_commands`` hook a third-party plugin uses. Each command's parser is built by
a function that lives with the command's code (imported only when the parser is built)."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .markers import hookimpl

#: command name -> (module, function adding it to argparse's subparsers)
BUILTIN_COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("lvlm_safety_plugins.cli", "add_plugins_command"),
    "recipes": ("lvlm_safety_plugins.cli", "add_recipes_command"),
    "demo": ("lvlm_safety_plugins.demo.cli", "add_demo_command"),
    "calibrate": ("lvlm_safety_plugins.methods.cmrm.cli", "add_calibrate_command"),
    "analyze": ("lvlm_safety_plugins.analysis_cli", "add_analyze_command"),
    "index": ("lvlm_safety_plugins.retrieval.cli", "add_index_command"),
    "eval": ("lvlm_safety_plugins.evaluation.cli", "add_eval_command"),
}


def _adder(module: str, function: str) -> Callable[[Any], None]:
    def add_command(subparsers: Any) -> None:
        getattr(importlib.import_module(module), function)(subparsers)

    return add_command


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    for name, (module, function) in BUILTIN_COMMANDS.items():
        register(name, _adder(module, function))
