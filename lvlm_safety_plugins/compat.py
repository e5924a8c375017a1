"""Every coupling to transformers internals that differs between versions, in one place.

The rest of the package calls the functions here and never tests a transformers
version, a private attribute or a renamed keyword itself (``tests/test_compat.py``
checks that). Each workaround names the versions it covers; the tested range is
:data:`TESTED_TRANSFORMERS` (the same as ``pyproject.toml``'s requirement).

======================================  =====================================================
what differs                            versions
======================================  =====================================================
KV cache keyword of ``forward``         ``past_key_values`` up to 5.23; ``cache`` from 5.24
                                        (``past_key_values`` deprecated): read neither,
                                        find the cache by type (:func:`past_length`)
legacy tuple caches                     4.x (``((k, v), ...)`` of ``[B, heads, T, d]``)
decoder-layer output                    a tuple ``(hidden, ...)`` up to 4.53; the tensor
                                        itself from 4.54 (:func:`layer_hidden`)
image features spliced in ``forward``   HF Llava up to 4.49 with one ``<image>`` token per
                                        image (``_merge_input_ids_with_image_features``)
image encoded before the first forward  ``generate`` passes ``mm_encoder_outputs``, not
                                        ``pixel_values``, from about 5.20
``from_pretrained`` dtype keyword       ``torch_dtype`` up to 4.55; ``dtype`` from 4.56
``Trainer`` tokenizer keyword           ``tokenizer`` up to 4.45; ``processing_class`` from
                                        4.46 (``tokenizer`` removed in 5.0)
``transformers.trainer``                ``ALL_LAYERNORM_LAYERS`` removed in 5.0 (the LLaVA
                                        framework's trainer imports it)
``LlamaConfig.mlp_bias``                from 4.41 (folded CMRM checkpoints need it)
Trainer loss scaling                    ``num_items_in_batch`` & co. from 4.46
                                        (:func:`trainer_term_scale`)
``rng_state.pth`` loading               4.37 with torch >= 2.6 (:func:`rng_state_loading`)
``output_hidden_states`` recording      by patching each layer's ``forward`` in 4.54-5.9,
                                        by forward hooks from 5.10 (the steering primitive
                                        edits inside ``forward``, seen by both)
module paths inside models              ``XForConditionalGeneration.model.language_model``
                                        from 4.52/5.x, ``.language_model.model`` before
                                        (:data:`DECODER_LAYER_PATHS` & co.)
``LlavaProcessor`` tokenizer class      4.x insists on a Llama tokenizer class
``LlavaProcessor`` arguments            ``patch_size``, ``vision_feature_select_strategy``,
                                        ``num_additional_image_tokens`` from 4.44-4.47
processor ``apply_chat_template``       processors have it from 4.43 (before: the tokenizer)
gradient checkpointing of a layer       reentrant by default up to 4.57 (``use_reentrant``
                                        unset, then True), around ``__call__`` so forward
                                        hooks run inside the checkpoint under no_grad;
                                        5.x: non-reentrant by default, around ``forward``
                                        (:func:`non_reentrant_checkpointing`)
turning gradient checkpointing on       ``gradient_checkpointing_enable(gradient_
                                        checkpointing_kwargs=)`` up to 5.24;
                                        ``activation_checkpointing_enable(activation_
                                        checkpointing_kwargs=)`` from 5.25 (the old name
                                        deprecated) (:func:`enable_checkpointing`)
vision-language families (issue 30)     decoder through ``get_decoder()``/``language_model``
                                        (:func:`language_model_of`); image token, marker,
                                        projector and token-type names per family
                                        (:data:`IMAGE_TOKEN_KEYS` & co., read from 4.57/5.25);
                                        Qwen3-VL deepstack (:func:`deepstack_layer_count`)
======================================  =====================================================

Calling a decoder layer again, outside the model's ``forward`` (CMRM's one-pass
sequential calibration, :func:`record_layer_call` / :func:`call_layer`): the layer is
called with exactly the arguments the model's own ``forward`` gave it, recorded by a
forward pre-hook, so nothing the model builds (masks, position ids, rotary embeddings)
is rebuilt here. What differs:

======================================  =====================================================
hidden states argument                  positional everywhere tested (4.37-5.25); a
                                        ``hidden_states=`` keyword is accepted too
attention mask a layer gets             4.37-4.3x: a 4D float ``[B, 1, L, L]`` mask (or
                                        ``None`` with SDPA and no padding); 5.x: whatever
                                        the mask interface built (tensor, ``None``,
                                        ``BlockMask``); passed back unchanged
rotary embeddings                       4.37: computed inside each attention from
                                        ``position_ids``; from about 4.45 (Qwen2-VL's
                                        M-RoPE too) and in 5.x a ``position_embeddings``
                                        ``(cos, sin)`` pair computed once per forward
per-layer attention types               5.x models with ``config.layer_types`` that mix
                                        kinds (sliding and full attention) give each layer
                                        its own mask: not callable from one recording
                                        (:func:`layer_call_obstacle` says so)
between two layers                      Qwen3-VL (4.57, 5.x) and its MoE class: the text
                                        model adds its ``deepstack_visual_embeds[k]`` at
                                        ``visual_pos_masks`` after layer ``k`` (the first
                                        few layers), replayed by :func:`after_layer`; any
                                        other change between layers 0 and 1 (or other
                                        arguments for layer 1) is found by a probe in
                                        place of layer 1 (:class:`LayerProbe`; it answers
                                        the decoder's reads of the layer's attributes, as
                                        4.57's ``attention_type``, from layer 1) and refused
KV cache while calibrating              ``use_cache=False``: ``past_key_value(s)=None``
                                        (4.x ``past_key_value``, 5.x ``past_key_values``)
output                                  a tuple up to 4.53, a tensor from 4.54
                                        (:func:`layer_hidden`)
======================================  =====================================================
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Mapping

import torch

from .errors import UnsupportedModelError

#: the transformers versions the test suite passes on (pyproject's requirement): the
#: floor is what LLaVA-1.5 users run, the ceiling the next minor after the newest
#: release tested
TESTED_TRANSFORMERS = ">=4.37.2,<5.26"

#: ``config.to_dict()`` keys that say nothing about the architecture (paths, versions,
#: dtypes, run-time switches), left out of model fingerprints. The dtype key is
#: ``torch_dtype`` up to 4.55 and ``dtype`` from 4.56.
VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset",
    "architectures", "use_cache", "output_hidden_states", "output_attentions", "return_dict", "attn_implementation",
})


def installed_transformers() -> str:
    """The installed transformers version string."""
    import transformers

    return str(transformers.__version__)


@functools.lru_cache(maxsize=None)
def transformers_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed transformers."""
    parts = installed_transformers().split(".")
    minor = "".join(ch for ch in parts[1] if ch.isdigit()) if len(parts) > 1 else "0"
    return int(parts[0]), int(minor or 0)


