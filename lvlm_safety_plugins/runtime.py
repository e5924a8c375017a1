"""A recipe made live: the method instances it activates, on their own plugin bus.

Integrations build one :class:`Runtime` per training or inference run and call the
lifecycle hooks through it. Call order: the recipe's ``plugins`` order (a method listed
first runs first), then module-level lifecycle implementations of installed plugins;
``@hookimpl(tryfirst=True)`` / ``trylast=True`` move an implementation to the front or
back regardless.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .plugins import SafetyPluginManager, get_plugin_manager
from .recipe import Recipe, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .adapters.base import ModelAdapter
    from .methods.base import Method

LIFECYCLE_HOOKS = (
    "prepare_example",
    "collate",
    "before_forward",
    "loss_terms",
    "step_end",
    "calibrate",
    "install_steering",
    "remove_steering",
)


@dataclass
class StepContext:
    """What the training lifecycle hooks share within one step.

    ``step`` counts optimizer steps from 0, ``max_steps`` is the planned total (0 if
    unknown). ``scratch`` is private per-step storage for plugins (cleared by the
    integration after :func:`step_end`); ``metrics`` collects scalars to log.
    """

    runtime: "Runtime"
    step: int = 0
    max_steps: int = 0
    training: bool = True
    scratch: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """``step / max_steps`` in [0, 1] (0 when ``max_steps`` is unknown)."""
        if self.max_steps <= 0:
            return 0.0
        return min(max(self.step / self.max_steps, 0.0), 1.0)


class Runtime:
    """The live form of a recipe.

    >>> rt = Runtime(load_recipe("cmrm_llava15_dataset"), model=model)  # doctest: +SKIP
    >>> with rt.steering(model):  # doctest: +SKIP
    ...     model.generate(**inputs)
    """

    def __init__(
        self,
        recipe: Recipe | str,
        *,
        model: "torch.nn.Module | None" = None,
        overrides: Sequence[str] = (),
        pm: SafetyPluginManager | None = None,
        processor: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from .compat import warn_if_untested
        from .registry import methods as registered_methods

        warn_if_untested()

        self.global_pm = pm if pm is not None else get_plugin_manager()
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides, pm=self.global_pm)
        self.model = model
        #: the host's processor / tokenizer, for plugins that tokenize (set by integrations)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self._adapter: ModelAdapter | None = None
        self.pm = SafetyPluginManager()
        for name, plugin in self.global_pm.list_name_plugin():
            if any(c.name in LIFECYCLE_HOOKS for c in self.global_pm.get_hookcallers(plugin) or ()):
                self.pm.register(plugin, name)
        classes = registered_methods(self.global_pm)
        self.methods: dict[str, Method] = {}
        for name in self.recipe.plugins:
            self.methods[name] = classes[name](self.recipe.section(name), self)
        # pluggy calls the last registered first: register in reverse recipe order.
        for name in reversed(self.recipe.plugins):
            self.pm.register(self.methods[name], f"method:{name}")
        self.pm.check_pending()
        self.hook = self.pm.hook

    # -- model ----------------------------------------------------------------

    @property
    def adapter(self) -> "ModelAdapter":
        """The model adapter for ``self.model`` (found on first use)."""
        if self._adapter is None or self._adapter.model is not self.model:
            if self.model is None:
                raise ValueError("this Runtime has no model; pass model=... when creating it")
            from .adapters import get_adapter

            self._adapter = get_adapter(self.model, pm=self.global_pm)
        return self._adapter

    def bind(self, model: "torch.nn.Module") -> "Runtime":
        """Attach (or replace) the model this runtime works on; returns ``self``."""
        self.model = model
        return self

    # -- training helpers ------------------------------------------------------

    def new_step(self, step: int, max_steps: int, training: bool = True) -> StepContext:
        return StepContext(self, step=step, max_steps=max_steps, training=training)

    def prepare_example(self, example: dict) -> dict:
        """The example with every plugin's extra fields merged in (a new dict)."""
        out = dict(example)
        for extra in self.hook.prepare_example(example=example, runtime=self):
            out.update(extra)
        return out

    def collate(self, examples: Sequence[dict], batch: dict) -> dict[str, Any]:
        """Extra batch entries from every plugin (kept apart from the host batch)."""
        extras: dict[str, Any] = {}
        for extra in self.hook.collate(examples=examples, batch=batch, runtime=self):
            extras.update(extra)
        return extras

    def loss_terms(self, model: Any, batch: dict, outputs: Any, ctx: StepContext) -> dict[str, "torch.Tensor"]:
        """Every plugin's named, weighted loss terms (call order kept)."""
        terms: dict[str, Any] = {}
        for result in self.hook.loss_terms(model=model, batch=batch, outputs=outputs, ctx=ctx):
            for key, value in result.items():
                if key in terms:
                    raise ValueError(f"two plugins returned the loss term {key!r}")
                terms[key] = value
        return terms

    # -- inference helpers -----------------------------------------------------

    @contextlib.contextmanager
    def steering(self, model: "torch.nn.Module | None" = None) -> Iterator["Runtime"]:
        """Install every plugin's steering on ``model`` for the body of the block.

        Handles are removed in reverse order on exit, also when the body raises, and
        ``remove_steering`` is called afterwards.
        """
        if model is not None:
            self.bind(model)
        target = self.model
        handles: list[Any] = []
        try:
            for result in self.hook.install_steering(model=target, runtime=self):
                handles.extend(result if isinstance(result, (list, tuple)) else [result])
            yield self
        finally:
            for handle in reversed(handles):
                handle.remove()
            self.hook.remove_steering(model=target, runtime=self)

    def calibrate(self, processor: Any, dataset: Any, model: "torch.nn.Module | None" = None) -> list[Mapping[str, Any]]:
        """Run every plugin's calibration; returns their artifact descriptions."""
        if model is not None:
            self.bind(model)
        return list(self.hook.calibrate(model=self.model, processor=processor, dataset=dataset, runtime=self))


__all__ = ["LIFECYCLE_HOOKS", "Runtime", "StepContext"]
