"""The plugin manager: built-in plugins, entry-point plugins, environment controls.

Built-in plugins are ordinary modules with ``@hookimpl`` functions, registered through
the same :meth:`SafetyPluginManager.register` call a third-party plugin goes through.
Third-party plugins are found through the ``lvlm_safety_plugins`` entry-point group.

Environment controls (read when the manager is created):

``LVLM_SAFETY_PLUGINS``
    Comma-separated allow-list of entry-point plugin names. When set, only the listed
    entry-point plugins are loaded. Built-in plugins are always loaded.
``LVLM_SAFETY_DISABLE_PLUGIN_AUTOLOAD``
    When ``1`` (or ``true``/``yes``), no entry-point plugin is loaded at all.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata as md
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownHookError
from .markers import ENTRY_POINT_GROUP, PROJECT_NAME
from .version import __version__

ENV_ALLOW_LIST = "LVLM_SAFETY_PLUGINS"
ENV_DISABLE_AUTOLOAD = "LVLM_SAFETY_DISABLE_PLUGIN_AUTOLOAD"

#: Modules registered as plugins by every plugin manager, in this order.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "lvlm_safety_plugins.adapters.builtin",
    "lvlm_safety_plugins.methods.builtin",
    "lvlm_safety_plugins.recipes_builtin",
    "lvlm_safety_plugins.retrieval.builtin",
    "lvlm_safety_plugins.evaluation.builtin",
    "lvlm_safety_plugins.commands_builtin",
)


@dataclass(frozen=True)
class PluginInfo:
    """What ``lvlm-safety plugins list`` shows about one registered plugin."""

    name: str
    package: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool = False


def _wrap_impl(function: Any, plugin: str, hook: str) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise PluginError(plugin, hook, exc) from exc

    wrapper._lvlm_wrapped = True  # type: ignore[attr-defined]
    return wrapper


class SafetyPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` for the ``lvlm_safety`` project.

    Differences from plain pluggy: an exception raised inside a hook implementation is
    re-raised as :class:`PluginError` naming the plugin and the hook, and the
    distribution of each entry-point plugin is remembered for ``plugins list``.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._dist: dict[str, tuple[str, str]] = {}
        self._builtin: set[str] = set()
        self._registries: dict[str, Any] = {}
        self._registries_lock = threading.RLock()

    def registry(self, kind: str, build: Any) -> Any:
        """The registry ``kind`` (methods, adapters, recipe folders, ...), built once by
        ``build()`` and kept until a plugin is registered or unregistered."""
        with self._registries_lock:
            if kind not in self._registries:
                self._registries[kind] = build()
            return self._registries[kind]

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._registries.clear()
        return super().unregister(plugin, name)

    def check_pending(self) -> None:
        """Like pluggy's, but an implementation of a hook that does not exist (a
        misspelt name) raises :class:`UnknownHookError` naming the plugin, the hook, the
        closest valid hook and every valid one."""
        for name in self.hook.__dict__:
            if name.startswith("_"):
                continue
            caller = getattr(self.hook, name)
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                valid = sorted(n for n in self.hook.__dict__ if not n.startswith("_") and getattr(self.hook, n).spec is not None)
                close = difflib.get_close_matches(name, valid, n=1)
                raise UnknownHookError(impl.plugin_name, name, valid, close[0] if close else None)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as exc:
            plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            raise PluginError(plugin_name, "<register>", exc) from exc
        if registered is None:
            return None
        self._registries.clear()
        for caller in self.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin or impl.hookwrapper or impl.wrapper:
                    continue
                if not getattr(impl.function, "_lvlm_wrapped", False):
                    impl.function = _wrap_impl(impl.function, registered, caller.name)
        return registered

    # -- loading -----------------------------------------------------------------

    def load_builtins(self) -> None:
        for modname in BUILTIN_PLUGINS:
            module = importlib.import_module(modname)
            if not self.is_registered(module):
                self.register(module, modname)
                self._builtin.add(modname)

    def load_entrypoint_plugins(self, allow: Iterable[str] | None = None) -> list[str]:
        """Load plugins from the ``lvlm_safety_plugins`` entry-point group.

        ``allow``: only these entry-point names (``None``: all). Returns the names loaded.
        """
        allowed = None if allow is None else {a.strip() for a in allow if a.strip()}
        loaded: list[str] = []
        for dist in md.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                if allowed is not None and ep.name not in allowed:
                    continue
                if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # noqa: BLE001 - re-raised with context
                    raise PluginError(ep.name, "<entry point load>", exc) from exc
                self.register(plugin, ep.name)
                self._dist[ep.name] = (dist.metadata["Name"], dist.version)
                loaded.append(ep.name)
        return loaded

    # -- introspection ------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.list_name_plugin():
            hooks = tuple(sorted(c.name for c in (self.get_hookcallers(plugin) or ())))
            if name in self._dist:
                package, version = self._dist[name]
            elif name in self._builtin:
                package, version = "lvlm-safety-plugins", __version__
            else:
                module = plugin if isinstance(plugin, ModuleType) else type(plugin)
                package, version = getattr(module, "__module__", None) or getattr(module, "__name__", "?"), "-"
            infos.append(PluginInfo(name, package, version, hooks, name in self._builtin))
        return sorted(infos, key=lambda i: (not i.builtin, i.name))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def create_plugin_manager(*, autoload: bool | None = None, allow: Iterable[str] | None = None) -> SafetyPluginManager:
    """Create a new plugin manager with built-ins and (by default) entry-point plugins.

    ``autoload`` and ``allow`` default to the environment controls described in the
    module docstring. ``check_pending()`` runs last, so an implementation of a hook
    that does not exist (a misspelt name) fails here, naming the plugin.
    """
    pm = SafetyPluginManager()
    pm.load_builtins()
    if autoload is None:
        autoload = not _env_flag(ENV_DISABLE_AUTOLOAD)
    if allow is None and os.environ.get(ENV_ALLOW_LIST, "").strip():
        allow = os.environ[ENV_ALLOW_LIST].split(",")
    if autoload:
        pm.load_entrypoint_plugins(allow)
    pm.check_pending()
    return pm


_PM: SafetyPluginManager | None = None
_PM_LOCK = threading.Lock()


def get_plugin_manager() -> SafetyPluginManager:
    """The process-wide plugin manager, created on first use."""
    global _PM
    with _PM_LOCK:
        if _PM is None:
            _PM = create_plugin_manager()
        return _PM


def reset_plugin_manager() -> None:
    """Forget the process-wide plugin manager (it is re-created on next use, re-reading
    the environment controls)."""
    global _PM
    with _PM_LOCK:
        _PM = None


def register_plugin(plugin: object, name: str | None = None) -> str | None:
    """Register a plugin object or module with the process-wide manager (no entry point
    needed), e.g. from a notebook or a test. Returns the registered name."""
    pm = get_plugin_manager()
    name = pm.register(plugin, name)
    pm.check_pending()
    return name


__all__ = [
    "BUILTIN_PLUGINS",
    "ENV_ALLOW_LIST",
    "ENV_DISABLE_AUTOLOAD",
    "PluginInfo",
    "SafetyPluginManager",
    "create_plugin_manager",
    "get_plugin_manager",
    "register_plugin",
    "reset_plugin_manager",
]
