"""CMRM steering: subtract ``alpha_l * v_l`` from the output of decoder layer ``l``.

``apply(model, vectors, ...)`` returns a :class:`SteeringHandle`; ``steer(...)`` is the
same as a context manager. Works with ``generate()``: a forward pre-hook on the model
sees each call, tells the prefill (the prompt, with the image) from the decode steps
(one new token each, with the KV cache), and computes, at prefill, which positions of
the decoder's sequence are steered (image, text or all real positions; never padding)
from the model adapter's layout. Decode steps steer the generated tokens. The
sample-level variant measures each input's own shift at prefill, with two extra
forwards on the unsteered model (the prompt with the reference image, or its own image
for ``reference="none"``, and the prompt text-only), and keeps it for every decode step
of that call.

Removing the handle (or leaving the ``with`` block, also on an exception) removes every
hook: the model is exactly as before, since steering never writes to a weight.

**Threads.** Steering is *context-local*: it acts only in the thread (or asyncio task,
or ``contextvars`` context) that applied it, so two threads can generate with the same
model under different steering without cross-talk; a thread that did not apply a
handle sees the unsteered model. Pass ``scope="global"`` to steer every caller
instead (for example when ``generate`` runs in a worker thread of a server).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from ...adapters import get_adapter, layer_hidden, replace_layer_hidden
from ...capture import HiddenCapture
from ...errors import LVLMSafetyError

POSITIONS = ("image", "text", "all")
PHASES = ("prompt", "generated", "both")
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("lvlm_safety_cmrm_active", default=frozenset())
_FORWARD: contextvars.ContextVar[dict[int, "_ForwardState"] | None] = contextvars.ContextVar("lvlm_safety_cmrm_forward", default=None)
_ids = itertools.count(1)
_IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "images")


@dataclass
class _ForwardState:
    mask: torch.Tensor | None = None  # [B, T] positions to steer in the current call
    any: bool = False  # some position is steered
    full: bool = False  # every position is steered (no multiply by the mask needed)
    weights: dict[Any, torch.Tensor] = field(default_factory=dict)  # mask as [B, T, 1] per (device, dtype)
    sample_shift: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H]
    busy: bool = False  # inside the extra measuring forwards: do not steer
    generate_images: dict[str, Any] = field(default_factory=dict)  # image inputs of the running generate()
    generate_ids: Any = None  # (input_ids, attention_mask) of the running generate()


def _past_length(kwargs: Mapping[str, Any]) -> int:
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class SteeringHandle:
    """Hooks that steer one model; ``remove()`` takes them all off again."""

    def __init__(
        self,
        model: torch.nn.Module,
        vectors: Mapping[int, torch.Tensor] | None,
        *,
        alpha: float | Sequence[float] = 1.0,
        layers: Sequence[int] | None = None,
        positions: str = "all",
        apply_to: str = "both",
        variant: str = "dataset",
        reference: str = "blank",
        measure_at: str = "last",
        processor: Any = None,
        noise_seed: int = 0,
        blank_fill: int = 0,
        scope: str = "context",
    ) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if apply_to not in PHASES:
            raise ValueError(f"apply_to must be one of {PHASES}, got {apply_to!r}")
        if variant not in ("dataset", "sample"):
            raise ValueError(f"variant must be 'dataset' or 'sample', got {variant!r}")
        if scope not in ("context", "global"):
            raise ValueError(f"scope must be 'context' or 'global', got {scope!r}")
        self.model = model
        self.adapter = get_adapter(model)
        if variant == "dataset":
            if not vectors:
                raise LVLMSafetyError("dataset-level CMRM needs calibrated vectors (cmrm.vectors)")
            chosen = sorted(vectors) if layers is None else self.adapter.resolve_layers(layers)
            missing = [l for l in chosen if l not in vectors]
            if missing:
                raise LVLMSafetyError(f"no calibrated vector for layers {missing} (the file has {sorted(vectors)})")
        else:
            chosen = self.adapter.resolve_layers(layers)
        self.layers = chosen
        alphas = [float(alpha)] * len(chosen) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        if len(alphas) != len(chosen):
            raise ValueError(f"alpha has {len(alphas)} values for {len(chosen)} steered layers")
        self.alpha = dict(zip(chosen, alphas))
        self.vectors = {l: vectors[l].detach().to(torch.float32) for l in chosen} if variant == "dataset" and vectors else {}
        self.positions, self.apply_to, self.variant = positions, apply_to, variant
        self.reference, self.measure_at = reference, measure_at
        self.processor, self.noise_seed, self.blank_fill = processor, noise_seed, blank_fill
        self.scope = scope
        self.id = next(_ids)
        self._handles: list[Any] = []
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._token: contextvars.Token | None = None
        self._generate_wrapper: Any = None
        try:
            if hasattr(model, "generate"):
                self._wrap_generate()
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            decoder = self.adapter.decoder_layers
            for layer in chosen:
                self._handles.append(decoder[layer].register_forward_hook(self._layer_hook(layer), prepend=True))
        except BaseException:
            self.remove()
            raise
        if scope == "context":
            _ACTIVE.set(_ACTIVE.get() | {self.id})

    def _wrap_generate(self) -> None:
        """Keep the inputs of a ``generate`` call. Newer transformers encode the image
        before the first forward and pass only its features (the sample-level reference
        needs the pixels), and the LLaVA framework's ``generate`` splices the image in
        and calls the forward with ``inputs_embeds`` only (the layout needs the ids with
        ``IMAGE_TOKEN_INDEX``)."""
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            state = self._state(create=True)
            assert state is not None
            state.generate_images = {k: kwargs[k] for k in _IMAGE_KEYS if kwargs.get(k) is not None}
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            state.generate_ids = (ids, kwargs.get("attention_mask")) if isinstance(ids, torch.Tensor) else None
            try:
                return original(*args, **kwargs)
            finally:
                state.generate_images = {}
                state.generate_ids = None

        self.model.generate = generate  # type: ignore[method-assign]
        self._generate_wrapper = generate

    # -- state ------------------------------------------------------------------

    @property
    def active(self) -> bool:
        if not self._handles:
            return False
        return self.scope == "global" or self.id in _ACTIVE.get()

    def _state(self, create: bool = False) -> _ForwardState | None:
        states = _FORWARD.get()
        if states is None:
            if not create:
                return None
            states = {}
            _FORWARD.set(states)
        if create and self.id not in states:
            states[self.id] = _ForwardState()
        return states.get(self.id)

    # -- hooks --------------------------------------------------------------------

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return None
        state = self._state(create=True)
        assert state is not None
        if state.busy:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention = kwargs.get("attention_mask")
        prefill = _past_length(kwargs) == 0
        if input_ids is None:
            embeds = kwargs.get("inputs_embeds")
            if prefill and state.generate_ids is not None and embeds is not None:
                # the LLaVA framework: generate() spliced the image in; lay out its ids
                input_ids, attention = state.generate_ids
            elif embeds is not None and not prefill:
                input_ids = embeds[..., 0].long()  # only the shape is used for decode steps
            else:
                raise LVLMSafetyError(
                    f"CMRM steering needs input_ids in the forward of {type(module).__name__} (got inputs_embeds only)"
                )
        if prefill:  # the prompt
            batch = {"input_ids": input_ids, "attention_mask": attention}
            layout = self.adapter.layout(batch)
            if self.apply_to == "generated":
                mask = torch.zeros_like(layout.attention_mask)
            else:
                mask = {"image": layout.image_mask, "text": layout.text_mask, "all": layout.attention_mask}[self.positions]
            self._set_mask(state, mask)
            if self.variant == "sample":
                state.sample_shift = self._measure(kwargs, input_ids, attention, state)
        else:  # decode: generated tokens
            steer_new = self.apply_to != "prompt" and self.positions != "image"
            shape = tuple(input_ids.shape[:2])
            self._set_mask(state, torch.full(shape, steer_new, dtype=torch.bool, device=input_ids.device))
        return None

    @staticmethod
    def _set_mask(state: _ForwardState, mask: torch.Tensor) -> None:
        """Store the steered positions of this forward, with what every layer hook
        would otherwise recompute (computed once per forward, not once per layer)."""
        state.mask = mask
        state.any = bool(mask.any())
        state.full = state.any and bool(mask.all())
        state.weights = {}

    def _measure(self, kwargs: Mapping[str, Any], input_ids: torch.Tensor, attention: Any, state: _ForwardState) -> dict[int, torch.Tensor]:
        """The per-input shift h(prompt, reference image) - h(prompt, text only) at the
        steered layers (the input's own image when ``reference`` is ``none``)."""
        batch = {"input_ids": input_ids, "attention_mask": attention if attention is not None else torch.ones_like(input_ids)}
        for key in _IMAGE_KEYS:
            if kwargs.get(key) is not None:
                batch[key] = kwargs[key]
            elif key in state.generate_images:
                batch[key] = state.generate_images[key]
        if self.reference == "none":
            with_image = batch
        else:
            image_processor = getattr(self.processor, "image_processor", None)
            with_image = self.adapter.blank_image_batch(batch, self.reference, seed=self.noise_seed, image_processor=image_processor, fill=self.blank_fill)
        text_only = self.adapter.text_only_batch(batch)
        state.busy = True
        try:
            pooled = []
            for inputs in (with_image, text_only):
                layout = self.adapter.layout(inputs)
                mask = layout.attention_mask if self.measure_at == "last" else layout.text_mask
                with torch.no_grad(), HiddenCapture(self.adapter, self.layers, {"m": mask}, self.measure_at, detach=True) as cap:
                    cap.run(self.model, **inputs)
                pooled.append(cap.stacked("m"))
        finally:
            state.busy = False
        diff = (pooled[0].float() - pooled[1].float())
        return {layer: diff[i] for i, layer in enumerate(self.layers)}

    def _vector(self, layer: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (layer, device, dtype)
        if key not in self._cache:
            self._cache[key] = (self.alpha[layer] * self.vectors[layer]).to(device=device, dtype=dtype)
        return self._cache[key]

    def _layer_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if not self.active:
                return None
            state = self._state()
            if state is None or state.busy or state.mask is None:
                return None
            hidden = layer_hidden(output)
            mask = state.mask
            if tuple(mask.shape) != tuple(hidden.shape[:2]):
                raise LVLMSafetyError(
                    f"CMRM steering at layer {layer}: the hidden states are {tuple(hidden.shape[:2])} (batch, length) "
                    f"but the steered positions are {tuple(mask.shape)}"
                )
            if not state.any:
                return None
            if self.variant == "dataset":
                delta = self._vector(layer, hidden.device, hidden.dtype).view(1, 1, -1)
            else:
                delta = (self.alpha[layer] * state.sample_shift[layer]).to(hidden.device, hidden.dtype).unsqueeze(1)
            if state.full:
                return replace_layer_hidden(output, hidden - delta)
            key = (hidden.device, hidden.dtype)
            weight = state.weights.get(key)
            if weight is None:
                weight = state.weights[key] = mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
            return replace_layer_hidden(output, hidden - delta * weight)

        return hook

    # -- lifecycle ------------------------------------------------------------------

    def remove(self) -> None:
        """Take every hook off (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        if self._generate_wrapper is not None and self.model.__dict__.get("generate") is self._generate_wrapper:
            del self.model.generate
        self._generate_wrapper = None
        states = _FORWARD.get()
        if states:
            states.pop(self.id, None)
        if self.scope == "context" and self.id in _ACTIVE.get():
            _ACTIVE.set(_ACTIVE.get() - {self.id})
        self._cache.clear()

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply(model: torch.nn.Module, vectors: Any = None, **options: Any) -> SteeringHandle:
    """Install CMRM steering; ``vectors`` is a :class:`SteeringVectors`, a mapping
    ``{layer: tensor}``, or ``None`` for the sample-level variant. Options: ``alpha``,
    ``layers``, ``positions``, ``apply_to``, ``variant``, ``reference``,
    ``measure_at``, ``processor``, ``noise_seed``, ``blank_fill``, ``scope``."""
    table = getattr(vectors, "vectors", vectors)
    return SteeringHandle(model, table, **options)


@contextlib.contextmanager
def steer(model: torch.nn.Module, vectors: Any = None, **options: Any) -> Iterator[SteeringHandle]:
    """``with steer(model, vectors, alpha=1.0): model.generate(...)``; the hooks are
    removed on exit, also when the body raises."""
    handle = apply(model, vectors, **options)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = ["SteeringHandle", "apply", "steer"]
