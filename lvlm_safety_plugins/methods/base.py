"""The base class of every safety method."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import LVLMSafetyError

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import Runtime

METHOD_KINDS = ("loss", "steering", "prompt")


class Method:
    """A safety method: a config dataclass plus lifecycle hook implementations.

    Subclasses set ``name`` (the recipe section that configures the method and the
    name used in a recipe's ``plugins`` list), ``kind`` (one of ``"loss"``,
    ``"steering"``, ``"prompt"``) and ``config_class`` (a dataclass; it becomes the
    OmegaConf structured config of the section). When a recipe activates the method, a
    :class:`~lvlm_safety_plugins.runtime.Runtime` creates one instance with the
    validated section as ``self.config`` and registers it as a pluggy plugin, so its
    ``@hookimpl``-decorated methods take part in the lifecycle hooks.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    config_class: ClassVar[type]
    description: ClassVar[str] = ""

    def __init__(self, config: Any, runtime: "Runtime | None" = None) -> None:
        self.config = config
        self.runtime = runtime

    @classmethod
    def validate_class(cls) -> None:
        """Raise :class:`LVLMSafetyError` if the class is not a well-formed method."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise LVLMSafetyError(f"method class {where} needs a `name` that is a Python identifier, got {name!r}")
        if getattr(cls, "kind", None) not in METHOD_KINDS:
            raise LVLMSafetyError(f"method {name!r} ({where}): `kind` must be one of {METHOD_KINDS}")
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
            raise LVLMSafetyError(f"method {name!r} ({where}): `config_class` must be a dataclass")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
