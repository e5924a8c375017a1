"""CMRM calibration: the mean image-induced shift per layer over a dataset.

For every sample, ``h_l(prompt with the reference image) - h_l(prompt, text only)`` is
measured (with ``composition: sequential``, the default, the first term under the
steering of the earlier steered layers: see :func:`calibrate`) at ``measure_at`` (the
last real token, or the mean over the prompt's text
tokens, which both inputs share). The reference image is a constant ``blank`` image
(through the model's own processor) or seeded ``noise``, which carry the modality but no
content; with ``reference: none`` the sample's own image is used. The text-only input
is the prompt with its image tokens removed. Capture hooks pool on the fly; per-layer
sums and the sample count are
accumulated in float64 (:class:`ShiftAccumulator`, so several processes can add theirs
up), then divided. Batched, left or right padding (positions come from the model
adapter's layout), a progress bar, the model's training flag restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ...adapters import get_adapter
from ...capture import HiddenCapture
from ...errors import DataError
from ...loading import DataFileError, open_image, read_records
from ...progress import progress_bar
from ...steering import steer, vector_edit
from .config import alpha_by_layer
from .vectorfile import SteeringVectors, model_fingerprint, weights_sample


def _option(config: Any, key: str, default: Any) -> Any:
    value = getattr(config, key, default) if config is not None else default
    return getattr(value, "value", value)


def iter_calibration_rows(data: Any, image_folder: str | Path | None = None,
                          select: Callable[[int], bool] | None = None) -> Iterator[dict[str, Any]]:
    """``{"image": PIL image or None, "prompt": str, "id": ...}`` rows from a list of
    dicts, an HF ``datasets.Dataset``, a JSONL file (``image``, ``prompt``) or a
    LLaVA-format JSON (``image``, ``conversations``; the first human turn is the
    prompt). Image paths are relative to ``image_folder`` (default: the file's folder).
    Errors name the file and the row. ``select(i)`` false skips row ``i`` before its
    image is opened (a process's shard under torch.distributed)."""
    source = "<data>"
    if isinstance(data, (str, Path)):
        source = str(data)
        rows: Iterable[Any] = read_records(data)
        folder = Path(image_folder) if image_folder else Path(data).parent
    else:
        rows = data
        folder = Path(image_folder) if image_folder else Path(".")
    for i, row in enumerate(rows):
        if select is not None and not select(i):
            continue
        where = f"{source}: row {i} (id {row.get('id', i)!r})" if isinstance(row, Mapping) else f"{source}: row {i}"
        if not isinstance(row, Mapping):
            raise DataFileError(f"{where}: expected a mapping with 'image' and 'prompt'")
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("conversations"), list):
            human = [t.get("value") for t in row["conversations"] if isinstance(t, Mapping) and t.get("from") == "human"]
            prompt = human[0] if human else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFileError(f"{where}: missing 'prompt' (or a human turn in 'conversations')")
        image = row.get("image")
        if isinstance(image, (str, Path)):
            image = open_image(folder / image, where)
        if image is None:
            raise DataFileError(f"{where}: missing 'image': CMRM calibration needs an image per row")
        yield {"id": row.get("id", i), "image": image, "prompt": prompt}


@dataclass
class ShiftAccumulator:
    """Per-layer sums of shifts (float64, from float32 states) and the sample count.

    Under ``torch.distributed`` each process accumulates its shard and :meth:`reduce`
    sums the sums and counts over all processes in float64, so the means equal the
    single-process means up to float64 rounding.
    """

    layers: list[int]
    hidden_size: int
    sums: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(self.layers), self.hidden_size, dtype=torch.float64)

    def add(self, shift: torch.Tensor) -> None:
        """``shift``: ``[layers, batch, hidden]``."""
        self.sums += shift.detach().float().cpu().double().sum(dim=1)
        self.count += int(shift.shape[1])

    def reduce(self) -> "ShiftAccumulator":
        """Sum the sums and counts of every process (a no-op in a single process)."""
        from ...distributed import all_reduce_sum

        total = all_reduce_sum(torch.cat([self.sums.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)]))
        self.sums = total[:-1].view_as(self.sums)
        self.count = int(round(float(total[-1])))
        return self

    def means(self) -> dict[int, torch.Tensor]:
        if self.count == 0:
            raise DataError("no calibration samples")
        return {layer: (self.sums[i] / self.count).float() for i, layer in enumerate(self.layers)}


