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

Sequential calibration runs in one sweep of the decoder (:func:`sequential_vectors`):
each batch's reference-image states are kept at the current layer (with the arguments
its decoder layers were called with), layer ``l``'s mean shift is measured over every
batch, that layer's edit is applied to the kept states, and the next layers are called
on them (with what the decoder adds between layers replayed: Qwen3-VL's deepstack
features). Where a model's layers cannot be called again so, the earlier algorithm (one
reference pass per steered layer) runs instead, with the reason in a warning and in the
vector file (``x-calibration``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ... import compat
from ...adapters import get_adapter
from ...capture import HiddenCapture, last_masked, pool, skipped_lm_head, truncated_decoder
from ...errors import DataError
from ...loading import DataFileError, open_image, read_records
from ...progress import progress_bar
from ...steering import prompt_mask, steer, unsteered, vector_edit
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


#: where :func:`sequential_vectors` keeps the states between layers (``cmrm.calibration_store``)
STORES = ("auto", "device", "cpu", "disk")
#: ``auto`` keeps states on the accelerator while they take at most this share of its
#: free memory (measured at the start), then in CPU memory while they take at most this
#: share of the available memory, then on disk
AUTO_SHARE = 0.5


def _available_cpu_memory() -> int:
    """Bytes of CPU memory available to this process (``psutil`` where installed)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is present wherever the tests run
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 0


class StateStore:
    """Per-batch tensors (a batch's hidden states ``[B, L, H]`` at the current layer
    and the arguments its decoder layers are called with) kept on the model's
    ``device``, in CPU memory or in a memory-mapped file of a temporary folder
    (``disk``; the arguments then stay in CPU memory). ``auto`` picks per batch by
    size (:data:`AUTO_SHARE`). :meth:`close` (also via ``with``) removes the folder,
    also after an error."""

    def __init__(self, where: str, device: torch.device, *, folder: str | Path | None = None) -> None:
        if where not in STORES:
            raise DataError(f"cmrm.calibration_store must be one of {', '.join(STORES)}, got {where!r}")
        self.where, self.device, self.parent = where, torch.device(device), folder
        self._hidden: list[torch.Tensor] = []
        self._calls: list[compat.LayerCall] = []
        self._tiers: list[str] = []
        self._dir: str | None = None
        self.bytes = {"device": 0, "cpu": 0, "disk": 0}
        on_device = self.device.type != "cpu"
        self._budget = {
            "device": int(AUTO_SHARE * torch.cuda.mem_get_info(self.device)[0]) if on_device and self.device.type == "cuda" else 0,
            "cpu": int(AUTO_SHARE * _available_cpu_memory()),
        }

    def _tier(self, nbytes: int) -> str:
        on_cpu = self.device.type == "cpu"
        if self.where != "auto":
            return "device" if self.where == "cpu" and on_cpu else self.where  # on a CPU model its memory is the device's
        if on_cpu:
            return "device" if self.bytes["device"] + nbytes <= self._budget["cpu"] else "disk"
        for tier in ("device", "cpu"):
            if self.bytes[tier] + nbytes <= self._budget[tier]:
                return tier
        return "disk"

    def put(self, hidden: torch.Tensor, call: compat.LayerCall | None = None) -> None:
        """Keep ``hidden`` (a copy where it leaves the device) and, given, ``call``."""
        nbytes = hidden.numel() * hidden.element_size()
        tier = self._tier(nbytes + (call.nbytes() if call is not None else 0))
        if tier == "disk":
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="cmrm-calibration-", dir=self.parent)
            path = os.path.join(self._dir, f"{len(self._hidden)}.bin")
            kept = torch.from_file(path, shared=True, size=hidden.numel(), dtype=hidden.dtype).view(hidden.shape)
            kept.copy_(hidden)
            self.bytes["disk"] += nbytes
        elif tier == "cpu":
            kept = hidden.to("cpu", copy=True)
            self.bytes["cpu"] += nbytes
        else:
            kept = hidden
            self.bytes["device"] += nbytes
        if call is not None and tier != "device" and self.device.type != "cpu":
            call = call.map_tensors(lambda t: t.cpu())
        if call is not None:
            self.bytes["cpu" if tier != "device" else "device"] += call.nbytes()
        self._hidden.append(kept)
        self._calls.append(call)
        self._tiers.append(tier)

    def __len__(self) -> int:
        return len(self._hidden)

    def call(self, i: int) -> compat.LayerCall:
        """Batch ``i``'s layer call, on the model's device."""
        call = self._calls[i]
        assert call is not None
        if self._tiers[i] != "device" and self.device.type != "cpu":
            call = call.map_tensors(lambda t: t.to(self.device))
        return call

    def get(self, i: int) -> tuple[torch.Tensor, compat.LayerCall | None]:
        """Batch ``i``'s states (on the model's device) and its layer call as kept."""
        return self._hidden[i].to(self.device), self._calls[i]

    def replace(self, i: int, hidden: torch.Tensor) -> None:
        """Put ``hidden`` (any shape) in batch ``i``'s place, in the same tier."""
        if self._tiers[i] == "device":
            self._hidden[i] = hidden
        elif self._tiers[i] == "cpu":
            self._hidden[i] = hidden.to("cpu", copy=True)
        else:
            assert self._dir is not None
            path = os.path.join(self._dir, f"{i}.{hidden.numel()}.bin")
            kept = torch.from_file(path, shared=True, size=hidden.numel(), dtype=hidden.dtype).view(hidden.shape)
            kept.copy_(hidden)
            self._hidden[i] = kept

    def set(self, i: int, hidden: torch.Tensor) -> None:
        """Replace batch ``i``'s states (same shape and dtype)."""
        if self._tiers[i] == "device":
            self._hidden[i] = hidden
        else:
            self._hidden[i].copy_(hidden)

    def close(self) -> None:
        self._hidden, self._calls, self._tiers = [], [], []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OnePassUnavailable(Exception):
    """This model's decoder layers cannot be called again from a recording (the
    message says why); :func:`calibrate` then runs one reference pass per layer."""