def at_least(major: int, minor: int = 0) -> bool:
    return transformers_version() >= (major, minor)


def version_in_tested_range(version: str | None = None) -> bool:
    """True if ``version`` (default: the installed transformers) lies in
    :data:`TESTED_TRANSFORMERS`."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(TESTED_TRANSFORMERS).contains(version or installed_transformers(), prereleases=True)


_warned = False


def warn_if_untested(version: str | None = None) -> None:
    """Warn once per process if ``version`` (default: the installed transformers, once
    imported) is outside the tested range (possible with ``pip install --no-deps`` or a
    forced install)."""
    global _warned
    import sys

    if _warned or (version is None and "transformers" not in sys.modules):
        return
    version = version or installed_transformers()
    if version_in_tested_range(version):
        return
    _warned = True
    import warnings

    warnings.warn(f"lvlm-safety-plugins is tested with transformers {TESTED_TRANSFORMERS}; transformers "
                  f"{version} is installed, so steering and training hooks may misbehave",
                  RuntimeWarning, stacklevel=3)


# -- forward calls: the KV cache --------------------------------------------------------


def _cache_length(value: Any) -> int | None:
    """The number of cached positions of ``value`` if it is a KV cache, else ``None``.

    A ``transformers.Cache`` (any version) answers ``get_seq_length()``; 4.x legacy
    caches are tuples of ``(key, value)`` tensors shaped ``[batch, heads, T, dim]``."""
    getter = getattr(value, "get_seq_length", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:  # noqa: BLE001 - an exotic cache that cannot say: not a signal
            return None
    if isinstance(value, (tuple, list)) and value:
        first = value[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor) and first[0].dim() == 4:
            return int(first[0].shape[-2])
    return None


def forward_tokens(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The new tokens of a model ``forward`` call (``input_ids``, else
    ``inputs_embeds``; ``[batch, length, ...]``), or ``None`` if neither is there."""
    for value in (kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def forward_length(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """The number of new positions a model ``forward`` call gets, or ``None``."""
    tokens = forward_tokens(args, kwargs)
    return None if tokens is None else int(tokens.shape[1])


def past_length(args: tuple, kwargs: Mapping[str, Any], length: int | None = None) -> int:
    """How many positions a model ``forward`` call's KV cache already holds (0: a
    prefill), independent of what the cache keyword is called.

    Three signals, the largest wins: a KV cache found among the arguments by type (not
    by keyword: ``past_key_values`` until 5.23, ``cache`` from 5.24), an attention mask
    wider than the new tokens (``generate`` widens it every decode step, in every
    version), and a ``cache_position`` starting past 0."""
    past = 0
    for value in (*args[1:], *kwargs.values()):
        found = _cache_length(value)
        if found is not None:
            past = max(past, found)
    if length is None:
        length = forward_length(args, kwargs)
    mask = kwargs.get("attention_mask")
    if length is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > length:
        past = max(past, int(mask.shape[1]) - length)
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        past = max(past, int(position.reshape(-1)[0]))
    return past


# -- decoder layers -------------------------------------------------------------------------


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output.

    Decoder layers return a tuple whose first item is the hidden states up to 4.53, and
    the tensor itself from 4.54; both (and model outputs with ``hidden_states``) are
    accepted."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise UnsupportedModelError(f"cannot find the hidden states in a decoder layer output of type {type(output).__name__}")


def replace_layer_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping its type (a tuple up
    to 4.53, a tensor from 4.54)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise UnsupportedModelError(f"cannot replace the hidden states in a decoder layer output of type {type(output).__name__}")


#: the module prefix of vLLM's model classes
VLLM_MODEL_PREFIX = "vllm.model_executor.models"


def is_serving_model(model: Any) -> bool:
    """True for a model built by vLLM (its class lives in ``vllm.model_executor.models``):
    the steering primitive steers it in its serving mode."""
    return type(model).__module__.startswith(VLLM_MODEL_PREFIX)


def clip_image_processor_class() -> Any:
    """The CLIP image processor class to build without a warning: transformers 5.x
    falls back from ``CLIPImageProcessor`` (torchvision backend) to
    ``CLIPImageProcessorPil`` with a warning on every construction when torchvision is
    missing or unusable, so the PIL class is taken directly then."""
    import importlib.util

    import transformers

    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil is not None and importlib.util.find_spec("torchvision") is None:
        return pil
    if pil is not None:
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - a torchvision that does not load beside this torch
            return pil
    return transformers.CLIPImageProcessor


# -- models ----------------------------------------------------------------------------------

#: where the decoder layers are, tried in order (adapters probe them, never one path):
#: 4.52+ / 5.x ``XForConditionalGeneration.model.language_model``, before that
#: ``.language_model`` is a ``...ForCausalLM``; the last is a plain ``...ForCausalLM``
DECODER_LAYER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "model.layers",
)
#: the projector: under ``.model`` from 4.52 / 5.x, at the top before
PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector")
#: the LLM's final norm, same layouts as :data:`DECODER_LAYER_PATHS`
FINAL_NORM_PATHS = ("model.language_model.norm", "language_model.model.norm", "model.norm", "language_model.norm")
#: Qwen2-VL's vision merger (the projector): under ``.model`` from 4.52 / 5.x
QWEN2VL_PROJECTOR_PATHS = ("model.visual.merger", "visual.merger")


def llava_splices_image_features(model: Any) -> bool:
    """True for an HF Llava that splices image features into the sequence inside its
    ``forward`` when given one ``<image>`` token per image (up to 4.49)."""
    return hasattr(type(model), "_merge_input_ids_with_image_features")


#: ``generate`` arguments that carry images; from about 5.20 ``generate`` encodes the
#: image before the first forward and passes ``mm_encoder_outputs`` instead. The
#: vision-language families' own image arguments (Idefics3/SmolVLM, Gemma 4, Molmo2)
#: and token types (Gemma 3/4 and PaliGemma image blocks; 4.57 and 5.x) travel with them
GENERATE_IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "images", "pixel_attention_mask",
                       "image_position_ids", "image_token_pooling", "image_grids", "image_num_crops",
                       "token_type_ids", "mm_token_type_ids")


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for a dtype: ``torch_dtype`` up to 4.55, ``dtype``
    from 4.56 (``torch_dtype`` is deprecated there)."""
    if dtype is None:
        return {}
    return {"dtype" if at_least(4, 56) else "torch_dtype": dtype}


def llama_config_has_mlp_bias() -> bool:
    """``LlamaConfig(mlp_bias=...)`` exists (from 4.41)."""
    from transformers import LlamaConfig

    return "mlp_bias" in inspect.signature(LlamaConfig.__init__).parameters


# -- training ----------------------------------------------------------------------------------


def trainer_takes_tokenizer() -> bool:
    """``Trainer(tokenizer=...)`` exists (up to 4.x; from 4.46 ``processing_class``)."""
    from transformers import Trainer

    return "tokenizer" in inspect.signature(Trainer.__init__).parameters


def trainer_tokenizer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``tokenizer=`` renamed to ``processing_class=`` where the
    Trainer no longer takes ``tokenizer`` (5.0 on)."""
    if "tokenizer" in kwargs and not trainer_takes_tokenizer():
        kwargs = dict(kwargs)
        kwargs["processing_class"] = kwargs.pop("tokenizer")
    return kwargs


