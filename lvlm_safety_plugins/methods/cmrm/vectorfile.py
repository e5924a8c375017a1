"""CMRM shift vectors on disk: safetensors with metadata, checked before use."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ...compat import VOLATILE_CONFIG_KEYS
from ...errors import VectorFileError
from ...fileio import atomic_output_path

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
        try:
            hidden, num_layers, samples = int(meta["hidden_size"]), int(meta["num_layers"]), int(meta["samples"])
            layers = json.loads(meta["layers"])
            alpha = json.loads(meta["alpha"]) if "alpha" in meta else None
            positions = json.loads(meta["positions"]) if "positions" in meta else None
        except (ValueError, json.JSONDecodeError) as exc:
            raise VectorFileError(f"{file}: bad metadata: {exc}") from None
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
        return cls(
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

    def check_use(self, *, composition: str, layers: Sequence[int], alpha: Mapping[int, float],
                  positions: Iterable[str] | None, strict: bool = True, source: str | Path | None = None) -> None:
        """Refuse steering these vectors in a way they were not calibrated for.

        Sequential vectors hold only for the layers, the alphas and the prompt
        positions they were measured under: layer l's vector was measured with the
        steered layers before it steered at their alpha, so every steered layer must be
        one of them (the same set), every alpha but the last layer's must be the same,
        and the prompt positions must be the same. ``positions=None`` skips that check
        (folding, which steers every position). Errors name the recipe key
        (``cmrm.composition``, ``cmrm.layers``, ``cmrm.alpha``, ``cmrm.positions``);
        ``strict=False`` warns instead.
        """
        problems: list[str] = []
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


__all__ = ["SteeringVectors", "load_checked", "model_fingerprint"]
