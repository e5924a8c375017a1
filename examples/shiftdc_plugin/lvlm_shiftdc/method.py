"""ShiftDC-style steering (after Zou et al., "Understanding and Rectifying Safety
Perception Distortion in VLMs", arXiv 2502.13095), written only against the public API
of lvlm-safety-plugins, as a third party would.

CMRM subtracts the whole image-induced shift ``v_l`` from the hidden states. ShiftDC
keeps the part of the shift that carries visual content and removes only its component
along a *safety direction* ``d_l`` of the LLM — the unit difference between the mean
last-token states of harmful and benign text prompts:

    h_l  <-  h_l - alpha * (v_l . d_l) d_l

The shift ``v_l`` comes from a CMRM vector file (``lvlm-safety calibrate``); the
directions come from this plugin's ``calibrate`` hook (rows ``{"prompt", "label"}``
with labels ``harmful`` / ``benign``). Steering goes through the package's steering
primitive, ``lvlm_safety_plugins.steering`` (padding-safe, prefill/decode aware,
context-local, removed exactly on exit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from omegaconf import MISSING

# public names only (lvlm_safety_plugins.PUBLIC_MODULES; a test checks it)
from lvlm_safety_plugins import (
    ConfigValueError,
    HiddenCapture,
    LVLMSafetyError,
    Method,
    atomic_output_path,
    get_adapter,
    hookimpl,
    load_vectors,
    parse_layers,
    steering,
)

if TYPE_CHECKING:  # pragma: no cover
    from lvlm_safety_plugins import Runtime

LABELS = ("harmful", "benign")
#: the config's positions -> the steering primitive's position kinds
POSITIONS = {"image": "image", "text": ("text", "generated"), "all": "all"}


@dataclass
class ShiftDCConfig:
    """The ``shiftdc`` recipe section."""

    #: CMRM dataset-level vector file (the image-induced shift per layer)
    shift_vectors: str = MISSING
    #: safety-direction file written by the calibrate hook
    directions: str = MISSING
    #: "all", a range such as "10-20", or a list of layer ids
    layers: Any = "all"
    #: steering strength
    alpha: float = 1.0
    #: steered positions: image, text or all
    positions: str = "all"
    #: batch size of the direction calibration
    batch_size: int = 8

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.positions not in ("image", "text", "all"):
            raise ConfigValueError("positions", f"must be one of image, text, all; got {cfg.positions!r}")
        parse_layers(cfg.layers)
        if cfg.batch_size < 1:
            raise ConfigValueError("batch_size", "must be >= 1")


def _text_rows(dataset: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[bool]]:
    prompts, harmful = [], []
    for i, row in enumerate(dataset):
        label = row.get("label") if isinstance(row, Mapping) else None
        if label not in LABELS or not isinstance(row.get("prompt"), str):
            raise LVLMSafetyError(f"shiftdc calibration row {i}: needs 'prompt' and 'label' in {LABELS}, got {row!r}")
        prompts.append(row["prompt"])
        harmful.append(label == "harmful")
    if not any(harmful) or all(harmful):
        raise LVLMSafetyError("shiftdc calibration needs both harmful and benign prompts")
    return prompts, harmful


@torch.no_grad()
def safety_directions(model: torch.nn.Module, tokenizer: Any, dataset: Iterable[Mapping[str, Any]],
                      layers: Any = None, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Unit ``mean(h | harmful) - mean(h | benign)`` of the last prompt token per layer."""
    adapter = get_adapter(model)
    prompts, harmful = _text_rows(dataset)
    chosen = adapter.resolve_layers(layers)
    sums = {k: {l: torch.zeros(adapter.hidden_size, dtype=torch.float64) for l in chosen} for k in (True, False)}
    counts = {True: 0, False: 0}
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        labels = harmful[start:start + batch_size]
        with HiddenCapture(adapter, chosen, {"prompt": enc["attention_mask"].bool()}, pooling="last", detach=True) as cap:
            cap.run(model, **enc)
        for layer in chosen:
            states = cap.pooled["prompt"][layer].double().cpu()
            for row, is_harmful in enumerate(labels):
                sums[is_harmful][layer] += states[row]
        for is_harmful in labels:
            counts[is_harmful] += 1
    out = {}
    for layer in chosen:
        diff = sums[True][layer] / counts[True] - sums[False][layer] / counts[False]
        out[layer] = (diff / diff.norm().clamp(min=1e-12)).float()
    return out


def save_directions(directions: Mapping[int, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    with atomic_output_path(path) as tmp:
        save_file({f"layer.{l}": v.contiguous() for l, v in directions.items()}, str(tmp),
                  metadata={"kind": "shiftdc-directions", "layers": json.dumps(sorted(directions))})


def load_directions(path: str, hidden_size: int) -> dict[int, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise LVLMSafetyError(f"{path}: not a readable shiftdc direction file: {exc}") from None
    out = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("layer.")}
    bad = [l for l, v in out.items() if v.shape != (hidden_size,)]
    if not out or bad:
        raise LVLMSafetyError(f"{path}: expected one vector of size {hidden_size} per layer (bad layers: {bad})")
    return out


class ShiftDC(Method):
    """Remove only the safety-relevant component of the image-induced shift."""

    name = "shiftdc"
    kind = "steering"
    config_class = ShiftDCConfig
    description = "ShiftDC-style steering (example external plugin)"

    @hookimpl
    def calibrate(self, model: torch.nn.Module, processor: Any, dataset: Any, runtime: "Runtime") -> dict[str, Any]:
        tokenizer = getattr(processor, "tokenizer", processor)
        dirs = safety_directions(model, tokenizer, dataset, parse_layers(self.config.layers), int(self.config.batch_size))
        save_directions(dirs, self.config.directions)
        return {"method": self.name, "path": self.config.directions, "layers": sorted(dirs)}

    def projected_shift(self, model: torch.nn.Module) -> dict[int, torch.Tensor]:
        """``(v_l . d_l) d_l`` for every steered layer."""
        adapter = get_adapter(model)
        shift = load_vectors(self.config.shift_vectors, model)
        dirs = load_directions(self.config.directions, adapter.hidden_size)
        layers = parse_layers(self.config.layers)
        chosen = sorted(set(shift.layers) & set(dirs)) if layers is None else adapter.resolve_layers(layers)
        missing = [l for l in chosen if l not in dirs or l not in shift.vectors]
        if missing:
            raise LVLMSafetyError(f"shiftdc: no shift vector or direction for layers {missing}")
        return {l: torch.dot(shift.vectors[l].float(), dirs[l]) * dirs[l] for l in chosen}

    @hookimpl
    def install_steering(self, model: torch.nn.Module, runtime: "Runtime") -> Any:
        # the prompt's chosen positions, and the generated tokens unless only image
        # positions are steered (generated tokens are text), as CMRM does
        positions = POSITIONS[self.config.positions]
        vectors = self.projected_shift(model)
        return steering.add_vectors(model, vectors, scale=-float(self.config.alpha), positions=positions,
                                    adapter=runtime.adapter, name=self.name)