def _decoder_input(adapter: Any, model: torch.nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, compat.LayerCall]:
    """Decoder layer 0's output for ``inputs`` (the vision tower and the embeddings run
    here; layer 0 once) and the arguments the model calls its decoder layers with, with
    what the decoder adds between layers (:func:`compat.after_layer
    <lvlm_safety_plugins.compat.after_layer>`); the forward stops after layer 0, a
    :class:`~lvlm_safety_plugins.compat.LayerProbe` in layer 1's place checking that
    layer 1 gets layer 0's output (after that addition) and the same arguments."""
    layers = adapter.decoder_layers
    layer = layers[0]
    outputs: list[Any] = []
    probe = compat.LayerProbe(layers[1]) if len(layers) > 1 else None

    def grab(module: torch.nn.Module, args: tuple, output: Any) -> None:
        # a copy: the decoder may add to the output in place afterwards (4.57's deepstack),
        # and the probe compares what layer 1 gets with it
        outputs.append(compat.layer_hidden(output).clone())
        if probe is not None:
            probe.tuple_output = isinstance(output, tuple)

    with contextlib.ExitStack() as stack:
        calls = stack.enter_context(compat.record_layer_call(layer))
        between = stack.enter_context(compat.record_between_layers(adapter.decoder_owner[0]))
        # registered after every hook already on the layer: what the decoder goes on with
        hook = layer.register_forward_hook(grab)
        stack.callback(hook.remove)
        stack.enter_context(truncated_decoder(adapter, 0, then=probe))
        stack.enter_context(skipped_lm_head(adapter))
        try:
            model(**inputs, use_cache=False)
        except compat.UnsupportedModelError as exc:
            raise OnePassUnavailable(str(exc)) from None
    if len(calls) != 1 or len(outputs) != 1:
        raise OnePassUnavailable(f"decoder layer 0 ran {len(calls)} times in one forward")
    hidden, call = outputs[0], calls[0]
    call.after = between["after"]
    if probe is not None:
        if probe.seen is None:
            raise OnePassUnavailable("the decoder did not call its layer 1 after layer 0")
        seen, later = probe.seen
        differs = compat.same_call(call, later)
        if differs is not None:
            raise OnePassUnavailable(f"decoder layers 0 and 1 are called with different arguments ({differs})")
        expected = compat.after_layer(call, 0, hidden)
        if seen.shape != expected.shape or not bool(torch.equal(seen, expected)):
            raise OnePassUnavailable("the decoder changes the states between its layers 0 and 1 in a way this library "
                                     "cannot replay")
    return hidden, call


