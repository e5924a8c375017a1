"""CMRM steering: subtract ``alpha_l * v_l`` from the output of decoder layer ``l``.

``apply(model, vectors, ...)`` returns a :class:`~lvlm_safety_plugins.steering.SteeringHandle`;
``steer(...)`` is the same as a context manager. Both are built on the package's one
steering primitive, :mod:`lvlm_safety_plugins.steering`, which tells the prefill (the
prompt, with the image) from the decode steps of ``generate`` without relying on
forward keyword names, computes the steered positions (image, text or all real
positions of the prompt, and the generated tokens; never padding) from the model
adapter's layout, is context-local by default and removes every hook exactly.

The dataset variant subtracts calibrated vectors. The sample variant measures each
input's own shift at prefill, with two extra forwards (the prompt text-only on the
unsteered model, and the prompt with the reference image, with
``composition="sequential"`` steered by its own shift as it is measured layer by
layer), and keeps it for every decode step of that call. With ``reference="none"`` and
``sequential`` the reference forward *is* the prefill (the same input, steered the same
way up to each layer), so the shift at each layer is read from the prefill's own states
as it runs: one extra forward (text-only) per prefill.

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
from ...capture import last_masked, pool, run_to_layer
from ...errors import ConfigError, LVLMSafetyError
from ...steering import SteeringHandle, SteeringStep, unsteered, vector_edit
from ...steering import apply as apply_edit
from .calibration import measure_mask, measure_states
from .config import alpha_by_layer
from .vectorfile import SteeringVectors

POSITIONS = ("from_image", "image", "text", "all")
PHASES = ("prompt", "generated", "both")
COMPOSITIONS = ("sequential", "independent")


def steered_positions(positions: str, apply_to: str) -> frozenset[str]:
    """CMRM's ``positions`` x ``apply_to`` as the primitive's position kinds: the
    prompt's image, text or all positions in the prefill; in decode steps the generated
    tokens, which are text (so ``positions="image"`` leaves them alone).
    ``from_image`` is ``all`` narrowed by the ``after_image`` filter: the image tokens,
    the prompt text after them and the generated tokens, in rows that have an image."""
    if positions not in POSITIONS:
        raise ConfigError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if apply_to not in PHASES:
        raise ConfigError(f"apply_to must be one of {PHASES}, got {apply_to!r}")
    prompt = {"image": {"image"}, "text": {"text"}, "all": {"image", "text"}, "from_image": {"image", "text"}}[positions]
    out: set[str] = set()
    if apply_to in ("prompt", "both"):
        out |= prompt
    if apply_to in ("generated", "both") and positions != "image":
        out.add("generated")
    if not out:
        raise ConfigError("positions='image' with apply_to='generated' steers nothing: generated tokens are text")
    if positions == "from_image":
        out.add("after_image")
    return frozenset(out)


def prompt_kinds(kinds: frozenset[str]) -> frozenset[str]:
    """The part of steered position kinds that acts in a prompt (prefill) forward:
    what calibration steers when it measures sequentially (empty: nothing)."""
    out = kinds - {"generated"}
    return out if out - {"after_image"} else frozenset()


class _SampleShift:
    """The sample-level variant: measure h(prompt, reference) - h(prompt, text only)
    per input in ``prepare``, subtract ``alpha_l`` times it in ``edit``.

    ``sequential``: the reference forward runs with its own shift already subtracted at
    the earlier steered layers (at ``measure_kinds``, the prompt positions the handle
    steers), so layer l's shift is what is left at layer l after the earlier edits."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, layers: list[int], alpha: Mapping[int, float], *,
                 reference: str, measure_at: str, processor: Any, noise_seed: int, blank_fill: int,
                 sequential: bool, measure_kinds: frozenset[str]) -> None:
        self.model, self.adapter = model, adapter
        self.layers, self.alpha = layers, alpha
        self.reference, self.measure_at = reference, measure_at
        self.processor, self.noise_seed, self.blank_fill = processor, noise_seed, blank_fill
        self.sequential = sequential and bool(measure_kinds)
        self.measure_kinds = measure_kinds
        #: ``blank`` / ``noise``: run the text-only and the reference forward as one
        #: forward of both sets of rows where the model allows (:meth:`_batched_shift`)
        self.batch_reference = True

    def _pooled(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return measure_states(self.adapter, self.model, inputs, self.layers, self.measure_at)

    def _sequential_shift(self, with_image: Mapping[str, Any], text: torch.Tensor) -> dict[int, torch.Tensor]:
        row = {layer: i for i, layer in enumerate(self.layers)}
        shifts: dict[int, torch.Tensor] = {}

        def measure(layer: int, hidden: torch.Tensor, step: SteeringStep) -> torch.Tensor:
            assert step.layout is not None
            shift = pool(hidden.float(), measure_mask(step.layout, self.measure_at), self.measure_at) - text[row[layer]]
            shifts[layer] = shift
            return (-self.alpha[layer] * shift).to(hidden.dtype).unsqueeze(1)

        # applied inside unsteered(): this handle acts, the ones installed before do not
        with apply_edit(self.model, measure, layers=self.layers, positions=self.measure_kinds, adapter=self.adapter,
                        name="CMRM sample-level measurement"):
            run_to_layer(self.adapter, self.model, max(self.layers), **with_image)
        return shifts

    def _batched_shift(self, with_image: Mapping[str, Any], text_only: Mapping[str, Any]) -> dict[int, torch.Tensor] | None:
        """The text-only and the reference forward as one forward of both sets of rows
        side by side (re-padded to one length): at each steered layer the shift is the
        reference rows' pooled state minus the text rows' (with ``sequential``, then
        subtracted from the reference rows; the text rows stay unsteered). ``None``
        where the model cannot take rows with and without an image in one batch
        (only HF Llava that does not splice features into its own sequence can)."""
        from ...adapters.base import padding_side, repad
        from ...adapters.hf import HFLlavaAdapter

        if not isinstance(self.adapter, HFLlavaAdapter) or compat.llava_splices_image_features(self.model):
            return None
        ids_r, ids_t = with_image["input_ids"], text_only["input_ids"]
        attn_r, attn_t = with_image["attention_mask"], text_only["attention_mask"]
        side = padding_side(attn_r)
        rows = int(ids_r.shape[0])
        both = {k: v for k, v in with_image.items() if k not in ("input_ids", "attention_mask")}
        both["input_ids"] = repad([*ids_t, *ids_r], self.adapter.pad_token_id, side)
        both["attention_mask"] = repad([*attn_t, *attn_r], 0, side)
        index = {layer: i for i, layer in enumerate(self.layers)}
        shifts: dict[int, torch.Tensor] = {}
        where: list[Any] = []

        def measure(layer: int, hidden: torch.Tensor, step: SteeringStep) -> torch.Tensor | None:
            assert step.layout is not None
            if not where:
                mask = measure_mask(step.layout, self.measure_at)
                where.extend((mask, last_masked(mask) if self.measure_at == "last" else None))
            pooled = pool(hidden.float(), where[0], self.measure_at, last=where[1])
            shift = shifts[layer] = pooled[rows:] - pooled[:rows]
            if not self.sequential or index[layer] == len(self.layers) - 1:
                return None
            delta = torch.zeros(2 * rows, 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            delta[rows:, 0] = (-self.alpha[layer] * shift).to(hidden.dtype)
            return delta

        kinds = self.measure_kinds if self.sequential else frozenset({"image", "text"})
        with apply_edit(self.model, measure, layers=self.layers, positions=kinds, adapter=self.adapter,
                        name="CMRM sample-level measurement"):
            run_to_layer(self.adapter, self.model, max(self.layers), **both)
        return shifts if len(shifts) == len(self.layers) else None

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
        if self.reference == "none" and self.sequential and step.layout is not None and step.any:
            # two forwards per prefill: the text-only prompt here, and the prefill itself,
            # whose states at each steered layer are the reference forward's (the same
            # input, steered the same way so far): edit() reads the shift from them
            with unsteered(), torch.no_grad():
                step.memory["cmrm_text"] = self._pooled(text_only)
            step.memory["cmrm_shift"] = {}
            return
        if self.batch_reference:
            with unsteered(), torch.no_grad():
                batched = self._batched_shift(with_image, text_only)
            if batched is not None:
                step.memory["cmrm_shift"] = batched
                return
        with unsteered(), torch.no_grad():
            text = self._pooled(text_only)
            if self.sequential:
                shifts = self._sequential_shift(with_image, text)
            else:
                diff = self._pooled(with_image) - text
                shifts = {layer: diff[i] for i, layer in enumerate(self.layers)}
        step.memory["cmrm_shift"] = shifts

    def edit(self, layer: int, hidden: torch.Tensor, step: SteeringStep) -> torch.Tensor:
        shifts = step.memory["cmrm_shift"]
        shift = shifts.get(layer)
        if shift is None:  # reference none: measured in this prefill, on its own steered states
            text = step.memory.get("cmrm_text")
            if text is None or step.layout is None:
                raise LVLMSafetyError(f"CMRM sample level: no shift for layer {layer} (the prompt forward did not reach it)")
            where = step.memory.get("cmrm_where")
            if where is None:  # once per prefill, for every layer
                mask = measure_mask(step.layout, self.measure_at)
                where = step.memory["cmrm_where"] = (mask, last_masked(mask) if self.measure_at == "last" else None)
            pooled = pool(hidden.detach().float(), where[0], self.measure_at, last=where[1])
            shift = shifts[layer] = pooled - text[self.layers.index(layer)]
        return (-self.alpha[layer] * shift).to(hidden.device, hidden.dtype).unsqueeze(1)


def apply(
    model: torch.nn.Module,
    vectors: Any = None,
    *,
    alpha: float | Sequence[float] = 1.0,
    layers: Sequence[int] | None = None,
    positions: str = "from_image",
    apply_to: str = "both",
    variant: str = "dataset",
    composition: str | None = None,
    reference: str | None = None,
    measure_at: str | None = None,
    processor: Any = None,
    noise_seed: int = 0,
    blank_fill: int = 0,
    scope: str = "context",
    strict: bool = True,
) -> SteeringHandle:
    """Install CMRM steering; ``vectors`` is a :class:`SteeringVectors`, a mapping
    ``{layer: tensor}``, or ``None`` for the sample-level variant.

    ``composition`` says how the shifts of several layers combine: ``sequential``
    (each layer's shift measured with the earlier layers steered; a vector file must
    have been calibrated so, at the same alpha, layers and positions: checked, an
    error or with ``strict=False`` a warning) or ``independent`` (each layer subtracts
    the shift measured on the unsteered model, so the edits of earlier layers are
    subtracted again). ``None``: a vector file's own composition, ``sequential`` for
    the sample variant. A plain mapping of vectors is taken as calibrated for this call.

    ``reference`` and ``measure_at``: for the sample variant, what the shift is measured
    against and where (default ``blank`` and ``last``); for a vector file, when given,
    they must be the ones it was calibrated with (checked like ``composition``).
    """
    kinds = steered_positions(positions, apply_to)
    if variant not in ("dataset", "sample"):
        raise ConfigError(f"variant must be 'dataset' or 'sample', got {variant!r}")
    if composition is None:
        composition = vectors.composition if isinstance(vectors, SteeringVectors) else "sequential"
    if composition not in COMPOSITIONS:
        raise ConfigError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
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
    by_layer = alpha_by_layer(alpha, chosen)
    common = dict(layers=chosen, positions=kinds, scope=scope, adapter=adapter, name="CMRM steering")
    if variant == "dataset":
        if isinstance(vectors, SteeringVectors):
            vectors.check_use(composition=composition, layers=chosen, alpha=by_layer, positions=prompt_kinds(kinds),
                              strict=strict, reference=reference, measure_at=measure_at)
        edit = vector_edit({l: table[l] for l in chosen}, {l: -a for l, a in by_layer.items()})
        return apply_edit(model, edit, **common)
    sample = _SampleShift(model, adapter, chosen, by_layer, reference=reference or "blank", measure_at=measure_at or "last",
                          processor=processor,
                          noise_seed=noise_seed, blank_fill=blank_fill, sequential=composition == "sequential",
                          measure_kinds=prompt_kinds(kinds))
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


__all__ = ["SteeringHandle", "apply", "prompt_kinds", "steer", "steered_positions"]
