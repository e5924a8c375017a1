"""Fold dataset-level CMRM into the weights: no hooks, no overhead.

Subtracting ``alpha_l * v_l`` from the output of decoder layer ``l`` at every position
equals adding ``-alpha_l * v_l`` to the bias of the layer's last operation before its
residual add: the MLP's output projection (``mlp.down_proj`` in Llama-family models).
That projection has no bias by default, so one is created; for ``save_pretrained`` to
give a checkpoint that plain transformers loads (no plugin installed), the text config
gets ``mlp_bias=True`` and every other MLP projection a zero bias, which is what that
setting builds. ``mlp_bias`` exists from transformers 4.41 on: with 4.37, folding works
in memory but :func:`check_savable` refuses to save.

Only the dataset-level variant steering *all* positions in *both* phases can be folded
(a bias cannot tell image from text tokens or prompt from generated ones).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ...adapters import get_adapter
from ...errors import ConfigError, LVLMSafetyError
from .config import alpha_by_layer
from .vectorfile import SteeringVectors

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _mlp(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in MLP_PROJECTIONS):
        raise LVLMSafetyError(f"layer {index}: folding needs a Llama-style MLP with {', '.join(MLP_PROJECTIONS)} linears")
    return mlp


def _ensure_bias(linear: torch.nn.Linear) -> torch.nn.Parameter:
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))
    return linear.bias


def fold_into_weights(
    model: torch.nn.Module,
    vectors: Any,
    *,
    alpha: float | Sequence[float] = 1.0,
    layers: Sequence[int] | None = None,
    variant: str = "dataset",
    positions: str = "all",
    apply_to: str = "both",
    composition: str | None = None,
    savable: bool = True,
    strict: bool = True,
) -> list[int]:
    """Write ``-alpha * v`` into the MLP output biases; returns the folded layers.

    ``savable=True`` (default) also gives every other MLP projection a zero bias and
    sets ``mlp_bias`` in the config, so ``save_pretrained`` writes a checkpoint plain
    transformers loads as is. Those zero biases cost time on the CPU (a biased matmul
    takes another kernel path); ``savable=False`` adds biases to the steered layers'
    output projections only: the fastest in-memory model, but ``save_pretrained`` would
    not keep the steering, so :func:`check_savable` refuses it.

    A :class:`~.vectorfile.SteeringVectors` is checked as hooked steering checks it
    (``composition`` defaults to the file's own): sequential vectors fold only at the
    layers and alphas they were calibrated with, and only if they were calibrated
    steering every prompt position (``positions: all``), which is what a bias does."""
    if variant != "dataset" or positions != "all" or apply_to != "both":
        raise LVLMSafetyError(
            "only dataset-level CMRM on all positions of prompt and generated tokens can be folded into weights "
            f"(got variant={variant}, positions={positions}, apply_to={apply_to}); use hooked steering instead"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # ZeRO-3 partitions every parameter; a bias added now would not be partitioned,
        # and the partitioned weights are not materialised here
        raise LVLMSafetyError(
            "fold_into_weights: the model's parameters are partitioned by DeepSpeed ZeRO-3; fold on the full model "
            "before deepspeed.initialize (or use hooked steering, which reads activations and works under ZeRO-3)"
        )
    table: Mapping[int, torch.Tensor] = getattr(vectors, "vectors", vectors)
    adapter = get_adapter(model)
    chosen = sorted(table) if layers is None else adapter.resolve_layers(layers)
    by_layer = alpha_by_layer(alpha, chosen)
    if isinstance(vectors, SteeringVectors):
        vectors.check_use(composition=composition or vectors.composition, layers=chosen, alpha=by_layer,
                          positions=["image", "text"] if vectors.composition == "sequential" else None, strict=strict)
    decoder = adapter.decoder_layers
    refusal = getattr(adapter, "fold_refusal", lambda: None)()  # e.g. Gemma's norm after the MLP (docs/adapters.md)
    if refusal:
        raise LVLMSafetyError(f"fold_into_weights: {refusal}; use hooked steering instead")
    missing = [layer for layer in chosen if layer not in table]
    if missing:
        raise LVLMSafetyError(f"no calibrated vector for layers {missing}")
    broken = [layer for layer in chosen if not bool(torch.isfinite(torch.as_tensor(table[layer])).all())]
    if broken:  # checked before any bias is touched: a NaN bias would be saved by save_pretrained
        raise ConfigError(f"fold_into_weights: the vectors of layers {broken} have non-finite values (NaN or inf)")
    for i, layer in enumerate(decoder):
        mlp = _mlp(layer, i)
        if savable:
            for name in MLP_PROJECTIONS:
                _ensure_bias(getattr(mlp, name))
        elif i in chosen:
            _ensure_bias(mlp.down_proj)
    with torch.no_grad():
        for layer, a in by_layer.items():
            bias = decoder[layer].mlp.down_proj.bias
            bias -= (a * table[layer]).to(bias.device, bias.dtype)
    if savable:
        adapter.text_config.mlp_bias = True
    else:
        model._lvlm_unsavable_fold = True  # type: ignore[attr-defined]
    return chosen


def check_savable(model: torch.nn.Module | None = None) -> None:
    """Raise if a folded checkpoint would not load with plain transformers: this
    transformers has no ``mlp_bias``, or ``model`` was folded with ``savable=False``."""
    from ...compat import installed_transformers, llama_config_has_mlp_bias

    if model is not None and getattr(model, "_lvlm_unsavable_fold", False):
        raise LVLMSafetyError("this model was folded with savable=False: save_pretrained would drop the CMRM biases")

    if not llama_config_has_mlp_bias():
        raise LVLMSafetyError(
            f"transformers {installed_transformers()} has no LlamaConfig.mlp_bias, so a checkpoint with folded CMRM "
            "biases would load without them; save with transformers >= 4.41, or keep hooked steering"
        )


__all__ = ["check_savable", "fold_into_weights"]