class _Steered:
    """Where one batch's states are steered: the prompt positions' mask as the steering
    primitive applies an edit (nothing, everything, or ``delta * weight``), worked out
    once for every layer."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.any, self.all = bool(mask.any()), bool(mask.all())
        self._weight: torch.Tensor | None = None

    def apply(self, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``hidden + delta`` at the steered positions (the primitive's arithmetic, so
        the states match a steered forward)."""
        if not self.any:
            return hidden
        delta = delta.to(hidden.device, hidden.dtype)
        if self.all:
            return hidden + delta
        if self._weight is None or self._weight.dtype != hidden.dtype or self._weight.device != hidden.device:
            self._weight = self.mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return hidden + delta * self._weight


class PreparedCalibration:
    """One sweep of a calibration set's forwards that every sequential calibration of
    the same data can start from: per batch decoder layer 0's output (the vision
    tower and the preprocessing done), the arguments of its decoder layers and its
    layout, and the text-only pooled sums at every layer (up to ``upto``). Under :func:`reusing_work`
    it is kept and reused (a sweep), with a checkpoint of the states at the last first
    steered layer used (alpha does not change them)."""

    def __init__(self, model: torch.nn.Module, batches: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]], *,
                 measure_at: str, store: str, store_folder: str | Path | None, tick: Callable[[int], Any],
                 upto: int | None = None) -> None:
        from ...distributed import is_distributed

        self.model, self.adapter = model, get_adapter(model)
        obstacle = compat.layer_call_obstacle(self.adapter.text_config)
        if obstacle:
            raise OnePassUnavailable(f"{type(model).__name__}: {obstacle}")
        self.measure_at, self.store, self.store_folder = measure_at, store, store_folder
        self.device = next(model.parameters()).device
        every = list(range(self.adapter.num_layers if upto is None else upto + 1))  # the text-only pass stops there
        self.text = ShiftAccumulator(every, self.adapter.hidden_size)
        self.inputs = StateStore(store, self.device, folder=store_folder)
        self.layouts: list[Any] = []
        self.measure: list[tuple[torch.Tensor, Any]] = []
        self.checkpoint: tuple[int, StateStore] | None = None
        self.stats = {"reference_forwards": 0, "text_forwards": 0, "layer_calls": 0}
        try:
            # one capture for every batch's text-only forward (its hooks registered once),
            # without masks while the reference forward runs
            with unsteered(), HiddenCapture(self.adapter, every, None, measure_at, detach=True) as text:
                for with_image, text_only in batches:
                    text.set_masks({"m": measure_mask(self.adapter.layout(text_only), measure_at)})
                    text.run(model, **text_only)
                    self.text.add(text.stacked("m").float())
                    text.set_masks({})
                    hidden, call = _decoder_input(self.adapter, model, with_image)
                    layout = self.adapter.layout(with_image)
                    where = measure_mask(layout, measure_at)
                    self.layouts.append(layout)
                    self.measure.append((where, last_masked(where) if measure_at == "last" else None))
                    self.inputs.put(hidden, call)
                    self.stats["reference_forwards"] += 1
                    self.stats["text_forwards"] += 1
                    tick(1)
            if is_distributed():
                self.text.reduce()
        except BaseException:
            self.close()
            raise
        self.text_means = self.text.means() if self.text.count else {}

    def close(self) -> None:
        self.inputs.close()
        if self.checkpoint is not None:
            self.checkpoint[1].close()
            self.checkpoint = None

    def vectors(self, layers: Sequence[int], alpha: Mapping[int, float], positions: frozenset[str], *, keep: bool = False,
                tick: Callable[[int], Any] = lambda n: None) -> dict[int, torch.Tensor]:
        """Sequential vectors for ``layers`` at ``alpha``, steering ``positions``.
        ``keep``: leave the prepared states as they are (another calibration follows)
        and keep a checkpoint at the first of ``layers``; otherwise the states are
        advanced in place."""
        return self.vectors_for([alpha], layers, positions, keep=keep, tick=tick)[0]

    def vectors_for(self, alphas: Sequence[Mapping[int, float]], layers: Sequence[int], positions: frozenset[str], *,
                    keep: bool = False, tick: Callable[[int], Any] = lambda n: None) -> list[dict[int, torch.Tensor]]:
        """:meth:`vectors` for several alphas on the same layers at once: up to the
        first steered layer the states are shared; after it each batch's rows are
        repeated once per alpha and called through the layers together (when the
        layer arguments can be repeated along the batch: :func:`compat.repeat_batch
        <lvlm_safety_plugins.compat.repeat_batch>`; otherwise one alpha at a time)."""
        from ...distributed import is_distributed

        n = len(alphas)
        decoder = list(self.adapter.decoder_layers)  # looked up once, not per batch and layer
        work_of = [_BatchWork(self, i, positions, decoder) for i in range(len(self.inputs))]
        if n > 1 and work_of and work_of[0].call(n) is None:
            return [self.vectors_for([a], layers, positions, keep=keep, tick=tick)[0] for a in alphas]
        chosen = list(layers)
        first = chosen[0]
        if keep and self.checkpoint is not None and self.checkpoint[0] <= first:
            source, done = self.checkpoint[1], self.checkpoint[0]
        else:
            source, done = self.inputs, 0  # the kept states are layer 0's output
        saving = keep and (self.checkpoint is None or self.checkpoint[0] != first)
        save = StateStore(self.store, self.device, folder=self.store_folder) if saving else None
        work = StateStore(self.store, self.device, folder=self.store_folder) if keep else self.inputs
        found: list[dict[int, torch.Tensor]] = [{} for _ in alphas]
        edit: torch.Tensor | None = None  # [n, H]: the previous steered layer's -alpha * vector per alpha
        try:
            with unsteered():
                for index, layer in enumerate(chosen):
                    copies = 1 if index == 0 else n  # before the first edit every alpha sees the same states
                    parts: list[torch.Tensor] = []  # per batch [copies, B, H], pooled
                    for i, batch in enumerate(work_of):
                        hidden, _ = (source if index == 0 else work).get(i)
                        if index == 1 and copies > 1:
                            hidden = hidden.repeat(copies, *([1] * (hidden.dim() - 1)))
                        hidden = batch.advance(hidden, edit, done, layer, copies)
                        parts.append(batch.pooled(hidden, copies))
                        if save is not None and index == 0:
                            save.put(hidden)
                        if layer != chosen[-1]:
                            if keep and index == 0:
                                work.put(hidden)
                            elif index == 1 and copies > 1:  # now one copy of the batch per alpha
                                work.replace(i, hidden)
                            else:
                                work.set(i, hidden)
                        tick(1)
                    self.stats["layer_calls"] += (layer - done) * copies * len(work_of)
                    done = layer
                    image = ShiftAccumulator(list(range(copies)), self.adapter.hidden_size)
                    if parts:  # float64 sums over every row, per copy
                        image.sums += torch.cat(parts, dim=1).double().sum(dim=1).cpu()
                        image.count = sum(int(part.shape[1]) for part in parts)
                    if is_distributed():
                        image.reduce()
                    if not image.count:
                        break
                    means = image.means()
                    for j in range(n):
                        found[j][layer] = means[min(j, copies - 1)] - self.text_means[layer]
                    edit = torch.stack([-alphas[j][layer] * found[j][layer] for j in range(n)])
        except BaseException:
            if save is not None:
                save.close()
            raise
        finally:
            if keep:
                work.close()
        if save is not None:
            if self.checkpoint is not None:
                self.checkpoint[1].close()
            self.checkpoint = (first, save)
        return found


