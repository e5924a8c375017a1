"""Steering inside a serving engine's model (vLLM): the steering primitive's serving mode.

:func:`lvlm_safety_plugins.steering.apply` hands a vLLM model (a module of
``vllm.model_executor.models``) to :class:`ServingSteeringHandle`, so a plugin's
``install_steering`` works unchanged there, within what a serving engine allows:

- vLLM runs every scheduled request in **one flattened batch** (``[num_tokens, hidden]``):
  prompt chunks and decode tokens of different requests side by side (continuous
  batching, chunked prefill), and a prefix found in the cache is never recomputed
  (prefix caching). Only ``positions="all"`` (every token of every request) is
  therefore steered exactly: image-only, text-only, generated-only and ``after_image``
  positions would need each token's request, its prompt length and its first image,
  which a chunk of a cached prefix does not carry. They raise :class:`ServingError`.
- Sample-level steering (a ``prepare`` function that measures each input with an extra
  reference forward, CMRM's sample level) cannot run there: the engine schedules the
  forward passes, and an extra forward per request is not one of them. It raises
  :class:`ServingError`; use dataset-level vectors (or fold them, docs/serving.md).
- Every request is steered while the handle is installed (``scope`` is global: the
  engine's forward runs in its own thread or process, not in the caller's context).

The edit sees the layer's output as a batch of one row, ``[1, num_tokens, hidden]``
(the residual stream: vLLM's decoder layers return ``(hidden, residual)``, whose sum it
is), with ``step.phase == "serving"`` and ``step.mask`` all True; what it returns is
added to the layer's output. CUDA graphs capture the hooks' operations only in eager
mode: serve with ``enforce_eager=True`` (the integration checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import ServingError

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import ModelAdapter

#: the module prefix of vLLM's model classes
VLLM_MODEL_PREFIX = "vllm.model_executor.models"


def is_serving_model(model: Any) -> bool:
    """True for a model built by vLLM (its class lives in ``vllm.model_executor.models``)."""
    return type(model).__module__.startswith(VLLM_MODEL_PREFIX)


class ServingSteeringHandle:
    """Hooks that steer a vLLM model; ``remove()`` takes them off again."""

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
        from .steering import POSITION_KINDS, SteeringStep

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
        self._step_type = SteeringStep
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
            step = self._step_type(phase="serving", past_length=0, inputs={}, memory={}, any=True, full=True,
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


__all__ = ["ServingError", "ServingSteeringHandle", "VLLM_MODEL_PREFIX", "is_serving_model"]
