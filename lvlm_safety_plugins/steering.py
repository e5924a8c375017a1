"""The steering primitive: edit decoder hidden states inside ``forward`` and ``generate``.

Every steering method (CMRM, the example ShiftDC plugin, third-party methods) installs
its hooks through :func:`apply` (or :func:`steer`, its context-manager form) and says
only *what* to add to the hidden states; this module decides *where* and *when*:

- **Prefill or decode** is read off the forward call itself, not off keyword names
  that move between transformers versions: a forward whose KV cache (found by type)
  already holds positions, or whose attention mask is wider than its new tokens, is a
  decode step (:func:`lvlm_safety_plugins.compat.past_length`). ``generate(use_cache=False)``
  re-runs the whole sequence at every step: the tokens past the ``generate`` call's own
  ``input_ids`` count as generated there, and ``prepare`` runs once per call.
- **Positions**: ``"image"`` (image-feature positions of the prompt), ``"text"`` (the
  prompt's text tokens), ``"generated"`` (tokens fed in decode steps), or a set of
  them; ``"prompt"`` is image + text and ``"all"`` is all three. The filter
  ``"after_image"`` narrows the kinds it is listed with to the positions at or after
  each row's first image position, in rows that have an image (text-only rows are not
  steered at all): ``"from_image"`` = ``{"image", "text", "generated", "after_image"}``
  is the image, the prompt text after it and the generated tokens. Prompt positions come
  from the model adapter's :class:`~lvlm_safety_plugins.adapters.SequenceLayout` in
  the decoder's own coordinates (models that splice image features in are handled by
  their adapter). Padding is never steered, in the prompt or in decode steps.
- **Context-local** (the default, ``scope="context"``): a handle steers only the
  thread, asyncio task or ``contextvars`` context that applied it; other callers of the
  same model see it unsteered. ``scope="global"`` steers every caller.
- **Nesting**: inside :func:`unsteered`, the handles applied before the block do not
  act; handles applied inside it do (a method measuring under its own steering).
- **Exact removal**: ``remove()`` (or leaving the ``with`` block, also on an exception)
  takes every hook off; steering never writes to a weight.

A method supplies an *edit*: ``edit(layer, hidden, step) -> delta`` returns what is
added to the layer's output hidden states ``[batch, length, hidden]``, a tensor that
broadcasts to them (``[hidden]``, ``[batch, 1, hidden]`` or the full shape), or
``None`` to leave this layer alone in this forward. The primitive applies it only at
the chosen positions. An optional ``prepare(step)`` runs once per prompt (prefill)
forward, before any layer: the place to measure something per input (CMRM's
sample-level shift) and keep it in ``step.memory``, which lasts through the decode
steps that follow. Extra forwards made there must run inside :func:`unsteered`.

>>> from lvlm_safety_plugins import steering
>>> with steering.add_vectors(model, {10: v10, 11: v11}, scale=-1.0, positions="image"):  # doctest: +SKIP
...     model.generate(**inputs)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

from . import compat
from .adapters import get_adapter
from .adapters.base import ModelAdapter, SequenceLayout
from .errors import LVLMSafetyError, ServingError, SteeringError

#: the position kinds a steering handle can act on
POSITION_KINDS = ("image", "text", "generated")
#: filters that narrow the kinds listed with them (never steer anything on their own)
POSITION_FILTERS = ("after_image",)
#: names for sets of position kinds
POSITION_ALIASES: Mapping[str, frozenset[str]] = {
    "prompt": frozenset({"image", "text"}),
    "all": frozenset(POSITION_KINDS),
    "from_image": frozenset({*POSITION_KINDS, "after_image"}),
}
PHASES = ("prompt", "generated")

Positions = Union[str, Iterable[str]]
Edit = Callable[[int, torch.Tensor, "SteeringStep"], "torch.Tensor | None"]
Prepare = Callable[["SteeringStep"], None]

_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("lvlm_safety_steering_active", default=frozenset())
_STATES: contextvars.ContextVar[tuple[int, dict[int, "_State"]] | None] = contextvars.ContextVar(
    "lvlm_safety_steering_states", default=None)
#: handles with an id up to this one do not act (set by :func:`unsteered`)
_SUSPENDED: contextvars.ContextVar[int] = contextvars.ContextVar("lvlm_safety_steering_suspended", default=0)
_GENERATE: contextvars.ContextVar[Mapping[int, "_GenerateCall"]] = contextvars.ContextVar(
    "lvlm_safety_steering_generate", default={})
_ids = itertools.count(1)
_last_id = 0
_wrap_lock = threading.Lock()


def _new_id() -> int:
    global _last_id
    with _wrap_lock:
        _last_id = next(_ids)
        return _last_id


def resolve_positions(positions: Positions) -> frozenset[str]:
    """``"image"``, ``"text"``, ``"generated"``, ``"prompt"``, ``"all"``,
    ``"from_image"`` or a collection of them (with the filter ``"after_image"``), as a
    set of position kinds and filters."""
    names = [positions] if isinstance(positions, str) else list(positions)
    out: set[str] = set()
    for name in names:
        if name in POSITION_ALIASES:
            out |= POSITION_ALIASES[name]
        elif name in POSITION_KINDS or name in POSITION_FILTERS:
            out.add(name)
        else:
            valid = ", ".join((*POSITION_KINDS, *POSITION_FILTERS, *POSITION_ALIASES))
            raise SteeringError(f"unknown steering position {name!r}; valid: {valid}")
    if not out - set(POSITION_FILTERS):
        raise SteeringError(f"no steering positions given (a filter such as 'after_image' needs kinds to narrow: {', '.join(POSITION_KINDS)})")
    return frozenset(out)


def after_image_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, length]``: the positions at or after each row's first image position
    (all False in a row without an image)."""
    L = image_mask.shape[1]
    column = torch.arange(L, device=image_mask.device).expand_as(image_mask)
    first = torch.where(image_mask, column, torch.full_like(column, L)).min(dim=1, keepdim=True).values
    return column >= first


