"""Registries filled by the registration hooks: methods, adapters, judges, benchmarks,
embedders, recipe folders, commands. Each function calls its hook on the given
(default: process-wide) plugin manager the first time it is asked and returns what was
registered; the result is kept on that plugin manager until a plugin is registered or
unregistered there (so a lookup never re-runs the hooks)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import LVLMSafetyError
from .plugins import SafetyPluginManager, get_plugin_manager

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import ModelAdapter
    from .methods.base import Method

#: what an adapter class must answer (checked without importing the adapters package,
#: which itself reads this registry)
ADAPTER_INTERFACE = ("matches", "layout", "decoder_layers", "family", "model_classes")


def _pm(pm: SafetyPluginManager | None) -> SafetyPluginManager:
    return pm if pm is not None else get_plugin_manager()


def _cached(pm: SafetyPluginManager | None, kind: str, build: Callable[[SafetyPluginManager], Any]) -> Any:
    """Registry ``kind`` of ``pm`` (built by ``build(pm)`` once per plugin manager), as a
    shallow copy the caller may change."""
    manager = _pm(pm)
    return copy.copy(manager.registry(kind, lambda: build(manager)))


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _named_registry(hook: Callable[..., Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def register(name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise LVLMSafetyError(f"a {kind} must be registered with a non-empty string name, got {name!r}")
        if name in found and found[name] is not value:
            raise LVLMSafetyError(
                f"{kind} {name!r} is registered twice: by {_qualname(found[name])} and by {_qualname(value)}"
            )
        found[name] = value

    hook(register=register)
    return found


def methods(pm: SafetyPluginManager | None = None) -> dict[str, type["Method"]]:
    """Every registered method class by name (the recipe section it reads)."""
    return _cached(pm, "methods", _collect_methods)


def _collect_methods(pm: SafetyPluginManager) -> dict[str, type["Method"]]:
    from .methods.base import Method

    found: dict[str, type[Method]] = {}

    def register(method_class: type[Method]) -> None:
        if not (isinstance(method_class, type) and issubclass(method_class, Method)):
            raise LVLMSafetyError(f"register_methods: {method_class!r} is not a subclass of Method")
        method_class.validate_class()
        name = method_class.name
        if name in found and found[name] is not method_class:
            raise LVLMSafetyError(
                f"method {name!r} is registered twice: by {_qualname(found[name])} and by {_qualname(method_class)}"
            )
        found[name] = method_class

    pm.hook.register_methods(register=register)
    return found


def adapters(pm: SafetyPluginManager | None = None) -> list[type["ModelAdapter"]]:
    """Every registered adapter class, the one to try first first."""
    return _cached(pm, "adapters", _collect_adapters)


def _collect_adapters(pm: SafetyPluginManager) -> list[type["ModelAdapter"]]:
    found: list[type[ModelAdapter]] = []

    def register(adapter_class: type[ModelAdapter]) -> None:
        missing = [a for a in ADAPTER_INTERFACE if not hasattr(adapter_class, a)] if isinstance(adapter_class, type) else ["a class"]
        if missing:
            raise LVLMSafetyError(
                f"register_adapters: {adapter_class!r} is not a subclass of ModelAdapter (lacks {', '.join(missing)})"
            )
        if adapter_class not in found:
            found.append(adapter_class)

    # pluggy calls the most recently registered plugin first, so third-party adapters
    # come before the built-ins; inside one plugin, registration order is kept.
    pm.hook.register_adapters(register=register)
    return found


def judges(pm: SafetyPluginManager | None = None) -> dict[str, Callable[..., Any]]:
    """Every registered judge factory by name."""
    return _cached(pm, "judges", lambda m: _named_registry(m.hook.register_judges, "judge"))


def embedders(pm: SafetyPluginManager | None = None) -> dict[str, Callable[..., Any]]:
    """Every registered embedder factory by spec prefix (``clip``, ``st``, ...)."""
    return _cached(pm, "embedders", lambda m: _named_registry(m.hook.register_embedders, "embedder"))


def benchmarks(pm: SafetyPluginManager | None = None) -> dict[str, Callable[..., Any]]:
    """Every registered benchmark loader by name."""
    return _cached(pm, "benchmarks", lambda m: _named_registry(m.hook.register_benchmarks, "benchmark"))


def recipe_dirs(pm: SafetyPluginManager | None = None) -> list[Any]:
    """Every registered recipe folder, lowest priority first."""
    return _cached(pm, "recipe_dirs", _collect_recipe_dirs)


def commands(pm: SafetyPluginManager | None = None) -> dict[str, Callable[[Any], None]]:
    """Every registered ``lvlm-safety`` subcommand: name -> ``add_command(subparsers)``."""
    return _cached(pm, "commands", lambda m: _named_registry(m.hook.register_commands, "command"))


def _collect_recipe_dirs(pm: SafetyPluginManager) -> list[Any]:
    found: list[Any] = []

    def register(path: Any) -> None:
        if isinstance(path, str):
            path = Path(path)
        if not path.is_dir():
            raise LVLMSafetyError(f"register_recipe_dirs: {path} is not a folder")
        found.append(path)

    pm.hook.register_recipe_dirs(register=register)
    # pluggy calls later-registered plugins first; reverse so they win on a clash.
    return list(reversed(found))


__all__ = ["ADAPTER_INTERFACE", "adapters", "benchmarks", "commands", "embedders", "judges", "methods", "recipe_dirs"]
