"""An input-side check of the benchmarks' images with an image safety classifier
(``lvlm-safety eval --image-check shieldgemma2 --image-check-option model=PATH``).

ShieldGemma 2 reads one image and one policy ("No Dangerous Content: ...") and answers
whether the image violates it; ``ShieldGemma2ForImageClassification`` returns the
probabilities of its ``Yes`` (violates) and ``No`` tokens. The check runs every distinct
image of the loaded benchmarks through each policy and reports, per benchmark and
policy, the share of images whose ``Yes`` probability reaches ``threshold``: how much
of a benchmark's harm an image filter alone would see. It needs transformers >= 4.50
(the ShieldGemma 2 classes) and a local model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .judges import JudgeError, _as_int, load_kwargs


class ShieldGemma2Check:
    """ShieldGemma 2 as an image classifier. Options: ``model`` (a local folder with the
    model and its processor, required), ``policies`` (comma-separated keys of the
    processor's policy definitions; default: all of them), ``threshold`` (0.5),
    ``batch_size`` (images per forward, 4), ``device``, ``dtype``."""

    name = "shieldgemma2"

    def __init__(self, model: str | Path | None = None, policies: str | Sequence[str] | None = None, threshold: Any = 0.5,
                 batch_size: Any = 4, device: str = "cpu", dtype: str = "auto") -> None:
        if not model:
            raise JudgeError("shieldgemma2 image check: option model=PATH (a local ShieldGemma 2 folder) is required")
        self.model_path = Path(model)
        if not self.model_path.is_dir():
            raise JudgeError(f"shieldgemma2 image check: model folder {self.model_path} not found")
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError):
            raise JudgeError(f"shieldgemma2 image check: threshold={threshold!r} is not a number") from None
        if not 0 <= self.threshold <= 1:
            raise JudgeError(f"shieldgemma2 image check: threshold must lie in [0, 1], got {self.threshold}")
        self.requested = [p.strip() for p in (policies.split(",") if isinstance(policies, str) else policies or []) if p.strip()]
        self.batch_size = _as_int(batch_size, "batch_size", 1)
        self.device = device
        self.dtype = dtype
        self._model: Any = None
        self._processor: Any = None
        self.policies: list[str] = []

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            from transformers import AutoProcessor, ShieldGemma2ForImageClassification
        except ImportError:
            from ..compat import installed_transformers

            raise JudgeError(f"shieldgemma2 image check needs transformers >= 4.50 (installed: {installed_transformers()})") from None
        kwargs = load_kwargs(self.dtype, "shieldgemma2 image check")
        try:
            self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
            self._model = ShieldGemma2ForImageClassification.from_pretrained(self.model_path, **kwargs).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise JudgeError(f"shieldgemma2 image check: cannot load {self.model_path}: {exc}") from None
        known = list(getattr(self._processor, "policy_definitions", {}) or {})
        unknown = [p for p in self.requested if p not in known]
        if unknown:
            raise JudgeError(f"shieldgemma2 image check: unknown policies {', '.join(unknown)} (the processor's: {', '.join(known)})")
        self.policies = self.requested or known

    def scores(self, images: Sequence[Any]) -> list[dict[str, float]]:
        """For each image (a path or a PIL image): ``{policy: P(violates)}``."""
        import torch

        from ..loading import open_image

        self._load()
        out: list[dict[str, float]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [open_image(img, "shieldgemma2 image check") if isinstance(img, (str, Path)) else img
                     for img in images[start : start + self.batch_size]]
            inputs = self._processor(images=chunk, policies=self.policies, return_tensors="pt").to(self._model.device)
            with torch.no_grad():
                probs = self._model(**inputs).probabilities[:, 0].float().cpu()  # [Yes, No]: Yes = violates
            probs = probs.view(len(chunk), len(self.policies))
            out += [{p: float(row[j]) for j, p in enumerate(self.policies)} for row in probs]
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": str(self.model_path), "policies": self.policies or self.requested,
                "threshold": self.threshold}


BUILTIN_IMAGE_CHECKS = {"shieldgemma2": ShieldGemma2Check}


def check_images(checker: Any, examples: Mapping[str, Sequence[Any]], max_listed: int = 50) -> dict[str, Any]:
    """Run ``checker`` on every distinct image of ``examples`` (benchmark -> examples)
    and summarise per benchmark: images, and per policy (and any policy) the share at or
    above the threshold, with Wilson intervals; the flagged images (at most ``max_listed``)."""
    from .metrics import proportion

    from ..loading import open_image

    refs: dict[str, Any] = {}
    for items in examples.values():
        for e in items:
            if e.image is not None and e.image_ref not in refs:
                refs[e.image_ref] = open_image(e.image, e.where) if isinstance(e.image, (str, Path)) else e.image
    keys = list(refs)
    scored = dict(zip(keys, checker.scores([refs[k] for k in keys]))) if keys else {}
    threshold = checker.threshold
    per_benchmark: dict[str, Any] = {}
    flagged: list[dict[str, Any]] = []
    for bench, items in examples.items():
        mine = list(dict.fromkeys(e.image_ref for e in items if e.image is not None))
        if not mine:
            continue
        policies = list(next(iter(scored.values())))
        per_benchmark[bench] = {
            "images": len(mine),
            "policies": {p: proportion(sum(scored[k][p] >= threshold for k in mine), len(mine)) for p in policies},
            "any": proportion(sum(any(v >= threshold for v in scored[k].values()) for k in mine), len(mine)),
        }
        flagged += [{"benchmark": bench, "image": k, "scores": scored[k]} for k in mine
                    if any(v >= threshold for v in scored[k].values())]
    return {**(checker.describe() if hasattr(checker, "describe") else {"name": type(checker).__name__}),
            "per_benchmark": per_benchmark, "flagged_total": len(flagged), "flagged": flagged[:max_listed]}


__all__ = ["BUILTIN_IMAGE_CHECKS", "ShieldGemma2Check", "check_images"]