def prompt_mask(layout: SequenceLayout, positions: frozenset[str], generated: torch.Tensor | None = None) -> torch.Tensor:
    """The bool ``[batch, length]`` positions a prompt (prefill) forward with ``layout``
    steers for the resolved ``positions`` (:func:`resolve_positions`); ``generated``
    marks decoder positions that hold generated tokens (a cache-less re-run), steered
    only with ``"generated"``. Never padding."""
    wanted = positions & {"image", "text"}
    if generated is None:
        generated = torch.zeros_like(layout.attention_mask)
    if wanted == {"image", "text"}:
        mask = layout.attention_mask & ~generated
    elif wanted == {"image"}:
        mask = layout.image_mask
    elif wanted == {"text"}:
        mask = layout.text_mask & ~generated
    else:
        mask = torch.zeros_like(layout.attention_mask)
    if "generated" in positions:
        mask = mask | generated
    if "after_image" in positions:
        mask = mask & after_image_mask(layout.image_mask)
    return mask


@dataclass
class SteeringStep:
    """What an edit knows about the forward call it is steering.

    ``phase`` is ``"prompt"`` (a prefill: nothing in the KV cache yet) or
    ``"generated"`` (a decode step, or any continuation of a cached sequence). A
    cache-less re-run of ``generate(use_cache=False)`` is a ``"prompt"`` forward whose
    ``mask`` also covers the generated tail (when ``"generated"`` is steered) and whose
    ``memory`` is kept from the call's first forward.
    ``mask`` is the bool ``[batch, length]`` of the positions steered in this forward
    (never padding). ``layout`` (prompt phase only) places image, text and padding in
    the decoder's sequence. ``inputs`` are the forward's keyword arguments; in the
    prompt phase of a ``generate`` call they also hold the ``generate`` call's
    ``input_ids``/``attention_mask`` where the forward got embeddings only, and its
    image inputs where the forward got encoded features only. ``memory`` is the
    handle's per-context store, emptied at every prompt forward and kept through the
    decode steps that follow.
    """

    phase: str
    past_length: int
    mask: torch.Tensor
    inputs: Mapping[str, Any]
    memory: dict[str, Any]
    layout: SequenceLayout | None = None
    any: bool = False
    full: bool = False
    _weights: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """The mask as ``[batch, length, 1]`` in ``like``'s device and dtype (cached)."""
        key = (like.device, like.dtype)
        out = self._weights.get(key)
        if out is None:
            out = self._weights[key] = self.mask.to(device=like.device, dtype=like.dtype).unsqueeze(-1)
        return out


