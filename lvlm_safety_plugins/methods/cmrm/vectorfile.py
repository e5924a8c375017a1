"""CMRM shift vectors on disk: safetensors with metadata, checked before use."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ...compat import VOLATILE_CONFIG_KEYS
from ...errors import VectorFileError
from ...fileio import atomic_output_path
from ...identity import PER_PARAM as _PER_PARAM
from ...identity import weights_digest, weights_sample

FORMAT = "lvlm-safety-plugins/cmrm-vectors/1"
_VOLATILE = VOLATILE_CONFIG_KEYS
REQUIRED_META = ("format", "model_class", "fingerprint", "hidden_size", "num_layers", "layers", "variant", "reference", "measure_at", "samples")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _strip(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])) if str(k) not in _VOLATILE and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's configuration (text and vision), without volatile fields
    (paths, versions, dtypes), so the same architecture and settings give the same
    fingerprint wherever it is loaded."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    text = json.dumps(_strip(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


#: tensor key of the sampled weights (see :func:`weights_sample`) in a vector file
WEIGHTS_KEY = "fingerprint.weights"
#: relative tolerance of the weights comparison: bf16/fp16 loading of the same weights
#: moves a value by at most 2**-9 of itself; training moves many by far more
WEIGHTS_RTOL = 8e-3
WEIGHTS_ATOL = 1e-6


def compare_weights(saved: torch.Tensor, current: torch.Tensor) -> str | None:
    """``None`` when two :func:`weights_sample` s describe the same weights (up to a
    dtype's rounding), else a sentence saying how they differ."""
    if saved.shape != current.shape:
        return f"the file sampled {saved.numel() // _PER_PARAM} parameter tensors, the model has {current.numel() // _PER_PARAM}"
    known = torch.isfinite(saved) & torch.isfinite(current)
    diff = (saved - current).abs()
    off = known & (diff > WEIGHTS_ATOL + WEIGHTS_RTOL * current.abs())
    if not bool(off.any()):
        return None
    return (f"{int(off.sum())} of {int(known.sum())} sampled weights differ (largest difference "
            f"{float(diff[off].max()):.3g}): the weights were trained or replaced since calibration")


def _meta_list(file: Path, meta: Mapping[str, str], key: str, kind: type, *, optional: bool = False) -> list[Any] | None:
    """A metadata value that must be a JSON list of ``kind``; errors name file and key."""
    if key not in meta and optional:
        return None
    text = meta[key]
    try:
        value = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise VectorFileError(f"{file}: metadata key {key!r}: not valid JSON ({exc}): {text!r}") from None
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value):
        raise VectorFileError(f"{file}: metadata key {key!r}: expected a JSON list of {kind.__name__}s, got {text!r}")
    if kind is float and not all(math.isfinite(v) for v in value):
        raise VectorFileError(f"{file}: metadata key {key!r}: has non-finite values: {text!r}")
    if kind is int and len(set(value)) != len(value):
        raise VectorFileError(f"{file}: metadata key {key!r}: lists a layer twice: {text!r}")
    return value