class _BatchWork:
    """What :meth:`PreparedCalibration.vectors_for` needs of one batch, for its rows
    once (``copies`` 1) or once per alpha (``copies`` n, copy-major), each worked out
    once: the layer call, where the edit goes (:class:`_Steered`), where the states are
    pooled."""

    def __init__(self, prepared: PreparedCalibration, i: int, positions: frozenset[str], decoder: list[torch.nn.Module]) -> None:
        self.prepared, self.i, self.decoder = prepared, i, decoder
        layout = prepared.layouts[i]
        self.rows = int(layout.attention_mask.shape[0])
        self.mask = prompt_mask(layout, positions)
        self._calls: dict[int, compat.LayerCall | None] = {}
        self._steered: dict[int, _Steered] = {}
        self._measure: dict[int, tuple[torch.Tensor, Any]] = {1: prepared.measure[i]}
        self._edit: tuple[Any, torch.Tensor] | None = None  # the last edit as the batch's states take it

    def call(self, copies: int) -> compat.LayerCall | None:
        if copies not in self._calls:
            call = self.prepared.inputs.call(self.i)
            self._calls[copies] = call if copies == 1 else compat.repeat_batch(call, self.rows, copies)
        return self._calls[copies]

    def advance(self, hidden: torch.Tensor, edit: torch.Tensor | None, done: int, layer: int, copies: int) -> torch.Tensor:
        """``hidden`` (layer ``done``'s output) with ``edit`` applied as steering adds
        it, then through the decoder layers up to ``layer``."""
        if edit is not None:
            key = (done, copies, hidden.device, hidden.dtype)  # the edit of layer ``done``
            if self._edit is None or self._edit[0] != key:
                cast = edit.to(hidden.device, hidden.dtype)
                self._edit = (key, cast[0] if copies == 1 else cast.repeat_interleave(self.rows, dim=0).unsqueeze(1))
            steered = self._steered.get(copies)
            if steered is None:
                steered = self._steered[copies] = _Steered(self.mask if copies == 1 else self.mask.repeat(copies, 1))
            hidden = steered.apply(hidden, self._edit[1])
        call = self.call(copies)
        assert call is not None
        decoder = self.decoder
        for k in range(done + 1, layer + 1):
            hidden = compat.call_layer(decoder[k], compat.after_layer(call, k - 1, hidden), call)
        return hidden

    def pooled(self, hidden: torch.Tensor, copies: int) -> torch.Tensor:
        """``[copies, B, H]``: the states pooled at the measured positions."""
        measure = self._measure.get(copies)
        if measure is None:
            where, last = self._measure[1]
            repeated = where.repeat(copies, 1)
            measure = self._measure[copies] = (repeated, last_masked(repeated) if last is not None else None)
        where, last = measure
        return pool(hidden, where, self.prepared.measure_at, last=last).view(copies, self.rows, -1)