@dataclass
class _State:
    memory: dict[str, Any] = field(default_factory=dict)
    step: SteeringStep | None = None
    #: ``[batch]`` bool: the rows of the last prompt forward that have an image
    image_rows: torch.Tensor | None = None


@dataclass
class _GenerateCall:
    args: tuple
    kwargs: dict[str, Any]
    #: handles that have seen this call's prompt forward
    prompted: set[int] = field(default_factory=set)

    def input_ids(self) -> tuple[Any, Any]:
        ids = self.kwargs.get("input_ids", self.kwargs.get("inputs", self.args[0] if self.args else None))
        return (ids, self.kwargs.get("attention_mask")) if isinstance(ids, torch.Tensor) else (None, None)


@contextlib.contextmanager
def unsteered() -> Iterator[None]:
    """Inside the block, no steering handle applied before it acts in this context: for
    the extra forwards a method makes to measure the unsteered model (CMRM's sample
    level). Handles applied inside the block act there as usual."""
    token = _SUSPENDED.set(max(_SUSPENDED.get(), _last_id))
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


class _SharedWrapper:
    """A callable set as one object's instance attribute ``attr`` (wrapping what was
    there), shared by every handle that needs it: handles join with :meth:`join`, each
    with a key and a payload, and the object's own attribute comes back when the last
    one leaves."""

    attr: str = ""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.previous = owner.__dict__.get(self.attr)  # an instance attribute someone else set, or None
        self.inner = getattr(owner, self.attr)
        self.users: list[tuple[int, Any]] = []
        functools.update_wrapper(self, self.inner)  # type: ignore[arg-type]

    @classmethod
    def join(cls, owner: Any, key: int, payload: Any = None) -> "_Removal":
        with _wrap_lock:
            wrapper = owner.__dict__.get(cls.attr)
            if not isinstance(wrapper, cls):
                wrapper = cls(owner)
                setattr(owner, cls.attr, wrapper)
            wrapper.users.append((key, payload))
        return _Removal(wrapper, key)

    def leave(self, key: int) -> None:
        with _wrap_lock:
            self.users = [(k, p) for k, p in self.users if k != key]
            if self.users or self.owner.__dict__.get(self.attr) is not self:
                return
            if self.previous is None:
                delattr(self.owner, self.attr)
            else:
                setattr(self.owner, self.attr, self.previous)


class _GenerateRecorder(_SharedWrapper):
    """``model.generate``, wrapped so that the prompt forward can see the ``generate``
    call's own inputs (kept in a context variable for the length of the call)."""

    attr = "generate"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _GENERATE.set({**_GENERATE.get(), id(self.owner): _GenerateCall(args, kwargs)})
        try:
            return self.inner(*args, **kwargs)
        finally:
            _GENERATE.reset(token)


class _LayerDispatch(_SharedWrapper):
    """One decoder layer's steering: its ``forward``, wrapped once (at the instance)
    for every handle that steers it, applies their edits (the payloads) in the order
    they were installed.

    Not a forward hook: transformers 4.54 to 5.9 record ``output_hidden_states`` by
    patching each layer's ``forward`` during the call, which forward hooks run after,
    so hooked edits would be missing from the reported states; an edit made inside
    ``forward`` is what every recorder, hook and later layer sees, in every version.
    """

    attr = "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.inner(*args, **kwargs)
        for _, fn in tuple(self.users):
            new = fn(self.owner, args, output)
            if new is not None:
                output = new
        return output


class _ForwardDispatch(_SharedWrapper):
    """The model's ``forward``, wrapped once (at the instance) for every handle: each
    handle's pre-step (the payload) runs before the forward, in install order.

    Not a forward pre-hook: registering a hook with keyword arguments updates two of the
    module's dicts one after the other, so a forward running in another thread at that
    moment could call the hook without its keyword arguments; setting one instance
    attribute is atomic."""

    attr = "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for _, fn in tuple(self.users):
            fn(self.owner, args, kwargs)
        return self.inner(*args, **kwargs)


@dataclass
class _Removal:
    wrapper: _SharedWrapper
    key: int

    def remove(self) -> None:
        self.wrapper.leave(self.key)


