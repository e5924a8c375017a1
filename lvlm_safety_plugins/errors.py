"""Exception types. Every error the library raises on bad input derives from
:class:`LVLMSafetyError` and names the file, key, row or layer it is about.

Each named error also derives from the built-in exception it replaces
(``ValueError``, ``IndexError``, ``ImportError``, ...), so ``except ValueError`` in
code written against earlier versions keeps working. The command line prints any
:class:`LVLMSafetyError` as one line (``lvlm-safety: error: ...``) and exits with 2.

This module imports nothing (not even torch): plugins may import it freely.
"""

from __future__ import annotations

from typing import Iterable


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


class UnknownHookError(PluginError):
    """A plugin implements a hook that does not exist (usually a misspelt name).

    ``name`` is the unknown hook, ``valid`` the hooks that exist and ``suggestion`` the
    closest valid name (or ``None``).
    """

    def __init__(self, plugin: str, name: str, valid: Iterable[str], suggestion: str | None = None) -> None:
        self.name = name
        self.valid = tuple(sorted(valid))
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        error = LookupError(f"unknown hook {name!r}{hint} Valid hooks: {', '.join(self.valid)}")
        LVLMSafetyError.__init__(self, f"plugin {plugin!r} implements unknown hook {name!r}{hint} "
                                       f"Valid hooks: {', '.join(self.valid)}")
        self.plugin, self.hook, self.error = plugin, name, error


class ConfigError(LVLMSafetyError, ValueError):
    """An argument or option has a value the library cannot use (the message names the
    option and lists the valid values)."""


class RecipeError(ConfigError):
    """A recipe could not be found, parsed, composed or validated.

    ``source`` is the file (or the override) the problem is in; ``key`` the dotted key.
    A recipe is configuration, so ``except ConfigError`` (and ``except ValueError``)
    catches it too.
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
        # not super(): in RecipeValueError the next class is ConfigValueError(key, message)
        Exception.__init__(self, f"{prefix}: {message}" if prefix else message)


class ConfigValueError(ConfigError):
    """Raised by a method config's ``check(cfg)`` for a value OmegaConf's typing cannot
    rule out; ``key`` is the field inside the method's section. The recipe loader
    re-raises it as a :class:`RecipeValueError` (a ``RecipeError`` *and* a
    ``ConfigValueError``) naming the file and the dotted key, with the original chained
    as ``__cause__``: ``pytest.raises(ConfigValueError)``, ``except ConfigError`` and
    ``except RecipeError`` all catch it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class RecipeValueError(RecipeError, ConfigValueError):
    """A method config's ``check`` refused a value of a loaded recipe. ``key`` is the
    dotted key (``cmrm.alpha``), ``source`` the file or override that set it,
    ``__cause__`` the check's own :class:`ConfigValueError`."""

    def __init__(self, message: str, source: str | None = None, key: str | None = None) -> None:
        RecipeError.__init__(self, message, source, key)


class OutputError(ConfigError):
    """An output path cannot be written: it exists (without ``overwrite``), is a folder
    where a file is wanted (or the reverse), lies under a regular file, is one of the
    inputs, or its folder is not writable. Raised before any work is done."""


class LayerError(LVLMSafetyError, ValueError, IndexError):
    """A layer selection cannot be parsed, or names a decoder layer the model does not
    have (the message names the layer and the model's range)."""


class DataError(LVLMSafetyError, ValueError):
    """An example, batch, row or data file cannot be used (the message names the file,
    the row or the example id and the field)."""


class StepError(LVLMSafetyError, RuntimeError):
    """The training step or a runtime was used in a way that cannot work (no model
    bound, no host loss, two plugins returning the same loss term)."""


class DependencyError(LVLMSafetyError, ImportError):
    """An optional dependency is missing; the message names the package and the
    ``pip install`` command (the extra) that installs it."""


class UnsupportedModelError(LVLMSafetyError, TypeError):
    """No registered model adapter recognises the model, or the model lacks a part a
    method needs (a projector, an image input, decoder layers of a known form)."""


class CaptureError(LVLMSafetyError):
    """Hidden-state capture was misused (bad layer, mask of the wrong shape, a value
    read that was not captured, ...)."""


class GradientError(LVLMSafetyError):
    """A loss term would train nothing: the states it reads carry no gradient (for
    example captured inside a reentrant gradient checkpoint that cannot be switched)."""


class SteeringError(LVLMSafetyError, ValueError):
    """Steering was asked for something it cannot do (unknown positions, a scale that
    does not fit the layers, an edit that is not callable)."""


class ServingError(LVLMSafetyError, ValueError):
    """A steering mode a serving engine (vLLM) cannot run exactly; the message says why
    and what to use instead (docs/serving.md)."""


class VectorFileError(LVLMSafetyError):
    """A steering-vector file is missing, corrupt, or does not fit the model."""


__all__ = [
    "CaptureError",
    "ConfigError",
    "ConfigValueError",
    "DataError",
    "DependencyError",
    "GradientError",
    "LVLMSafetyError",
    "LayerError",
    "OutputError",
    "PluginError",
    "RecipeError",
    "RecipeValueError",
    "ServingError",
    "StepError",
    "SteeringError",
    "UnknownHookError",
    "UnsupportedModelError",
    "VectorFileError",
]
