"""Exception types. Every error the library raises on bad input derives from
:class:`LVLMSafetyError` and names the file, key, row or layer it is about."""

from __future__ import annotations


class LVLMSafetyError(Exception):
    """Base class of every error raised by lvlm-safety-plugins."""


class PluginError(LVLMSafetyError):
    """An exception raised inside a plugin's hook implementation.

    ``plugin`` is the name the plugin was registered under and ``hook`` the hook that
    was running; the original exception is chained as ``__cause__``.
    """

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(
            f"plugin {plugin!r} raised {type(error).__name__} in hook {hook!r}: {error}"
        )


class RecipeError(LVLMSafetyError):
    """A recipe could not be found, parsed, composed or validated.

    ``source`` is the file (or the override) the problem is in; ``key`` the dotted key.
    """

    def __init__(self, message: str, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        where = []
        if source:
            where.append(str(source))
        if key:
            where.append(f"key {key!r}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class UnsupportedModelError(LVLMSafetyError):
    """No registered model adapter recognises the model."""


class CaptureError(LVLMSafetyError):
    """Hidden-state capture was misused (bad layer, mask of the wrong shape, ...)."""


class GradientError(LVLMSafetyError):
    """A loss term would train nothing: the states it reads carry no gradient (for
    example captured inside a reentrant gradient checkpoint that cannot be switched)."""


class VectorFileError(LVLMSafetyError):
    """A steering-vector file is missing, corrupt, or does not fit the model."""


class ConfigValueError(ValueError):
    """Raised by a method config's ``check(cfg)`` for a value OmegaConf's typing cannot
    rule out; ``key`` is the field inside the method's section. The recipe loader turns
    it into a :class:`RecipeError` naming the file and the dotted key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)