def trainer_tokenizer(trainer: Any) -> Any:
    """The tokenizer or processor a Trainer holds (``processing_class`` from 4.46,
    ``tokenizer`` before)."""
    return getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)


def trainer_term_scale(trainer: Any, num_items_in_batch: Any) -> float:
    """The factor that puts a per-micro-batch mean loss term on the scale of the host
    loss the Trainer computes.

    From 4.46 the Trainer may divide the loss by the number of items across the
    gradient-accumulation window itself (``model_accepts_loss_kwargs`` with
    ``num_items_in_batch``, or a ``compute_loss_func``; later releases say so in
    ``loss_is_scaled_for_ga``), and multiply it by the number of processes with
    ``average_tokens_across_devices`` (tensor-parallel ranks excepted, ``get_tp_size``).
    Before 4.46 none of these exist and the factor is 1."""
    scale = 1.0
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    custom = getattr(trainer, "compute_loss_func", None) is not None
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:
        scaled_for_ga = (accepts and num_items_in_batch is not None) or custom
    if scaled_for_ga:
        steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        scale /= max(1, int(steps))
    if getattr(trainer.args, "average_tokens_across_devices", False) and (accepts or custom) and num_items_in_batch is not None:
        tp = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
        scale *= max(1, trainer.accelerator.num_processes // max(1, tp))
    return scale


def _numpy_safe_globals() -> list[Any]:
    """numpy objects inside the Trainer's ``rng_state.pth`` (a numpy RNG state)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    return found


@contextlib.contextmanager
def rng_state_loading() -> Iterator[None]:
    """Around the Trainer's ``_load_rng_state``: 4.37 loads ``rng_state.pth`` with a
    plain ``torch.load``, which torch >= 2.6 refuses (``weights_only``) because of the
    numpy RNG state inside; allow exactly those numpy types, nothing else."""
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:
        yield
        return
    with safe(_numpy_safe_globals()):
        yield


def restore_trainer_layernorm_layers() -> None:
    """Put ``transformers.trainer.ALL_LAYERNORM_LAYERS`` back (removed in 5.0; the
    LLaVA framework's trainer imports it)."""
    import transformers.trainer as trainer_module

    if not hasattr(trainer_module, "ALL_LAYERNORM_LAYERS"):
        try:
            from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        except ImportError:  # pragma: no cover - newer than the tested range
            ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
        trainer_module.ALL_LAYERNORM_LAYERS = ALL_LAYERNORM_LAYERS  # type: ignore[attr-defined]


# -- processors and tokenizers -------------------------------------------------------------------


def reentrant_checkpointing(model: Any) -> list[Any]:
    """The modules of ``model`` whose gradient checkpointing is on and reentrant.

    transformers keeps the checkpoint function of each module that can checkpoint in
    ``_gradient_checkpointing_func`` (a ``functools.partial`` of
    ``torch.utils.checkpoint.checkpoint``, 4.35 to 5.x) beside a ``gradient_checkpointing``
    flag. Reentrant checkpointing runs the first forward under ``no_grad``; with 4.x it
    wraps the layer's ``__call__``, so forward hooks (and what they capture) see states
    without a graph. A checkpoint function that is not such a partial counts as
    reentrant (DeepSpeed's activation checkpointing is)."""
    import functools

    from torch.utils import checkpoint as torch_checkpoint

    out = []
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is None:
            continue
        if isinstance(fn, functools.partial) and fn.func is torch_checkpoint.checkpoint:
            if fn.keywords.get("use_reentrant") is False:
                continue
        out.append(module)
    return out


def enable_checkpointing(model: Any, *, use_reentrant: bool | None = None) -> None:
    """Turn on transformers' gradient checkpointing of ``model`` under this version's
    name (``activation_checkpointing_enable`` from 5.25, ``gradient_checkpointing_enable``
    before), with ``use_reentrant`` passed to torch's checkpoint when given (unset:
    transformers' default, reentrant up to 4.57)."""
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def non_reentrant_checkpointing(model: Any) -> list[Any]:
    """Switch every module with reentrant gradient checkpointing from
    :func:`reentrant_checkpointing` to ``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``, keeping its other arguments: the gradients are the same,
    and the first forward builds the graph, so forward hooks capture states with
    gradients. Returns the modules it could not switch (a checkpoint function that is
    not torch's), which the caller must refuse."""
    import functools

    from torch.utils import checkpoint as torch_checkpoint

    left = []
    for module in reentrant_checkpointing(model):
        fn = module._gradient_checkpointing_func
        if isinstance(fn, functools.partial) and fn.func is torch_checkpoint.checkpoint:
            module._gradient_checkpointing_func = functools.partial(torch_checkpoint.checkpoint, *fn.args,
                                                                    **{**fn.keywords, "use_reentrant": False})
        else:
            left.append(module)
    return left


def llava_processor_needs_llama_tokenizer() -> bool:
    """4.x ``LlavaProcessor`` accepts only a Llama tokenizer class (5.x: any)."""
    return not at_least(5)


def llava_processor_kwargs(*, patch_size: int, strategy: str = "default", additional_tokens: int = 1) -> dict[str, Any]:
    """The ``LlavaProcessor`` arguments that expand ``<image>`` into one placeholder
    per feature, where this version has them (4.44-4.47 on)."""
    from transformers import LlavaProcessor

    params = inspect.signature(LlavaProcessor.__init__).parameters
    wanted = {"patch_size": patch_size, "vision_feature_select_strategy": strategy,
              "num_additional_image_tokens": additional_tokens}
    return {k: v for k, v in wanted.items() if k in params}


def processor_has_chat_template_api(processor: Any) -> bool:
    """Processors have ``apply_chat_template`` from 4.43 (before: only tokenizers)."""
    return hasattr(processor, "apply_chat_template")


# -- calling a decoder layer again (CMRM one-pass sequential calibration) ---------------------
# Kept apart from the other blocks: see the second table of the module docstring.


class LayerCall:
    """The arguments a model's ``forward`` called one decoder layer with, less the
    hidden states: ``args`` (positional, after the hidden states) and ``kwargs``; and
    ``after``: what the decoder adds to the states between its layers (``None``, or
    Qwen3-VL's deepstack ``{"mask": [B, L] bool, "embeds": [tensor [N, H] per layer]}``,
    :func:`after_layer`)."""

    __slots__ = ("args", "kwargs", "hidden_keyword", "after")

    def __init__(self, args: tuple, kwargs: dict[str, Any], hidden_keyword: bool,
                 after: dict[str, Any] | None = None) -> None:
        self.args, self.kwargs, self.hidden_keyword, self.after = args, kwargs, hidden_keyword, after

    def map_tensors(self, fn: Any) -> "LayerCall":
        """A copy with ``fn`` applied to every tensor inside (tuples, lists and dicts
        followed; other objects kept as they are)."""
        return LayerCall(_map_tensors(self.args, fn), _map_tensors(self.kwargs, fn), self.hidden_keyword,
                         _map_tensors(self.after, fn))

    def nbytes(self) -> int:
        """Bytes of the tensors inside (what storing the call costs)."""
        total = [0]

        def count(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        self.map_tensors(count)
        return total[0]


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def split_layer_call(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    """A decoder layer's call as ``(hidden states, the rest as a LayerCall)``: the hidden
    states positional first, or the ``hidden_states`` keyword; ``name`` (the layer) is
    in the error raised when neither holds a tensor."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs), False)
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise UnsupportedModelError(f"{name} was called without its hidden states as the first argument or the "
                                    "hidden_states keyword: it cannot be called again")
    return hidden, LayerCall(tuple(args), {k: v for k, v in kwargs.items() if k != "hidden_states"}, True)


@contextlib.contextmanager
def record_layer_call(layer: torch.nn.Module) -> Iterator[list[LayerCall]]:
    """Inside the block, every call of ``layer`` appends its :class:`LayerCall` to the
    list yielded (a forward pre-hook with keyword arguments, removed on exit)."""
    calls: list[LayerCall] = []

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(split_layer_call(type(module).__name__, args, kwargs)[1])

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


#: the decoder ``forward`` keywords that carry what Qwen3-VL's text model adds after its
#: first layers (4.57 and 5.x name them so)
DEEPSTACK_KEYS = ("visual_pos_masks", "deepstack_visual_embeds")


@contextlib.contextmanager
def record_between_layers(decoder: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Inside the block, a forward of ``decoder`` (the module that owns the decoder
    layers) records what it adds to the states between its layers: the dict yielded
    gets ``"after"``, the value for :attr:`LayerCall.after` (``None`` when nothing is
    added: every model but Qwen3-VL's deepstack)."""
    seen: dict[str, Any] = {"after": None}

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask, embeds = (kwargs.get(k) for k in DEEPSTACK_KEYS)
        if mask is not None and embeds is not None and len(embeds):
            seen["after"] = {"mask": mask.bool(), "embeds": list(embeds)}

    handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def after_layer(call: LayerCall, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The decoder's input to layer ``index + 1`` given layer ``index``'s output (after
    any steering hook on it): ``hidden`` itself, or with Qwen3-VL's deepstack features
    for layer ``index`` added at the visual positions, as its text model does."""
    after = call.after
    if after is None or index >= len(after["embeds"]):
        return hidden
    mask = after["mask"].to(hidden.device)
    out = hidden.clone()
    out[mask, :] = out[mask, :] + after["embeds"][index].to(hidden.device, hidden.dtype)
    return out


class LayerProbe(torch.nn.Module):
    """Stands in for decoder ``layer`` 1 in a forward stopped after layer 0: records the
    input and the arguments the decoder gives layer 1 (``seen``: ``(hidden,
    LayerCall)``) and passes the states on unchanged, as a tuple where layer 0
    returned one (``tuple_output``; 4.x up to 4.53)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["stands_for"] = layer  # not a submodule: its parameters stay where they are
        self.seen: tuple[torch.Tensor, LayerCall] | None = None
        self.tuple_output = False

    def __getattr__(self, name: str) -> Any:
        """What the decoder reads from the layer it calls (4.57 picks each layer's mask by
        its ``attention_type``) comes from the layer stood in for."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["stands_for"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, call = split_layer_call("decoder layer 1", args, kwargs)
        self.seen = (hidden, call)
        return (hidden,) if self.tuple_output else hidden


def same_call(a: LayerCall, b: LayerCall) -> str | None:
    """``None`` when two recorded calls pass the same arguments (the same tensor
    objects, or equal ones), else the first argument that differs."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return x is y or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                              and x.dtype == y.dtype and bool(torch.equal(x, y)))
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if x is y:
            return True
        try:
            return bool(x == y)
        except Exception:  # noqa: BLE001 - objects that cannot be compared (a cache, a BlockMask) are not known equal
            return False

    if a.hidden_keyword != b.hidden_keyword or len(a.args) != len(b.args):
        return "the positional arguments"
    for i, (x, y) in enumerate(zip(a.args, b.args)):
        if not same(x, y):
            return f"positional argument {i + 1}"
    for key in sorted(set(a.kwargs) | set(b.kwargs)):
        if key not in a.kwargs or key not in b.kwargs or not same(a.kwargs[key], b.kwargs[key]):
            return f"{key!r}"
    return None


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``layer``'s output hidden states for input ``hidden`` under a recorded call (its
    hooks and any steering installed on it run as in a forward)."""
    if call.hidden_keyword:
        return layer_hidden(layer(*call.args, hidden_states=hidden, **call.kwargs))
    return layer_hidden(layer(hidden, *call.args, **call.kwargs))


def repeat_batch(call: LayerCall, batch: int, times: int) -> LayerCall | None:
    """``call`` for ``times`` copies of its batch side by side (copy-major): every
    tensor of two or more dimensions whose first is ``batch`` is repeated along it;
    those with a first dimension of 1 broadcast and 1-D ones (``cache_position``) are
    kept as they are. ``None`` when some argument cannot be
    repeated so (another leading dimension, as Qwen2-VL's ``[3, B, L]`` M-RoPE
    position ids, or an object such as a ``BlockMask`` or a cache)."""
    ok = [True]

    def repeat(t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2 or t.shape[0] == 1:  # scalars, ``cache_position [L]``, broadcast rows
            return t
        if t.shape[0] != batch:
            ok[0] = False
            return t
        return t.repeat(times, *([1] * (t.dim() - 1)))

    def plain(value: Any) -> bool:
        if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
            return True
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        return False

    if not plain(call.args) or not plain(call.kwargs):
        return None
    out = LayerCall(_map_tensors(call.args, repeat), _map_tensors(call.kwargs, repeat), call.hidden_keyword)
    if call.after is not None:  # the mask along the batch, each layer's features once per copy (row-major order)
        out.after = {"mask": call.after["mask"].repeat(times, 1), "embeds": [e.repeat(times, 1) for e in call.after["embeds"]]}
    return out if ok[0] else None


def layer_call_obstacle(text_config: Any) -> str | None:
    """Why one recorded :class:`LayerCall` cannot serve every decoder layer of a model
    with this (text) configuration, or ``None`` when it can: 5.x models whose
    ``layer_types`` mix attention kinds give each kind its own mask."""
    kinds = getattr(text_config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(map(str, kinds))) > 1:
        return (f"its decoder layers use different attention kinds ({', '.join(sorted(set(map(str, kinds))))}), each "
                "called with its own mask")
    return None


__all__ = [
    "DEEPSTACK_KEYS",
    "LayerCall",
    "LayerProbe",
    "after_layer",
    "call_layer",
    "record_between_layers",
    "same_call",
    "split_layer_call",
    "layer_call_obstacle",
    "repeat_batch",
    "record_layer_call",
    "enable_checkpointing",
    "non_reentrant_checkpointing",
    "reentrant_checkpointing",
    "DECODER_LAYER_PATHS",
    "FINAL_NORM_PATHS",
    "GENERATE_IMAGE_KEYS",
    "PROJECTOR_PATHS",
    "QWEN2VL_PROJECTOR_PATHS",
    "rng_state_loading",
    "trainer_term_scale",
    "TESTED_TRANSFORMERS",
    "VOLATILE_CONFIG_KEYS",
    "installed_transformers",
    "warn_if_untested",
    "at_least",
    "dtype_kwargs",
    "forward_length",
    "forward_tokens",
    "layer_hidden",
    "llama_config_has_mlp_bias",
    "llava_processor_kwargs",
    "llava_processor_needs_llama_tokenizer",
    "llava_splices_image_features",
    "past_length",
    "processor_has_chat_template_api",
    "replace_layer_hidden",
    "restore_trainer_layernorm_layers",
    "trainer_takes_tokenizer",
    "trainer_tokenizer",
    "trainer_tokenizer_kwargs",
    "transformers_version",
    "version_in_tested_range",
    # vision-language families (issue 30)
    "DECODER_LAYER_SUBPATHS",
    "IMAGE_MARKER_KEYS",
    "IMAGE_TOKEN_KEYS",
    "TOKEN_TYPE_KEYS",
    "VLM_IMAGE_KEYS",
    "VLM_PROJECTOR_PATHS",
    "deepstack_layer_count",
    "deepstack_mergers",
    "language_model_of",
]


# == vision-language families (the generic HF adapter; issue 30) ==============================
# Kept apart from the blocks above: every coupling of lvlm_safety_plugins.adapters.hf to a
# model family's internals, with the versions it was read from (4.57.x and 5.25).

#: config fields naming the image placeholder token: ``image_token_index`` (Llava,
#: LlavaOnevision, Mistral3, Aya Vision, PaliGemma and Gemma 3 up to 4.5x, Llama 4),
#: ``image_token_id`` (Qwen2/2.5/3-VL, Qwen3.5, GLM-4V, InternVL, Idefics3, SmolVLM,
#: Ovis2, Gemma 3/PaliGemma in 5.x, Gemma 4), ``image_patch_id`` (Molmo2, 5.x)
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index", "image_patch_id")

#: config fields naming tokens that bracket an image (start/end markers): dropped together
#: with the placeholders in the text-only variant. Gemma 3 and Llama 4 ``boi/eoi_token_index``
#: (4.50-5.x), Gemma 4 ``boi/eoi_token_id``, Qwen-VL and Qwen3.5 ``vision_start/end_token_id``,
#: GLM-4V and Molmo2 ``image_start/end_token_id`` (Molmo2 also ``low_res_image_start_token_id``),
#: and ``image_break_token_id``/``image_end_token_id`` where a Mistral3 config carries them
IMAGE_MARKER_KEYS = (
    "boi_token_id", "boi_token_index", "eoi_token_id", "eoi_token_index",
    "vision_start_token_id", "vision_end_token_id", "image_start_token_id", "image_end_token_id",
    "low_res_image_start_token_id", "image_break_token_id",
)

#: where the projector (what maps vision features into the LLM's embedding space) sits, in
#: the order probed: under ``.model`` from 4.52 / 5.x, at the top before (and in Llama 4 at
#: every version). Qwen-style and GLM-4V: ``visual.merger``; Idefics3/SmolVLM:
#: ``connector``; Gemma 4: ``embed_vision``; Ovis2: ``visual_embeddings_table``
VLM_PROJECTOR_PATHS = (
    "model.multi_modal_projector", "multi_modal_projector",
    "model.visual.merger", "visual.merger",
    "model.connector", "connector",
    "model.embed_vision", "embed_vision",
    "model.visual_embeddings_table", "visual_embeddings_table",
)

#: batch keys of token types (Gemma 3/4 and PaliGemma attend bidirectionally inside the
#: image blocks they mark; Qwen-VL/GLM-4V/Molmo2 ``mm_token_type_ids`` from 5.x): carried
#: column by column into the text-only variant, never recomputed
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")

#: batch keys that carry images (removed from the text-only variant), all families, 4.57/5.25
VLM_IMAGE_KEYS = (
    "pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "image_position_ids",
    "image_token_pooling", "image_grids", "image_num_crops", "aspect_ratio_ids", "aspect_ratio_mask",
    "cross_attention_mask", "mm_encoder_outputs",
)


def language_model_of(model: Any) -> Any:
    """The text decoder of a ``*ForConditionalGeneration`` through the model's own
    accessors: ``get_decoder()`` (4.57 and 5.x: the text model; 4.57 Idefics3/SmolVLM
    return the whole multimodal model, whose ``text_model`` holds the layers), then the
    ``language_model`` attribute (top level in Llama 4 and before 4.52, under ``.model``
    after). ``None`` if the model offers neither."""
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            found = getter()
        except Exception:  # noqa: BLE001 - a get_decoder that cannot answer: try the attributes
            found = None
        if isinstance(found, torch.nn.Module) and found is not model:
            return found
    for owner in (model, getattr(model, "model", None)):
        lm = getattr(owner, "language_model", None) if owner is not None else None
        if isinstance(lm, torch.nn.Module):
            return lm
    return None


#: under the text decoder found by :func:`language_model_of`, where its layers are:
#: ``layers`` (5.x text models), ``model.layers`` (a ``...ForCausalLM``: Llama 4, 4.x),
#: ``text_model.layers`` / ``language_model.layers`` (a whole multimodal model: 4.57
#: Idefics3/SmolVLM ``get_decoder()``)
DECODER_LAYER_SUBPATHS = ("layers", "model.layers", "text_model.layers", "language_model.layers")


def deepstack_layer_count(model: Any) -> int:
    """How many of the first decoder layers get Qwen3-VL's deepstack visual features
    added to their output at the image positions (``len(vision_config.
    deepstack_visual_indexes)``; Qwen3-VL and its MoE class, 4.57 and 5.x). 0 elsewhere."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    indexes = getattr(vision, "deepstack_visual_indexes", None)
    return len(indexes) if indexes else 0


def deepstack_mergers(model: Any) -> Any:
    """Qwen3-VL's ``visual.deepstack_merger_list`` (under ``.model`` from 4.57), or ``None``."""
    for owner in (getattr(model, "model", None), model):
        visual = getattr(owner, "visual", None) if owner is not None else None
        found = getattr(visual, "deepstack_merger_list", None) if visual is not None else None
        if isinstance(found, torch.nn.Module):
            return found
    return None
