"""A recipe made live: the method instances it activates, on their own plugin bus.

Integrations build one :class:`Runtime` per training or inference run and call the
lifecycle hooks through it. Call order: the recipe's ``plugins`` order (a method listed
first runs first), then module-level lifecycle implementations of installed plugins;
``@hookimpl(tryfirst=True)`` / ``trylast=True`` move an implementation to the front or
back regardless.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from .errors import StepError
from .plugins import SafetyPluginManager, get_plugin_manager
from .recipe import Recipe, as_recipe

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .adapters.base import ModelAdapter
    from .capture import ForwardCapture
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


#: the batch key under which the collators put the plugins' tensors (the ``collate``
#: results); :meth:`Runtime.training_step` removes it before the host's forward and hands
#: it to the plugins as :attr:`StepContext.extras`
EXTRAS_KEY = "lvlm_safety"


@dataclass
class StepContext:
    """What the training lifecycle hooks share within one step (one micro-batch).

    Built by :meth:`Runtime.training_step`; a plugin reads it in ``before_forward``,
    ``loss_terms`` and ``step_end`` and never builds one itself.
    """

    #: the runtime running the step (``ctx.runtime.adapter`` is the model's adapter)
    runtime: "Runtime"
    #: the optimizer step this micro-batch belongs to, from 0 (the same for every
    #: micro-batch of one step under gradient accumulation)
    step: int = 0
    #: the planned number of optimizer steps (0 when unknown)
    max_steps: int = 0
    #: whether the model is training (``False`` for an evaluation loss)
    training: bool = True
    #: the host batch the forward receives (plugin tensors already removed)
    batch: dict[str, Any] = field(default_factory=dict)
    #: the plugins' own batch tensors, from the ``collate`` hook (``batch[EXTRAS_KEY]``)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the factor every loss term is multiplied by before it is added to the host loss:
    #: it puts a per-micro-batch mean term on the host loss's scale (1 outside the HF
    #: Trainer; there it undoes the Trainer's token-count normalisation)
    term_scale: float = 1.0
    #: the host's loss for this micro-batch, set after the forward (before ``loss_terms``)
    host_loss: "torch.Tensor | None" = None
    #: private per-step storage for plugins (discarded after the step)
    scratch: dict[str, Any] = field(default_factory=dict)
    #: scalars to log; the step's loss terms are added under their own names
    metrics: dict[str, float] = field(default_factory=dict)
    _captures: list["ForwardCapture"] = field(default_factory=list, repr=False)

    @property
    def progress(self) -> float:
        """``step / max_steps`` in [0, 1] (0 when ``max_steps`` is unknown)."""
        if self.max_steps <= 0:
            return 0.0
        return min(max(self.step / self.max_steps, 0.0), 1.0)

    def capture(
        self,
        layers: Iterable[int] = (),
        *,
        masks: Mapping[str, "torch.Tensor"] | None = None,
        token_masks: Mapping[str, "torch.Tensor"] | None = None,
        pooling: str = "mean",
        projector: bool = False,
        embeddings: bool = False,
        detach: bool = False,
    ) -> "ForwardCapture":
        """Record what the host's training forward computes, for ``loss_terms``.

        Call it in ``before_forward``; it returns a :class:`~lvlm_safety_plugins.capture.ForwardCapture`
        whose values are there after the forward: the projector's output
        (``projector=True``), the decoder's input sequence (``embeddings=True``), the
        image-token mask, and the hidden states at ``layers`` (layer ``l`` = output of
        decoder layer ``l``), full or pooled over the ``"image"`` mask and over
        ``masks`` (decoder coordinates) and ``token_masks`` (``input_ids`` coordinates,
        mapped onto the decoder's sequence). The hooks are removed after
        ``loss_terms`` (or when a value is first read); no plugin needs
        ``register_forward_hook``.
        """
        from .capture import ForwardCapture

        adapter = self.runtime.adapter
        layout = adapter.layout(self.batch)
        all_masks = dict(masks or {})
        for name, mask in (token_masks or {}).items():
            all_masks[name] = layout.map_token_mask(mask.to(layout.image_mask.device))
        cap = ForwardCapture(adapter, layout, layers, masks=all_masks, pooling=pooling, projector=projector,
                             embeddings=embeddings, detach=detach)
        self._captures.append(cap.start())
        return cap

    def close(self) -> None:
        """Remove every capture's hooks (the runtime calls it at the end of the step)."""
        while self._captures:
            self._captures.pop().stop()


@dataclass
class StepResult:
    """What :meth:`Runtime.training_step` returns."""

    #: the loss to back-propagate: ``host_loss + term_scale * sum(terms)``
    loss: "torch.Tensor"
    #: the host's own loss (what the forward returned)
    host_loss: "torch.Tensor"
    #: every plugin's weighted loss term by name (``"method/term"``), before ``term_scale``
    terms: dict[str, "torch.Tensor"]
    #: the terms as floats plus every plugin's metrics (``ctx.metrics`` and ``step_end``'s)
    metrics: dict[str, float]
    #: the host forward's outputs
    outputs: Any
    #: the step's context (its ``scratch`` keeps what plugins left there)
    context: StepContext


def _model_forward(model: "torch.nn.Module") -> Callable[[dict], tuple[Any, Any]]:
    def forward(batch: dict) -> tuple[Any, Any]:
        outputs = model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise StepError(
                f"{type(model).__name__}'s forward returned no loss: the batch needs labels "
                f"(batch keys: {', '.join(sorted(batch))}), or pass forward= to training_step"
            )
        return loss, outputs

    return forward


class Runtime:
    """The live form of a recipe.

    >>> rt = Runtime(load_recipe("cmrm_llava15_dataset"), model=model)  # doctest: +SKIP
    >>> with rt.steering(model):  # doctest: +SKIP
    ...     model.generate(**inputs)
    """

    def __init__(
        self,
        recipe: "Recipe | str | os.PathLike[str] | Mapping[str, Any]",
        *,
        model: "torch.nn.Module | None" = None,
        overrides: Sequence[str] = (),
        pm: SafetyPluginManager | None = None,
        processor: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """``recipe``: a recipe name (from the registered recipe folders), a path to a
        recipe file, a mapping with a recipe's keys, or a loaded :class:`Recipe`;
        ``overrides`` (``"cmrm.alpha=0.5"``) are applied to any of them. This is the one
        way to build a runtime; integrations that take a ``recipe=`` argument pass it
        here."""
        from .compat import warn_if_untested
        from .registry import methods as registered_methods

        warn_if_untested()

        self.global_pm = pm if pm is not None else get_plugin_manager()
        self.recipe = as_recipe(recipe, overrides, pm=self.global_pm)
        self.model = model
        #: the host's processor / tokenizer, for plugins that tokenize (set by integrations)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        #: the context of the training step in progress (``None`` outside one)
        self.current_step: StepContext | None = None
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

    @classmethod
    def coerce(
        cls,
        recipe: "Runtime | Recipe | str | os.PathLike[str] | Mapping[str, Any]",
        overrides: Sequence[str] = (),
        **kwargs: Any,
    ) -> "Runtime":
        """``recipe`` itself when it is a runtime (its missing ``processor`` /
        ``tokenizer`` filled from ``kwargs``), else ``Runtime(recipe, overrides=..., **kwargs)``."""
        if not isinstance(recipe, Runtime):
            return cls(recipe, overrides=overrides, **kwargs)
        if overrides:
            raise StepError("overrides cannot be applied to a Runtime that is already built; pass the recipe instead")
        for key in ("processor", "tokenizer"):
            if kwargs.get(key) is not None and getattr(recipe, key) is None:
                setattr(recipe, key, kwargs[key])
        if recipe.tokenizer is None and recipe.processor is not None:
            recipe.tokenizer = getattr(recipe.processor, "tokenizer", None)
        if kwargs.get("model") is not None:
            recipe.bind(kwargs["model"])
        return recipe

    # -- model ----------------------------------------------------------------

    @property
    def adapter(self) -> "ModelAdapter":
        """The model adapter for ``self.model`` (found on first use)."""
        if self._adapter is None or self._adapter.model is not self.model:
            if self.model is None:
                raise StepError("this Runtime has no model; pass model=... when creating it")
            from .adapters import get_adapter

            self._adapter = get_adapter(self.model, pm=self.global_pm)
        return self._adapter

    def bind(self, model: "torch.nn.Module") -> "Runtime":
        """Attach (or replace) the model this runtime works on; returns ``self``."""
        self.model = model
        return self

    # -- training helpers ------------------------------------------------------

    def new_step(self, step: int, max_steps: int, training: bool = True) -> StepContext:
        """A bare :class:`StepContext` (for code that drives the hooks itself; prefer
        :meth:`training_step`, which builds and closes one)."""
        return StepContext(self, step=step, max_steps=max_steps, training=training)

    def training_step(
        self,
        model: "torch.nn.Module",
        batch: Mapping[str, Any],
        *,
        step: int,
        max_steps: int = 0,
        forward: Callable[[dict], tuple["torch.Tensor", Any]] | None = None,
        term_scale: float = 1.0,
    ) -> StepResult:
        """One training micro-batch through the whole plugin lifecycle.

        1. ``batch[EXTRAS_KEY]`` (the ``collate`` hook's tensors) is taken out of the
           batch into :attr:`StepContext.extras`; ``model`` is bound to the runtime;
        2. ``before_forward`` (teacher passes, ``ctx.capture(...)``);
        3. the host's forward: ``forward(batch) -> (loss, outputs)``, by default
           ``model(**batch)`` and its ``.loss``; :attr:`StepContext.host_loss` is set;
        4. ``loss_terms``; the loss is ``host_loss + term_scale * sum(terms)``;
        5. always, also when 2-4 raised: every capture removed, then ``step_end``
           (its returned metrics are merged into the result's).

        The caller back-propagates ``result.loss`` and steps the optimizer. Under
        gradient accumulation call it once per micro-batch with the same ``step`` (the
        optimizer step's index): every hook runs once per micro-batch, and
        ``term_scale`` puts each term on the host loss's scale (the HF integration
        passes the Trainer's factor). ``model`` is the module the plugins hook (for a
        distributed wrapper, the unwrapped model; ``forward`` may call the wrapper).
        """
        host_batch = dict(batch)
        extras = dict(host_batch.pop(EXTRAS_KEY, None) or {})
        self.bind(model)
        ctx = StepContext(self, step=int(step), max_steps=int(max_steps or 0), training=bool(model.training),
                          batch=host_batch, extras=extras, term_scale=float(term_scale))
        run = forward if forward is not None else _model_forward(model)
        terms: dict[str, Any] = {}
        previous, self.current_step = self.current_step, ctx
        try:
            try:
                self.hook.before_forward(model=model, batch=host_batch, ctx=ctx)
                host_loss, outputs = run(host_batch)
                ctx.host_loss = host_loss
                terms = self.loss_terms(model, host_batch, outputs, ctx)
                loss = host_loss
                if terms:
                    loss = host_loss + ctx.term_scale * sum(t.to(host_loss.device, host_loss.dtype) for t in terms.values())
            finally:
                ctx.close()
                for extra in self.hook.step_end(model=model, ctx=ctx):
                    ctx.metrics.update(extra or {})
        finally:
            self.current_step = previous
        metrics = {name: float(value.detach()) for name, value in terms.items()}
        metrics.update(ctx.metrics)
        return StepResult(loss=loss, host_loss=host_loss, terms=terms, metrics=metrics, outputs=outputs, context=ctx)

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
                    raise StepError(f"two plugins returned the loss term {key!r}")
                terms[key] = value
        return terms

    # -- inference helpers -----------------------------------------------------

    @contextlib.contextmanager
    def steering(self, model: "torch.nn.Module | None" = None) -> Iterator["Runtime"]:
        """Install every plugin's steering on ``model`` for the body of the block.

        Handles are removed in reverse order on exit, also when the body raises, and
        ``remove_steering`` is called afterwards.
        """
        handles = self.install_steering(model)
        target = self.model
        try:
            yield self
        finally:
            for handle in reversed(handles):
                handle.remove()
            self.hook.remove_steering(model=target, runtime=self)

    def install_steering(self, model: "torch.nn.Module | None" = None) -> list[Any]:
        """Every plugin's ``install_steering`` on ``model``, one plugin at a time in call
        order; returns the handles (remove them in reverse order). If a plugin raises,
        the handles the plugins before it installed are removed before the error
        propagates, so a failed install leaves the model as it was."""
        if model is not None:
            self.bind(model)
        arguments = {"model": self.model, "runtime": self}
        handles: list[Any] = []
        try:
            # pluggy's own order (it calls the list last to first)
            for impl in reversed(self.hook.install_steering.get_hookimpls()):
                result = impl.function(*(arguments[name] for name in impl.argnames))
                if result is not None:
                    handles.extend(result if isinstance(result, (list, tuple)) else [result])
        except BaseException:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def calibrate(self, processor: Any, dataset: Any, model: "torch.nn.Module | None" = None) -> list[Mapping[str, Any]]:
        """Run every plugin's calibration; returns their artifact descriptions."""
        if model is not None:
            self.bind(model)
        return list(self.hook.calibrate(model=self.model, processor=processor, dataset=dataset, runtime=self))


__all__ = ["EXTRAS_KEY", "LIFECYCLE_HOOKS", "Runtime", "StepContext", "StepResult"]