def sequential_vectors(
    model: torch.nn.Module,
    batches: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
    layers: Sequence[int],
    alpha: Mapping[int, float],
    positions: frozenset[str],
    *,
    measure_at: str = "last",
    store: str = "auto",
    store_folder: str | Path | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sequential CMRM vectors in one sweep of the decoder; returns ``({layer:
    vector}, samples)``.

    ``batches`` yields ``(reference-image inputs, text-only inputs)``. Each batch's
    text-only forward runs once (pooled on the fly at every layer) and its reference
    forward once, stopped after decoder layer 0 (:func:`_decoder_input`: a probe in
    layer 1's place checks that the decoder passes layer 0's output on unchanged, or
    changed in a way :func:`~lvlm_safety_plugins.compat.after_layer` replays); layer 0's
    output is kept (``store``: :class:`StateStore`) with the arguments the decoder layers
    were called with. Then
    for each steered layer in order the kept states are advanced through the decoder
    layers up to it (called again with those arguments), their pooled mean over every
    batch (float64, summed over processes under torch.distributed) minus the text-only
    mean is the layer's vector, and ``alpha_l`` times it is subtracted at
    ``positions`` (prompt kinds, :func:`~lvlm_safety_plugins.steering.prompt_mask`)
    before the next layer. The vectors equal those of one reference pass per layer,
    steered by the vectors found so far. Raises :class:`OnePassUnavailable` when the
    model's layers cannot be called again (see
    :func:`~lvlm_safety_plugins.compat.layer_call_obstacle`) or the probe finds the
    decoder doing something between its layers that cannot be replayed."""
    tick = progress or (lambda n: None)
    prepared = PreparedCalibration(model, batches, measure_at=measure_at, store=store, store_folder=store_folder, tick=tick,
                                   upto=max(layers))
    try:
        return prepared.vectors(layers, alpha, positions, tick=tick), prepared.text.count
    finally:
        prepared.close()


class CalibrationReuse:
    """What calibrations inside :func:`reusing_work` share: the prepared forwards
    (:class:`PreparedCalibration`) per model, data and reference settings, and the
    counts of what ran (``stats``)."""

    #: at most this many alphas are calibrated together (their states side by side)
    ALPHAS_AT_ONCE = 4

    def __init__(self, alphas: Sequence[float] = ()) -> None:
        self.prepared: dict[tuple[Any, ...], PreparedCalibration] = {}
        self.stats = {"calibrations": 0, "prepared": 0, "reused": 0}
        #: the alphas the caller will ask for, in order (a sweep's grid): calibrated in
        #: groups of :attr:`ALPHAS_AT_ONCE` when one of them is asked for
        self.alphas = [float(a) for a in alphas]
        self._found: dict[tuple[Any, ...], dict[int, torch.Tensor]] = {}

    def vectors(self, prepared: PreparedCalibration, layers: Sequence[int], alpha: Mapping[int, float],
                positions: frozenset[str], *, tick: Callable[[int], Any]) -> dict[int, torch.Tensor]:
        """``prepared.vectors(...)``, or, for one alpha on every layer that is in
        :attr:`alphas`, that alpha and the next ones of the grid calibrated together."""
        values = set(alpha.values())
        single = float(next(iter(values))) if len(values) == 1 else None
        if single is None or single not in self.alphas:
            return prepared.vectors(layers, alpha, positions, keep=True, tick=tick)
        key = (id(prepared), tuple(layers), positions)
        done = self._found.get((*key, single))
        if done is None:
            start = self.alphas.index(single)
            group = [a for a in self.alphas[start:] if (*key, a) not in self._found][: self.ALPHAS_AT_ONCE]
            found = prepared.vectors_for([{l: a for l in layers} for a in group], layers, positions, keep=True, tick=tick)
            for a, v in zip(group, found):
                self._found[(*key, a)] = v
            done = self._found[(*key, single)]
        return done

    def close(self) -> None:
        for prepared in self.prepared.values():
            for key, value in prepared.stats.items():
                self.stats[key] = self.stats.get(key, 0) + value
            prepared.close()
        self.prepared = {}


_REUSE: contextvars.ContextVar[CalibrationReuse | None] = contextvars.ContextVar("lvlm_safety_cmrm_reuse", default=None)


@contextlib.contextmanager
def reusing_work(alphas: Sequence[float] = ()) -> Iterator[CalibrationReuse]:
    """Inside the block, sequential calibrations of the same model, data, processor,
    template, batch size, reference and measurement position share their preprocessing,
    vision-tower and text-only forwards and the reference states up to their first
    steered layer (:func:`run_sweep <lvlm_safety_plugins.methods.cmrm.sweep.run_sweep>`
    calibrates every setting so). The kept states are removed when the block ends, also
    on error; ``stats`` then holds what ran. ``alphas``: the alphas that will be asked
    for in order (one per layer each): calibrated side by side in small groups."""
    reuse = CalibrationReuse(alphas)
    token = _REUSE.set(reuse)
    try:
        yield reuse
    finally:
        _REUSE.reset(token)
        reuse.close()


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
    ``composition``, ``alpha``, ``positions``, ``apply_to``, ``calibration_store``);
    ``layers`` defaults to every layer. Prompts without ``<image>`` get it prepended.
    ``prompt_template``: a template with ``{prompt}`` (checked first), or a
    :class:`~lvlm_safety_plugins.prompts.PromptFormat` (what the commands pass: the
    processor's chat template by default); its name is recorded in the vector file.

    ``composition: sequential`` (the default): layer ``l``'s vector is the mean shift
    at ``l`` with the layers before it steered by the vectors found so far (at their
    ``alpha``, at the prompt positions the recipe steers), so the vectors are exact for
    that alpha: at alpha 1 the mean steered state at every steered layer is the mean
    text-only state. It runs in one sweep of the decoder (:func:`sequential_vectors`:
    one text-only and one reference forward per sample, the reference states kept
    between layers in ``calibration_store``); a model whose layers cannot be called
    again gets one reference pass per layer instead (a warning says why).
    ``independent``: one unsteered forward of each kind.
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
    store = str(_option(config, "calibration_store", "auto"))
    if store not in STORES:
        raise DataError(f"cmrm.calibration_store must be one of {', '.join(STORES)}, got {store!r}")
    how = "one pass" if sequential else ""
    passes = 1 + (len(chosen) if sequential else 0)
    bar = progress_bar(total=len(starts) * passes, desc=f"CMRM calibration ({composition})", enabled=progress and me == 0)
    shift = ShiftAccumulator(chosen, adapter.hidden_size)
    count = 0
    was_training = model.training
    model.eval()
    try:
        if not sequential:
            for with_image, text_only in batches():
                shift.add(pooled(with_image, chosen) - pooled(text_only, chosen))
                bar.update()
            if is_distributed():
                shift.reduce()
            vectors = shift.means() if shift.count else {}
            count = shift.count
        else:
            reuse = _REUSE.get()
            try:
                if reuse is None:
                    vectors, count = sequential_vectors(model, batches(), chosen, alpha, kinds, measure_at=measure_at,
                                                        store=store, progress=bar.update)
                else:  # a sweep: the prepared forwards of the same data serve every setting
                    key = (id(model), id(dataset), id(processor), prompt_template, str(image_folder), batch_size, reference,
                           noise_seed, fill, measure_at, store, me, world)
                    prepared = reuse.prepared.get(key)
                    if prepared is None:
                        prepared = PreparedCalibration(model, batches(), measure_at=measure_at, store=store, store_folder=None,
                                                       tick=bar.update)
                        reuse.prepared[key] = prepared
                        reuse.stats["prepared"] += 1
                    else:
                        reuse.stats["reused"] += 1
                        bar.update(len(starts))
                    vectors = reuse.vectors(prepared, chosen, alpha, kinds, tick=bar.update)
                    count = prepared.text.count
                    reuse.stats["calibrations"] += 1
                    how = "one pass, reusing the sweep's prepared forwards"
            except OnePassUnavailable as exc:
                how = f"one reference pass per layer: {exc}"
                warnings.warn(f"CMRM calibration: {type(model).__name__} cannot be calibrated in one pass ({exc}); "
                              f"running one reference pass per steered layer ({len(chosen)} passes)", RuntimeWarning,
                              stacklevel=2)
                bar.reset(total=len(starts) * passes)
                vectors, count = _per_layer_vectors(model, adapter, batches, chosen, alpha, kinds, pooled, bar.update)
    finally:
        bar.close()
        model.train(was_training)
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
                  {FORMAT_KEY: f"template {prompt_template!r}"} if prompt_template else {}),
               **({"calibration": how} if how else {})},
    )


def _per_layer_vectors(model: torch.nn.Module, adapter: Any, batches: Callable[[], Iterable[tuple[Any, Any]]],
                       chosen: Sequence[int], alpha: Mapping[int, float], kinds: frozenset[str],
                       pooled: Callable[[Mapping[str, Any], Sequence[int]], torch.Tensor],
                       tick: Callable[[int], Any]) -> tuple[dict[int, torch.Tensor], int]:
    """Sequential vectors with one reference pass per steered layer (each stopped after
    its layer, steered by the vectors found so far): the fallback of
    :func:`sequential_vectors`, about ``1 + K/2`` forwards per sample for ``K`` layers."""
    from ...distributed import is_distributed

    text = ShiftAccumulator(list(chosen), adapter.hidden_size)
    for _, text_only in batches():
        text.add(pooled(text_only, chosen))
        tick(1)
    if is_distributed():
        text.reduce()
    text_means = text.means() if text.count else {}
    vectors: dict[int, torch.Tensor] = {}
    for layer in chosen:
        image = ShiftAccumulator([layer], adapter.hidden_size)
        with contextlib.ExitStack() as stack:
            if vectors:
                edit = vector_edit(dict(vectors), {l: -alpha[l] for l in vectors})
                stack.enter_context(steer(model, edit, layers=sorted(vectors), positions=kinds, adapter=adapter,
                                          name="CMRM calibration"))
            for with_image, _ in batches():
                image.add(pooled(with_image, [layer]))
                tick(1)
        if is_distributed():
            image.reduce()
        if not image.count:
            break
        vectors[layer] = image.means()[layer] - text_means[layer]
    return vectors, text.count


def save_vectors(vectors: SteeringVectors, path: str | Path) -> Path:
    """Write ``vectors`` (atomically) from the main process only; under
    torch.distributed the other processes wait until the file is there."""
    from ...distributed import barrier, is_main_process

    target = Path(path)
    if is_main_process():
        target = vectors.save(path)
    barrier()
    return target


__all__ = ["STORES", "CalibrationReuse", "OnePassUnavailable", "PreparedCalibration", "ShiftAccumulator", "StateStore", "calibrate",
           "reusing_work", "sequential_vectors", "iter_calibration_rows", "measure_mask", "measure_states", "save_vectors"]
