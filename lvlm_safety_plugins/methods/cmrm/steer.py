"""CMRM steering: subtract ``alpha_l * v_l`` from the output of decoder layer ``l``.

``apply(model, vectors, ...)`` returns a :class:`~lvlm_safety_plugins.steering.SteeringHandle`;
``steer(...)`` is the same as a context manager. Both are built on the package's one
steering primitive, :mod:`lvlm_safety_plugins.steering`, which tells the prefill (the
prompt, with the image) from the decode steps of ``generate`` without relying on
forward keyword names, computes the steered positions (image, text or all real
positions of the prompt, and the generated tokens; never padding) from the model
adapter's layout, is context-local by default and removes every hook exactly.

The dataset variant subtracts calibrated vectors. The sample variant measures each
input's own shift at prefill, with two extra forwards on the unsteered model (the
prompt with the reference image, or its own image for ``reference="none"``, and the
prompt text-only), and keeps it for every decode step of that call.

**Threads.** Steering is *context-local*: it acts only in the thread (or asyncio task,
or ``contextvars`` context) that applied it, so two threads can generate with the same
model under different steering without cross-talk; a thread that did not apply a
handle sees the unsteered model. Pass ``scope="global"`` to steer every caller
instead (for example when ``generate`` runs in a worker thread of a server).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch

from ... import compat
from ...adapters import ModelAdapter, get_adapter
from ...capture import HiddenCapture
from ...errors import LVLMSafetyError
from ...steering import SteeringHandle, SteeringStep, apply as apply_edit, unsteered, vector_edit

POSITIONS = ("image", "text", "all")
PHASES = ("prompt", "generated", "both")


def steered_positions(positions: str, apply_to: str) -> frozenset[str]:
    """CMRM's ``positions`` x ``apply_to`` as the primitive's position kinds: the
    prompt's image, text or all positions in the prefill; in decode steps the generated
    tokens, which are text (so ``positions="image"`` leaves them alone)."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if apply_to not in PHASES:
        raise ValueError(f"apply_to must be one of {PHASES}, got {apply_to!r}")
    prompt = {"image": {"image"}, "text": {"text"}, "all": {"image", "text"}}[positions]
    out: set[str] = set()
    if apply_to in ("prompt", "both"):
        out |= prompt
    if apply_to in ("generated", "both") and positions != "image":
        out.add("generated")
    if not out:
        raise ValueError("positions='image' with apply_to='generated' steers nothing: generated tokens are text")
    return frozenset(out)


class _SampleShift:
    """The sample-level variant: measure h(prompt, reference) - h(prompt, text only)
    per input in ``prepare``, subtract ``alpha_l`` times it in ``edit``."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], alpha: Mapping[int, float], *,
                 reference: str, measure_at: str, processor: Any, noise_seed: int, blank_fill: int) -> None:
        self.model, self.adapter = model, adapter
        self.layers, self.alpha = layers, alpha
        self.reference, self.measure_at = reference, measure_at
        self.processor, self.noise_seed, self.blank_fill = processor, noise_seed, blank_fill

    def prepare(self, step: SteeringStep) -> None:
        inputs = step.inputs
        input_ids = inputs["input_ids"]
        attention = inputs.get("attention_mask")
        batch = {"input_ids": input_ids, "attention_mask": attention if attention is not None else torch.ones_like(input_ids)}
        for key in compat.GENERATE_IMAGE_KEYS:
            if inputs.get(key) is not None:
                batch[key] = inputs[key]
        if self.reference == "none":
            with_image = batch
        else:
            image_processor = getattr(self.processor, "image_processor", None)
            with_image = self.adapter.blank_image_batch(batch, self.reference, seed=self.noise_seed,
                                                        image_processor=image_processor, fill=self.blank_fill)
        text_only = self.adapter.text_only_batch(batch)
        pooled = []
        with unsteered(), torch.no_grad():
            for variant in (with_image, text_only):
                layout = self.adapter.layout(variant)
                mask = layout.attention_mask if self.measure_at == "last" else layout.text_mask
                with HiddenCapture(self.adapter, self.layers, {"m": mask}, self.measure_at, detach=True) as cap:
                    cap.run(self.model, **variant)
                pooled.append(cap.stacked("m"))
        diff = pooled[0].float() - pooled[1].float()
        step.memory["cmrm_shift"] = {layer: diff[i] for i, layer in enumerate(self.layers)}

    def edit(self, layer: int, hidden: torch.Tensor, step: SteeringStep) -> torch.Tensor:
        shift = step.memory["cmrm_shift"][layer]
        return (-self.alpha[layer] * shift).to(hidden.device, hidden.dtype).unsqueeze(1)


def apply(
    model: torch.nn.Module,
    vectors: Any = None,
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
) -> SteeringHandle:
    """Install CMRM steering; ``vectors`` is a :class:`SteeringVectors`, a mapping
    ``{layer: tensor}``, or ``None`` for the sample-level variant."""
    kinds = steered_positions(positions, apply_to)
    if variant not in ("dataset", "sample"):
        raise ValueError(f"variant must be 'dataset' or 'sample', got {variant!r}")
    table = getattr(vectors, "vectors", vectors)
    adapter = get_adapter(model)
    if variant == "dataset":
        if not table:
            raise LVLMSafetyError("dataset-level CMRM needs calibrated vectors (cmrm.vectors)")
        chosen = sorted(table) if layers is None else adapter.resolve_layers(layers)
        missing = [l for l in chosen if l not in table]
        if missing:
            raise LVLMSafetyError(f"no calibrated vector for layers {missing} (the file has {sorted(table)})")
    else:
        chosen = adapter.resolve_layers(layers)
    alphas = [float(alpha)] * len(chosen) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) != len(chosen):
        raise ValueError(f"alpha has {len(alphas)} values for {len(chosen)} steered layers")
    by_layer = dict(zip(chosen, alphas))
    common = dict(layers=chosen, positions=kinds, scope=scope, adapter=adapter, name="CMRM steering")
    if variant == "dataset":
        edit = vector_edit({l: table[l] for l in chosen}, {l: -a for l, a in by_layer.items()})
        return apply_edit(model, edit, **common)
    sample = _SampleShift(model, adapter, chosen, by_layer, reference=reference, measure_at=measure_at, processor=processor,
                          noise_seed=noise_seed, blank_fill=blank_fill)
    return apply_edit(model, sample.edit, prepare=sample.prepare, **common)


@contextlib.contextmanager
def steer(model: torch.nn.Module, vectors: Any = None, **options: Any) -> Iterator[SteeringHandle]:
    """``with steer(model, vectors, alpha=1.0): model.generate(...)``; the hooks are
    removed on exit, also when the body raises."""
    handle = apply(model, vectors, **options)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = ["SteeringHandle", "apply", "steer", "steered_positions"]