def _wrap_prompt(prompt: str, template: Any) -> str:
    if callable(template):  # a lvlm_safety_plugins.prompts.PromptFormat: the commands' common format
        return template(prompt)
    text = template.format(prompt=prompt) if template else prompt
    return text if "<image>" in text else "<image>\n" + text


def measure_mask(layout: Any, measure_at: str) -> torch.Tensor:
    """Where a shift is measured: every real position for ``last`` (pooled at the last
    one), the text positions for ``mean``."""
    return layout.attention_mask if measure_at == "last" else layout.text_mask


def measure_states(adapter: Any, model: torch.nn.Module, inputs: Mapping[str, Any], layers: Sequence[int],
                   measure_at: str) -> torch.Tensor:
    """``[layers, batch, hidden]`` (float32): the states of ``inputs`` at ``layers``,
    pooled at ``measure_at``; the forward stops after the deepest of ``layers``."""
    mask = measure_mask(adapter.layout(inputs), measure_at)
    with HiddenCapture(adapter, layers, {"m": mask}, measure_at, detach=True) as cap:
        cap.run(model, **inputs)
    return cap.stacked("m").float()


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    processor: Any,
    dataset: Any,
    config: Any = None,
    *,
    layers: Sequence[int] | None = None,
    prompt_template: Any = None,
    image_folder: str | Path | None = None,
    progress: bool = True,
    recipe_yaml: str = "",
) -> SteeringVectors:
    """Dataset-level CMRM vectors for ``model`` (see the module docstring).

    ``config`` is the ``cmrm`` recipe section (or anything with the same attributes:
    ``reference``, ``measure_at``, ``batch_size``, ``noise_seed``, ``blank_fill``,
    ``composition``, ``alpha``, ``positions``, ``apply_to``); ``layers`` defaults to
    every layer. Prompts without ``<image>`` get it prepended. ``prompt_template``: a
    template with ``{prompt}`` (checked first), or a
    :class:`~lvlm_safety_plugins.prompts.PromptFormat` (what the commands pass: the
    processor's chat template by default); its name is recorded in the vector file.

    ``composition: sequential`` (the default): the text-only states are measured once;
    then, for each steered layer in order, the reference-image forward runs with the
    layers before it steered by the vectors found so far (at their ``alpha``, at the
    prompt positions the recipe steers) and stops after that layer. So the vectors are
    exact for that alpha: at alpha 1 the mean steered state at every steered layer is
    the mean text-only state. ``independent``: one unsteered forward of each kind.
    """
    from ...prompts import FORMAT_KEY, check_template
    from .steer import prompt_kinds, steered_positions

    if not callable(prompt_template):
        check_template(prompt_template, "prompt_template")
    adapter = get_adapter(model)
    chosen = adapter.resolve_layers(layers)
    reference = _option(config, "reference", "blank")
    measure_at = _option(config, "measure_at", "last")
    batch_size = int(_option(config, "batch_size", 8))
    noise_seed = int(_option(config, "noise_seed", 0))
    fill = int(_option(config, "blank_fill", 0))
    composition = _option(config, "composition", "sequential")
    alpha = alpha_by_layer(_option(config, "alpha", 1.0), chosen)
    kinds = prompt_kinds(steered_positions(_option(config, "positions", "from_image"), _option(config, "apply_to", "both")))
    from ...distributed import is_distributed, rank, world_size

    # under torch.distributed every process takes every world_size-th row; sums and
    # counts are added up over the processes at the end
    me, world = rank(), world_size()
    rows = list(iter_calibration_rows(dataset, image_folder, select=(lambda i: i % world == me) if world > 1 else None))
    device = next(model.parameters()).device
    image_processor = getattr(processor, "image_processor", None)
    starts = range(0, len(rows), batch_size)

    def batches() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(reference-image inputs, text-only inputs) per batch, the same every pass."""
        for start in starts:
            chunk = rows[start : start + batch_size]
            enc = processor(text=[_wrap_prompt(r["prompt"], prompt_template) for r in chunk], images=[r["image"] for r in chunk],
                            return_tensors="pt", padding=True)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
            with_image = batch if reference == "none" else adapter.blank_image_batch(
                batch, reference, seed=noise_seed + start, image_processor=image_processor, fill=fill)
            yield with_image, adapter.text_only_batch(batch)

    def pooled(inputs: Mapping[str, Any], at: Sequence[int]) -> torch.Tensor:
        return measure_states(adapter, model, inputs, at, measure_at)

    sequential = composition == "sequential" and len(chosen) > 1 and bool(kinds)
    passes = 1 + (len(chosen) if sequential else 0)
    bar = progress_bar(total=len(starts) * passes, desc=f"CMRM calibration ({composition})", enabled=progress and me == 0)
    text = ShiftAccumulator(chosen, adapter.hidden_size)
    shift = ShiftAccumulator(chosen, adapter.hidden_size)
    was_training = model.training
    model.eval()
    try:
        for with_image, text_only in batches():
            if sequential:
                text.add(pooled(text_only, chosen))
            else:
                shift.add(pooled(with_image, chosen) - pooled(text_only, chosen))
            bar.update()
        if is_distributed():
            (text if sequential else shift).reduce()
        if not sequential:
            vectors = shift.means() if shift.count else {}
        else:
            text_means = text.means() if text.count else {}
            vectors = {}
            for layer in chosen:
                image = ShiftAccumulator([layer], adapter.hidden_size)
                done = dict(vectors)
                with contextlib.ExitStack() as stack:
                    if done:
                        edit = vector_edit(done, {l: -alpha[l] for l in done})
                        stack.enter_context(steer(model, edit, layers=sorted(done), positions=kinds, adapter=adapter,
                                                  name="CMRM calibration"))
                    for with_image, _ in batches():
                        image.add(pooled(with_image, [layer]))
                        bar.update()
                if is_distributed():
                    image.reduce()
                if not image.count:
                    break
                vectors[layer] = image.means()[layer] - text_means[layer]
    finally:
        bar.close()
        model.train(was_training)
    count = shift.count if not sequential else text.count
    if count == 0:
        where = str(dataset) if isinstance(dataset, (str, Path)) else f"the calibration data ({type(dataset).__name__})"
        raise DataFileError(f"{where}: the calibration data has no rows")
    return SteeringVectors(
        weights=weights_sample(model),
        vectors=vectors, model_class=type(model).__name__, fingerprint=model_fingerprint(model),
        hidden_size=adapter.hidden_size, num_layers=adapter.num_layers, variant="dataset", reference=reference,
        measure_at=measure_at, samples=count, recipe=recipe_yaml,
        composition=composition, alpha=[alpha[l] for l in chosen] if composition == "sequential" else None,
        positions=sorted(kinds) if composition == "sequential" else None,
        extra={"prompt_template": json.dumps(getattr(prompt_template, "template", prompt_template)),
               **({FORMAT_KEY: prompt_template.name} if callable(prompt_template) else
                  {FORMAT_KEY: f"template {prompt_template!r}"} if prompt_template else {})},
    )


def save_vectors(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write ``vectors`` (atomically) from the main process only; under
    torch.distributed the other processes wait until the file is there."""
    from ...distributed import barrier, is_main_process

    target = Path(path)
    if is_main_process():
        target = vectors.save(path)
    barrier()
    return target


__all__ = ["ShiftAccumulator", "calibrate", "iter_calibration_rows", "measure_mask", "measure_states", "save_vectors"]