@dataclass
class SteeringVectors:
    """Per-layer CMRM shift vectors (float32, ``[hidden]`` each) and their metadata."""

    vectors: dict[int, torch.Tensor]
    model_class: str
    fingerprint: str
    hidden_size: int
    num_layers: int
    variant: str = "dataset"
    reference: str = "blank"
    measure_at: str = "last"
    samples: int = 0
    recipe: str = ""
    #: ``sequential`` (each layer measured under the steering of the earlier ones) or
    #: ``independent``; files written by earlier releases have no such key and are independent
    composition: str = "independent"
    #: sequential only: the alpha of each layer (in ``layers`` order) and the prompt
    #: position kinds that were steered while measuring; the vectors hold for these
    alpha: list[float] | None = None
    positions: list[str] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: :func:`weights_sample` of the calibrated model (``None``: files of earlier
    #: releases, and vectors not made by calibration: not checked)
    weights: torch.Tensor | None = field(default=None, compare=False)
    #: the file these vectors were loaded from (not saved; named in errors)
    path: str | None = field(default=None, compare=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "model_class": self.model_class,
            "fingerprint": self.fingerprint,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "layers": json.dumps(self.layers),
            "variant": self.variant,
            "reference": self.reference,
            "measure_at": self.measure_at,
            "samples": str(self.samples),
            "recipe": self.recipe,
            "composition": self.composition,
        }
        if self.alpha is not None:
            meta["alpha"] = json.dumps(self.alpha)
        if self.positions is not None:
            meta["positions"] = json.dumps(self.positions)
        meta.update({f"x-{k}": v for k, v in self.extra.items()})
        return meta

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (never a half-written file)."""
        from safetensors.torch import save_file

        tensors = {f"layer.{layer}": v.detach().to(torch.float32).cpu().contiguous() for layer, v in self.vectors.items()}
        if self.weights is not None:
            tensors[WEIGHTS_KEY] = self.weights.detach().to(torch.float32).cpu().contiguous()
        target = Path(path)
        with atomic_output_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())
        return target

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVectors":
        """Read and validate a vector file; errors name the file."""
        from safetensors import safe_open

        file = Path(path)
        if not file.is_file():
            raise VectorFileError(f"{file}: vector file not found")
        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise VectorFileError(f"{file}: not a readable safetensors vector file (corrupt or truncated?): {exc}") from None
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise VectorFileError(f"{file}: missing metadata {missing}: not a CMRM vector file written by lvlm-safety-plugins")
        if meta["format"] != FORMAT:
            raise VectorFileError(f"{file}: unknown format {meta['format']!r} (expected {FORMAT!r})")
        numbers = {}
        for key in ("hidden_size", "num_layers", "samples"):
            try:
                numbers[key] = int(meta[key])
            except (ValueError, TypeError):
                raise VectorFileError(f"{file}: metadata key {key!r}: expected an integer, got {meta[key]!r}") from None
        hidden, num_layers, samples = numbers["hidden_size"], numbers["num_layers"], numbers["samples"]
        layers = _meta_list(file, meta, "layers", int)
        alpha = _meta_list(file, meta, "alpha", float, optional=True)
        positions = _meta_list(file, meta, "positions", str, optional=True)
        assert layers is not None
        composition = meta.get("composition", "independent")
        if composition not in ("sequential", "independent"):
            raise VectorFileError(f"{file}: unknown composition {composition!r} (expected 'sequential' or 'independent')")
        if composition == "sequential" and (not isinstance(alpha, list) or len(alpha) != len(layers) or not isinstance(positions, list)):
            raise VectorFileError(f"{file}: sequential vectors need 'alpha' (one per layer) and 'positions' in the metadata")
        vectors: dict[int, torch.Tensor] = {}
        for layer in layers:
            key = f"layer.{layer}"
            if key not in tensors:
                raise VectorFileError(f"{file}: metadata lists layer {layer} but the file has no tensor {key!r}")
            vec = tensors[key]
            if vec.dim() != 1 or vec.shape[0] != hidden:
                raise VectorFileError(f"{file}: tensor {key!r} has shape {tuple(vec.shape)}, expected ({hidden},)")
            if not torch.isfinite(vec).all():
                raise VectorFileError(f"{file}: tensor {key!r} has non-finite values")
            vectors[int(layer)] = vec.to(torch.float32)
        weights = tensors.get(WEIGHTS_KEY)
        return cls(
            weights=weights.to(torch.float32) if weights is not None else None,
            vectors=vectors, model_class=meta["model_class"], fingerprint=meta["fingerprint"], hidden_size=hidden,
            num_layers=num_layers, variant=meta["variant"], reference=meta["reference"], measure_at=meta["measure_at"],
            samples=samples, recipe=meta.get("recipe", ""), composition=composition, path=str(file),
            alpha=[float(a) for a in alpha] if alpha is not None else None, positions=positions,
            extra={k[2:]: v for k, v in meta.items() if k.startswith("x-")},
        )

    def check(self, model: Any, *, strict: bool = True, source: str | Path = "<vectors>") -> None:
        """Refuse vectors that do not fit ``model``: hidden size, layer ids, and the
        model fingerprint (an error, or a warning with ``strict=False``)."""
        from ...adapters import get_adapter

        adapter = get_adapter(model)
        if self.hidden_size != adapter.hidden_size:
            raise VectorFileError(f"{source}: vectors have hidden size {self.hidden_size}, the model has {adapter.hidden_size}")
        bad = [layer for layer in self.layers if not 0 <= layer < adapter.num_layers]
        if bad:
            raise VectorFileError(f"{source}: layers {bad} do not exist: the model has {adapter.num_layers} decoder layers")
        if self.num_layers != adapter.num_layers:
            raise VectorFileError(f"{source}: vectors were made for {self.num_layers} layers, the model has {adapter.num_layers}")
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            msg = (f"{source}: vectors were calibrated on another model ({self.model_class}, fingerprint {self.fingerprint}); "
                   f"this {type(model).__name__} has fingerprint {fp}")
            if strict:
                raise VectorFileError(msg + " (pass strict=False / cmrm.strict=false to use them anyway)")
            warnings.warn(msg, stacklevel=2)
        if self.weights is not None:
            problem = compare_weights(self.weights, weights_sample(model))
            if problem:
                msg = (f"{source}: vectors were calibrated on other weights of this {self.model_class} architecture: "
                       f"{problem}. CMRM vectors hold for the weights they were measured on (docs/recipes.md): "
                       "recalibrate on this model")
                if strict:
                    raise VectorFileError(msg + " (or pass strict=False / cmrm.strict=false to use them anyway)")
                warnings.warn(msg, stacklevel=2)

    def check_use(self, *, composition: str, layers: Sequence[int], alpha: Mapping[int, float],
                  positions: Iterable[str] | None, strict: bool = True, source: str | Path | None = None,
                  reference: str | None = None, measure_at: str | None = None) -> None:
        """Refuse steering these vectors in a way they were not calibrated for.

        Sequential vectors hold only for the layers, the alphas and the prompt
        positions they were measured under: layer l's vector was measured with the
        steered layers before it steered at their alpha, so every steered layer must be
        one of them (the same set), every alpha but the last layer's must be the same,
        and the prompt positions must be the same. ``positions=None`` skips that check
        (folding, which steers every position). Errors name the recipe key
        (``cmrm.composition``, ``cmrm.layers``, ``cmrm.alpha``, ``cmrm.positions``);
        ``strict=False`` warns instead. ``reference`` and ``measure_at`` (when given)
        must be the ones the vectors were measured with (any composition).
        """
        problems: list[str] = []
        for key, wanted, have in (("reference", reference, self.reference), ("measure_at", measure_at, self.measure_at)):
            if wanted is not None and str(wanted) != str(have):
                problems.append(f"cmrm.{key}: the vectors were calibrated with {key} '{have}', the recipe says '{wanted}'")
        if composition != self.composition:
            problems.append(f"cmrm.composition: the vectors were calibrated '{self.composition}', the recipe says '{composition}'")
        elif composition == "sequential":
            chosen = sorted(int(l) for l in layers)
            if chosen != self.layers:
                problems.append(f"cmrm.layers: sequential vectors were calibrated on layers {self.layers}; steering {chosen} "
                                "would apply vectors measured under another steering")
            else:
                calibrated = dict(zip(self.layers, self.alpha or []))
                bad = [l for l in chosen[:-1] if abs(float(alpha[l]) - float(calibrated.get(l, float("nan")))) > 1e-9]
                if bad:
                    problems.append(f"cmrm.alpha: sequential vectors were calibrated at alpha {[calibrated[l] for l in bad]} on layers "
                                    f"{bad}, the recipe steers them at {[float(alpha[l]) for l in bad]}")
            if positions is not None and sorted(positions) != sorted(self.positions or []):
                problems.append(f"cmrm.positions: sequential vectors were calibrated steering {sorted(self.positions or [])}, "
                                f"the recipe steers {sorted(positions)} in the prompt")
        if not problems:
            return
        msg = f"{source or self.path or '<vectors>'}: " + "; ".join(problems) + " (recalibrate with this recipe)"
        if strict:
            raise VectorFileError(msg + ", or pass strict=False / cmrm.strict=false to use them anyway")
        warnings.warn(msg, stacklevel=2)

    def scaled(self, alpha: float | Mapping[int, float]) -> dict[int, torch.Tensor]:
        return {l: v * (alpha[l] if isinstance(alpha, Mapping) else alpha) for l, v in self.vectors.items()}


def load_checked(path: str | Path, model: Any, strict: bool = True) -> SteeringVectors:
    vectors = SteeringVectors.load(path)
    vectors.check(model, strict=strict, source=path)
    return vectors


__all__ = ["SteeringVectors", "compare_weights", "load_checked", "model_fingerprint", "weights_digest", "weights_sample"]
