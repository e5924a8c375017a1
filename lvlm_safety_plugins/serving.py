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

This module names the serving mode's public pieces: the handle lives with the primitive
(:mod:`lvlm_safety_plugins.steering`), the check for a vLLM model with the other
couplings (:mod:`lvlm_safety_plugins.compat`).
"""

from .compat import VLLM_MODEL_PREFIX, is_serving_model
from .errors import ServingError
from .steering import ServingSteeringHandle

__all__ = ["ServingError", "ServingSteeringHandle", "VLLM_MODEL_PREFIX", "is_serving_model"]