class SteeringHandle:
    """Hooks that steer one model; ``remove()`` takes them all off again.

    Made by :func:`apply`; see the module documentation for what it does.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        edit: Edit,
        *,
        layers: Sequence[int] | None = None,
        positions: Positions = "all",
        prepare: Prepare | None = None,
        scope: str = "context",
        adapter: ModelAdapter | None = None,
        name: str = "steering",
    ) -> None:
        if scope not in ("context", "global"):
            raise SteeringError(f"scope must be 'context' or 'global', got {scope!r}")
        if not callable(edit):
            raise SteeringError(f"edit must be callable (layer, hidden, step) -> delta, got {type(edit).__name__}")
        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.layers = self.adapter.resolve_layers(layers)
        self.positions = resolve_positions(positions)
        self.edit, self.prepare = edit, prepare
        self.scope, self.name = scope, name
        self.id = _new_id()
        self._handles: list[Any] = []
        try:
            if callable(getattr(model, "generate", None)):
                self._handles.append(_GenerateRecorder.join(model, self.id))
            self._handles.append(_ForwardDispatch.join(model, self.id, self._pre_hook))
            decoder = self.adapter.decoder_layers
            for layer in self.layers:
                # inside the layer's forward: what output_hidden_states and every hook see
                self._handles.append(_LayerDispatch.join(decoder[layer], self.id, self._layer_hook(layer)))
        except BaseException:
            self.remove()
            raise
        if scope == "context":
            _ACTIVE.set(_ACTIVE.get() | {self.id})

    # -- state ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Installed, and acting in the calling context."""
        if not self._handles:
            return False
        return self.scope == "global" or self.id in _ACTIVE.get()

    def _acting(self) -> bool:
        return self.active and self.id > _SUSPENDED.get()

    def _state(self, create: bool = False) -> _State | None:
        thread = threading.get_ident()
        held = _STATES.get()
        if held is None or held[0] != thread:  # a context copied into another thread starts afresh
            if not create:
                return None
            held = (thread, {})
            _STATES.set(held)
        states = held[1]
        if create and self.id not in states:
            states[self.id] = _State()
        return states.get(self.id)

    # -- hooks ----------------------------------------------------------------------

    @staticmethod
    def _prompt_inputs(args: tuple, kwargs: Mapping[str, Any], call: _GenerateCall | None) -> dict[str, Any]:
        inputs = dict(kwargs)
        if inputs.get("input_ids") is None and args and isinstance(args[0], torch.Tensor):
            inputs["input_ids"] = args[0]
        if call is not None:
            if inputs.get("input_ids") is None:
                # the LLaVA framework's generate spliced the image in and gives the
                # forward embeddings only: lay out the ids generate was called with
                ids, attention = call.input_ids()
                if ids is not None:
                    inputs["input_ids"], inputs["attention_mask"] = ids, attention
            for key in compat.GENERATE_IMAGE_KEYS:
                if inputs.get(key) is None and call.kwargs.get(key) is not None:
                    inputs[key] = call.kwargs[key]
        return inputs

    def _generated_tail(self, inputs: Mapping[str, Any], call: _GenerateCall | None) -> int:
        """How many trailing ``input_ids`` columns of a cache-less forward are tokens the
        running ``generate`` produced: ``generate(use_cache=False)`` re-runs the whole
        sequence at every step (0 outside such a re-run)."""
        ids = inputs.get("input_ids")
        if call is None or self.id not in call.prompted or not isinstance(ids, torch.Tensor):
            return 0
        prompt, _ = call.input_ids()
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or ids.shape[1] <= prompt.shape[1]:
            return 0
        if prompt.shape[0] != ids.shape[0] or not torch.equal(ids[:, : prompt.shape[1]], prompt.to(ids.device)):
            return 0
        return int(ids.shape[1] - prompt.shape[1])

    def _prompt_mask(self, module: torch.nn.Module, inputs: Mapping[str, Any], tail: int = 0) -> tuple[torch.Tensor, SequenceLayout | None]:
        wanted = self.positions & {"image", "text"}
        narrowed = "after_image" in self.positions
        if inputs.get("input_ids") is None:
            embeds = inputs.get("inputs_embeds")
            if wanted == {"image", "text"} and not narrowed and isinstance(embeds, torch.Tensor):
                attention = inputs.get("attention_mask")
                B, T = embeds.shape[:2]
                real = attention.bool() if isinstance(attention, torch.Tensor) and tuple(attention.shape) == (B, T) else \
                    torch.ones(B, T, dtype=torch.bool, device=embeds.device)
                return real, None
            if not wanted and not narrowed and isinstance(embeds, torch.Tensor):
                return torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device), None
            raise LVLMSafetyError(
                f"{self.name}: steering image or text positions (or after the image) needs input_ids in the forward of "
                f"{type(module).__name__} (it got inputs_embeds only, outside a generate call)"
            )
        ids = inputs["input_ids"]
        layout = self.adapter.layout({"input_ids": ids, "attention_mask": inputs.get("attention_mask")})
        generated = torch.zeros_like(layout.attention_mask)
        if tail:  # decoder positions that come from the generated ids columns
            column = layout.token_index if layout.token_index is not None else \
                torch.arange(layout.length, device=generated.device).expand_as(generated)
            generated = (column >= ids.shape[1] - tail) & layout.attention_mask
        return prompt_mask(layout, self.positions, generated), layout

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._acting():
            return None
        state = self._state(create=True)
        assert state is not None
        tokens = compat.forward_tokens(args, kwargs)
        length = None if tokens is None else int(tokens.shape[1])
        past = compat.past_length(args, kwargs, length)
        rerun = False
        if past == 0:
            call = _GENERATE.get().get(id(self.model))
            inputs = self._prompt_inputs(args, kwargs, call)
            tail = self._generated_tail(inputs, call)
            rerun = tail > 0
            mask, layout = self._prompt_mask(module, inputs, tail)
            if layout is not None:
                state.image_rows = layout.image_mask.any(dim=1)
            if not rerun:
                state.memory = {}
                if call is not None:
                    call.prompted.add(self.id)
            step = SteeringStep("prompt", 0, mask.bool(), inputs, state.memory, layout)
        else:
            if tokens is None or length is None:
                raise LVLMSafetyError(f"{self.name}: a decode step of {type(module).__name__} got neither input_ids nor inputs_embeds")
            mask = torch.zeros(int(tokens.shape[0]), length, dtype=torch.bool, device=tokens.device)
            if "generated" in self.positions:
                attention = kwargs.get("attention_mask")
                if isinstance(attention, torch.Tensor) and attention.dim() == 2 and attention.shape[1] >= length:
                    mask = attention[:, -length:].to(mask.device).bool()  # padding-safe continuation
                else:
                    mask = ~mask
                if "after_image" in self.positions:
                    # generated tokens come after the image, in the rows that have one
                    rows = state.image_rows
                    if rows is None or int(rows.shape[0]) != int(mask.shape[0]):
                        rows = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
                    mask = mask & rows.to(mask.device).unsqueeze(1)
            step = SteeringStep("generated", past, mask, kwargs, state.memory)
        step.any = bool(step.mask.any())
        step.full = step.any and bool(step.mask.all())
        state.step = None  # a failing prepare leaves no half-made step behind
        if step.phase == "prompt" and not rerun and self.prepare is not None:
            self.prepare(step)
        state.step = step
        return None

    def _layer_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if not self._acting():
                return None
            state = self._state()
            if state is None or state.step is None:
                return None
            step = state.step
            hidden = compat.layer_hidden(output)
            if tuple(step.mask.shape) != tuple(hidden.shape[:2]):
                raise LVLMSafetyError(
                    f"{self.name} at layer {layer}: the hidden states are {tuple(hidden.shape[:2])} (batch, length) "
                    f"but the steered positions of this {step.phase} forward are {tuple(step.mask.shape)}"
                )
            if not step.any:
                return None
            delta = self.edit(layer, hidden, step)
            if delta is None:
                return None
            if step.full:
                return compat.replace_layer_hidden(output, hidden + delta)
            return compat.replace_layer_hidden(output, hidden + delta * step.weight(hidden))

        return hook

    # -- lifecycle --------------------------------------------------------------------

    def remove(self) -> None:
        """Take every hook off (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        held = _STATES.get()
        if held is not None:
            held[1].pop(self.id, None)
        if self.scope == "context" and self.id in _ACTIVE.get():
            _ACTIVE.set(_ACTIVE.get() - {self.id})

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else ("installed" if self._handles else "removed")
        return (f"<SteeringHandle {self.name} layers={self.layers} positions={sorted(self.positions)} "
                f"scope={self.scope} {state}>")


class ServingSteeringHandle:
    """Hooks that steer a vLLM model; ``remove()`` takes them off again (the serving
    mode of :func:`apply`; see :mod:`lvlm_safety_plugins.serving`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        edit: Any,
        *,
        layers: Sequence[int] | None,
        positions: frozenset[str],
        prepare: Any,
        adapter: "ModelAdapter",
        name: str,
    ) -> None:
        if not callable(edit):
            raise SteeringError(f"edit must be callable (layer, hidden, step) -> delta, got {type(edit).__name__}")
        if prepare is not None:
            raise ServingError(
                f"{name}: sample-level steering (a prepare function that measures every input with its own reference "
                "forward, as CMRM's sample level does) cannot run inside vLLM: the engine schedules the forward passes, "
                "and an extra forward per request is not one of them. Use dataset-level vectors (cmrm.variant=dataset) "
                "or a folded checkpoint (docs/serving.md)"
            )
        if positions != frozenset(POSITION_KINDS):
            raise ServingError(
                f"{name}: vLLM can steer positions 'all' only, not {sorted(positions)}: it runs prompt chunks and decode "
                "tokens of many requests in one flattened batch (continuous batching, chunked prefill) and never "
                "recomputes a cached prefix, so a token's request, prompt length and first image are not known there. "
                "Set the method's positions to 'all' (e.g. cmrm.positions=all cmrm.apply_to=both) (docs/serving.md)"
            )
        self.model = model
        self.adapter = adapter
        self.layers = adapter.resolve_layers(layers)
        self.positions = positions
        self.edit = edit
        self.name = name
        self.scope = "global"
        self._handles: list[Any] = []
        decoder = adapter.decoder_layers
        try:
            for layer in self.layers:
                self._handles.append(decoder[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            paired = isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)
            hidden = output[0] if isinstance(output, tuple) else output
            stream = hidden + output[1] if paired else hidden  # the residual stream after this layer
            rows = stream.reshape(1, -1, stream.shape[-1])
            step = SteeringStep(phase="serving", past_length=0, inputs={}, memory={}, any=True, full=True,
                                   mask=torch.ones(rows.shape[:2], dtype=torch.bool, device=rows.device))
            delta = self.edit(layer, rows, step)
            if delta is None:
                return None
            delta = torch.as_tensor(delta, device=hidden.device).to(hidden.dtype)
            new = hidden + torch.broadcast_to(delta, rows.shape).reshape(hidden.shape)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        return hook

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "ServingSteeringHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<ServingSteeringHandle {self.name} layers={self.layers} {'active' if self.active else 'removed'}>"


def apply(
    model: torch.nn.Module,
    edit: Edit,
    *,
    layers: Sequence[int] | None = None,
    positions: Positions = "all",
    prepare: Prepare | None = None,
    scope: str = "context",
    adapter: ModelAdapter | None = None,
    name: str = "steering",
) -> "SteeringHandle | ServingSteeringHandle":
    """Steer ``model``: at each of ``layers`` (``None``: all; negative ids count from the
    end) add ``edit(layer, hidden, step)`` to the hidden states at ``positions``;
    ``prepare(step)`` runs once per prompt forward; ``name`` appears in errors. Returns
    the :class:`SteeringHandle`. A vLLM model gets the serving mode
    (:class:`lvlm_safety_plugins.serving.ServingSteeringHandle`: positions ``"all"``
    only, no ``prepare``; other modes raise ``ServingError`` saying why)."""
    if compat.is_serving_model(model):
        return ServingSteeringHandle(model, edit, layers=layers, positions=resolve_positions(positions), prepare=prepare,
                                     adapter=adapter if adapter is not None else get_adapter(model), name=name)
    return SteeringHandle(model, edit, layers=layers, positions=positions, prepare=prepare, scope=scope,
                          adapter=adapter, name=name)


@contextlib.contextmanager
def steer(model: torch.nn.Module, edit: Edit, **options: Any) -> Iterator[SteeringHandle]:
    """:func:`apply` for the body of a ``with`` block; the hooks are removed on exit,
    also when the body raises."""
    handle = apply(model, edit, **options)
    try:
        yield handle
    finally:
        handle.remove()


def vector_edit(vectors: Mapping[int, torch.Tensor], scale: float | Mapping[int, float] = 1.0) -> Edit:
    """An edit that adds ``scale_l * vectors[l]`` at layer ``l`` (a float ``scale`` for
    every layer, or one per layer); the scaled vector is cast once per device and dtype."""
    table = {int(l): v.detach().to(torch.float32) for l, v in vectors.items()}
    scales = {l: float(scale) for l in table} if isinstance(scale, (int, float)) else {int(l): float(s) for l, s in scale.items()}
    missing = sorted(set(table) - set(scales))
    if missing:
        raise SteeringError(f"no scale for layers {missing}")
    cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def edit(layer: int, hidden: torch.Tensor, step: SteeringStep) -> torch.Tensor | None:
        key = (layer, hidden.device, hidden.dtype)
        delta = cache.get(key)
        if delta is None:
            vector = table.get(layer)
            if vector is None:
                return None
            if vector.shape[-1] != hidden.shape[-1]:
                raise LVLMSafetyError(f"layer {layer}: the steering vector has size {vector.shape[-1]}, the hidden states {hidden.shape[-1]}")
            delta = cache[key] = (scales[layer] * vector).to(device=hidden.device, dtype=hidden.dtype)
        return delta

    return edit


def add_vectors(
    model: torch.nn.Module,
    vectors: Mapping[int, torch.Tensor],
    *,
    scale: float | Sequence[float] | Mapping[int, float] = 1.0,
    positions: Positions = "all",
    scope: str = "context",
    adapter: "ModelAdapter | None" = None,
    name: str = "steering",
) -> SteeringHandle:
    """Add ``scale * vectors[l]`` to the output of every layer ``l`` in ``vectors`` at
    ``positions`` (``scale=-alpha`` subtracts). ``scale`` is one float, one per layer in
    sorted layer order, or a ``{layer: float}`` mapping. ``positions``, ``scope``,
    ``adapter`` and ``name`` are :func:`apply`'s."""
    adapter = adapter if adapter is not None else get_adapter(model)
    # negative ids are normalised once; two keys naming one layer ({-1: v, 3: w} on 4
    # layers) are a LayerError naming both, never one vector silently dropped
    layers = adapter.resolve_layers(sorted(int(l) for l in vectors))
    table = {resolved: vectors[original] for resolved, original in zip(layers, sorted(vectors))}
    if isinstance(scale, (int, float)):
        scales: float | Mapping[int, float] = float(scale)
        named = {"scale": float(scale)}
    elif isinstance(scale, Mapping):
        keys = adapter.resolve_layers([int(l) for l in scale])
        scales = {resolved: float(scale[l]) for resolved, l in zip(keys, scale)}
        named = {f"scale[{l}]": v for l, v in scales.items()}
    else:
        values = [float(s) for s in scale]
        if len(values) != len(layers):
            raise SteeringError(f"scale has {len(values)} values for {len(layers)} steered layers")
        scales = dict(zip(layers, values))
        named = {f"scale[{i}]": v for i, v in enumerate(values)}
    bad = [k for k, v in named.items() if not math.isfinite(v)]
    if bad:
        raise SteeringError(f"{', '.join(bad)} is not finite ({', '.join(str(named[k]) for k in bad)}): a steering scale "
                            "must be a finite number")
    for layer, vector in table.items():
        if not isinstance(vector, torch.Tensor):
            raise SteeringError(f"layer {layer}: expected a tensor, got {type(vector).__name__}")
        if tuple(vector.shape) != (adapter.hidden_size,):
            raise SteeringError(f"layer {layer}: expected a vector of size {adapter.hidden_size}, got shape {tuple(vector.shape)}")
        if not bool(torch.isfinite(vector).all()):
            raise SteeringError(f"layer {layer}: the vector has {int((~torch.isfinite(vector)).sum())} non-finite values "
                                "(NaN or inf); steering with it would make every logit NaN")
    return apply(model, vector_edit(table, scales), layers=layers, positions=positions, scope=scope, adapter=adapter, name=name)


__all__ = [
    "Edit",
    "ServingSteeringHandle",
    "POSITION_ALIASES",
    "POSITION_FILTERS",
    "POSITION_KINDS",
    "Positions",
    "Prepare",
    "SteeringHandle",
    "SteeringStep",
    "add_vectors",
    "after_image_mask",
    "apply",
    "prompt_mask",
    "resolve_positions",
    "steer",
    "unsteered",
    "vector_edit",
]
