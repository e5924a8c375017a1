"""A caption index on faiss: unit vectors, inner product (= cosine), exact or approximate,
saved and loaded together with its texts.

Kinds:

* ``flat`` — exact search (``IndexFlatIP``);
* ``ivf`` — inverted lists over k-means cells (``IndexIVFFlat``), ``nprobe`` cells searched;
* ``hnsw`` — a navigable small-world graph (``IndexHNSWFlat``), ``ef_search`` candidates;
* ``ivfpq`` — inverted lists with product-quantised vectors (``IndexIVFPQ``) for corpora
  that do not fit in memory as float32, optionally re-ranked exactly (``refine``).

With ``faiss-gpu`` installed and a GPU present (``faiss.get_num_gpus() > 0``), flat and
IVF indexes are moved to the GPUs for building and searching (``gpu="auto"``); HNSW has no
GPU implementation and stays on the CPU. Saved indexes are always CPU indexes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import __version__
from .embedders import RetrievalError, normalize_rows

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
TEXTS_FILE = "texts.jsonl"
META_FILE = "meta.json"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise RetrievalError("the caption index needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclasses.dataclass
class IndexParams:
    """How an index is built and searched. ``None`` means chosen from the corpus size."""

    kind: str = "flat"
    nlist: int | None = None        # IVF cells (default ~4*sqrt(n), >= 39 points per cell)
    nprobe: int | None = None       # IVF cells searched (default max(1, nlist // 64))
    hnsw_m: int = 32                # HNSW graph degree
    ef_construction: int = 80
    ef_search: int = 64
    pq_m: int | None = None         # PQ sub-quantisers (a divisor of dim; default dim // 4 capped at 64)
    pq_bits: int | None = None      # bits per code (default 8, fewer for tiny corpora)
    refine: bool = False            # ivfpq: re-rank candidates with the exact vectors
    refine_factor: int = 4
    train_size: int = 262_144       # vectors sampled to train IVF/PQ

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise RetrievalError(f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        for name in ("nlist", "nprobe", "pq_m", "pq_bits"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetrievalError(f"index parameter {name} must be >= 1, got {value}")
        if self.hnsw_m < 2 or self.ef_search < 1 or self.ef_construction < 1 or self.refine_factor < 1:
            raise RetrievalError("hnsw_m must be >= 2; ef_search, ef_construction and refine_factor >= 1")

    def resolved(self, n: int, dim: int) -> "IndexParams":
        """A copy with every ``None`` chosen for ``n`` vectors of size ``dim``."""
        p = dataclasses.replace(self)
        if p.kind in ("ivf", "ivfpq"):
            if p.nlist is None:
                p.nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1, 65_536))
            if p.nlist > n:
                raise RetrievalError(f"nlist={p.nlist} is larger than the corpus ({n} texts)")
            if p.nprobe is None:
                p.nprobe = max(1, p.nlist // 64)
            p.nprobe = min(p.nprobe, p.nlist)
        if p.kind == "ivfpq":
            if p.pq_m is None:
                p.pq_m = max(d for d in range(1, min(64, max(1, dim // 4)) + 1) if dim % d == 0)
            if dim % p.pq_m:
                raise RetrievalError(f"pq_m={p.pq_m} must divide the vector size {dim}")
            if p.pq_bits is None:
                p.pq_bits = max(1, min(8, int(math.log2(max(2, n // 39)))))
            if n < 39 * (1 << p.pq_bits) // 4:
                raise RetrievalError(
                    f"an ivfpq index with pq_bits={p.pq_bits} needs at least {39 * (1 << p.pq_bits) // 4} texts "
                    f"to train, the corpus has {n}; use kind 'flat' or fewer pq_bits"
                )
        return p


@dataclasses.dataclass
class SearchHit:
    """One retrieved text."""

    id: int
    score: float
    text: str
    image: str | None = None


def _new_index(params: IndexParams, dim: int) -> Any:
    faiss = _faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, ip)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_bits, ip)
        if params.refine:
            index = faiss.IndexRefineFlat(index)
            index.k_factor = params.refine_factor
    return index  # faiss's Python wrappers keep the quantizer alive themselves


def _ivf_of(index: Any) -> Any:
    faiss = _faiss()
    base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefineFlat) else index
    try:
        return faiss.extract_index_ivf(base)
    except RuntimeError:
        return None


def _apply_search_params(index: Any, params: IndexParams) -> None:
    faiss = _faiss()
    ivf = _ivf_of(index) if params.kind in ("ivf", "ivfpq") else None
    if ivf is not None and params.nprobe:
        ivf.nprobe = params.nprobe
    if params.kind == "hnsw" and hasattr(index, "hnsw"):
        index.hnsw.efSearch = params.ef_search
    if isinstance(index, faiss.IndexRefineFlat):
        index.k_factor = params.refine_factor


class CaptionIndex:
    """Texts and their unit vectors in a faiss index; ``search`` returns inner products
    (cosine similarities) and row ids into :attr:`texts`.

    ``images`` optionally holds, per text, the image it describes (from the corpus), so
    annotation can recognise a sample's own caption by its image as well as by its text.
    """

    def __init__(
        self,
        index: Any,
        texts: list[str],
        params: IndexParams,
        embedder_spec: str | None = None,
        images: list[str | None] | None = None,
    ) -> None:
        if index.ntotal != len(texts):
            raise RetrievalError(f"the faiss index holds {index.ntotal} vectors but {len(texts)} texts were given")
        if images is not None and len(images) != len(texts):
            raise RetrievalError(f"{len(images)} image names for {len(texts)} texts")
        self.index = index
        self.texts = texts
        self.images = images
        self.params = params
        self.embedder_spec = embedder_spec
        self.dim = int(index.d)
        self._gpu_index: Any = None
        self._image_rows: dict[str, list[int]] | None = None

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_vectors(
        cls,
        vectors: Any,
        texts: Sequence[str],
        params: IndexParams | None = None,
        embedder_spec: str | None = None,
        images: Sequence[str | None] | None = None,
        batch_size: int = 65_536,
        gpu: str = "auto",
        progress: bool = False,
        seed: int = 0,
    ) -> "CaptionIndex":
        """An index over ``vectors`` (normalised here), added in batches of
        ``batch_size``; IVF and PQ kinds are first trained on a sample."""
        from ..progress import progress_bar

        faiss = _faiss()
        vectors = normalize_rows(vectors)
        n, dim = vectors.shape
        if n != len(texts):
            raise RetrievalError(f"{n} vectors for {len(texts)} texts")
        if n == 0:
            raise RetrievalError("cannot build an index over an empty corpus")
        params = (params or IndexParams()).resolved(n, dim)
        index = _new_index(params, dim)
        on_gpu = _use_gpu(gpu) and params.kind != "hnsw"
        work = faiss.index_cpu_to_all_gpus(index) if on_gpu else index
        if not work.is_trained:
            rng = np.random.default_rng(seed)
            sample = vectors if n <= params.train_size else vectors[np.sort(rng.choice(n, params.train_size, replace=False))]
            work.train(sample)
        for start in progress_bar(range(0, n, batch_size), desc=f"index {params.kind}", unit="batch", enabled=progress):
            work.add(vectors[start:start + batch_size])
        if on_gpu:
            index = faiss.index_gpu_to_cpu(work)
        _apply_search_params(index, params)
        return cls(index, list(texts), params, embedder_spec, list(images) if images is not None else None)

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        embedder: Any,
        params: IndexParams | None = None,
        images: Sequence[str | None] | None = None,
        batch_size: int = 256,
        gpu: str = "auto",
        progress: bool = True,
    ) -> "CaptionIndex":
        """Embed ``texts`` with ``embedder`` (in batches, with a progress bar) and index
        them."""
        from .embedders import load_embedder

        embedder = load_embedder(embedder)
        vectors = embedder.embed_texts(list(texts), batch_size=batch_size, progress=progress)
        return cls.from_vectors(vectors, texts, params, embedder.spec, images, gpu=gpu, progress=progress)

    # -- searching ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.texts)

    def _searcher(self, gpu: str) -> Any:
        if self.params.kind == "hnsw" or not _use_gpu(gpu):
            return self.index
        if self._gpu_index is None:
            self._gpu_index = _faiss().index_cpu_to_all_gpus(self.index)
            _apply_search_params(self._gpu_index, self.params)
        return self._gpu_index

    def check_embedder(self, spec: str, force: bool = False) -> None:
        """Refuse an embedder other than the one the index was built with (its vectors
        live in another space: the hits would be meaningless), unless ``force``. Specs
        naming the same folder by different paths are the same embedder."""
        if force or not self.embedder_spec or same_embedder(spec, self.embedder_spec):
            return
        raise RetrievalError(
            f"embedder {spec!r} is not the one the index was built with ({self.embedder_spec!r}): its vectors are in "
            "another space, so the retrieved texts would be meaningless; leave the embedder out to use the index's, "
            "or pass force_embedder=True / --force-embedder if it is the same model")

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the search-time knobs (IVF cells searched, HNSW candidates); ``None``
        keeps a knob as it is."""
        if nprobe is not None:
            self.params.nprobe = int(nprobe)
        if ef_search is not None:
            self.params.ef_search = int(ef_search)
        _apply_search_params(self.index, self.params)
        self._gpu_index = None  # a GPU copy would keep the old settings: rebuilt on the next search

    def search(self, queries: Any, k: int = 10, gpu: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids, each ``(n_queries, k)``; ids are -1 (score -inf) where fewer
        than ``k`` texts were found."""
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        queries = normalize_rows(queries)
        if queries.shape[1] != self.dim:
            raise RetrievalError(
                f"query vectors have size {queries.shape[1]} but the index holds vectors of size {self.dim}"
                + (f" (built with embedder {self.embedder_spec!r})" if self.embedder_spec else "")
            )
        scores, ids = self._searcher(gpu).search(queries, min(k, len(self)))
        if k > ids.shape[1]:
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[SearchHit]]:
        """Search output as :class:`SearchHit` lists, one per query (missing ids dropped)."""
        return [
            [
                SearchHit(int(i), float(s), self.texts[i], self.images[i] if self.images else None)
                for s, i in zip(row_s, row_i) if i >= 0
            ]
            for row_s, row_i in zip(scores, ids)
        ]

    def rows_for_image(self, image: str) -> list[int]:
        """Ids of the texts that describe ``image`` (compared by file name as given and by
        base name)."""
        if not self.images:
            return []
        if self._image_rows is None:
            table: dict[str, list[int]] = {}
            for row, name in enumerate(self.images):
                if name:
                    table.setdefault(_image_key(name), []).append(row)
            self._image_rows = table
        return self._image_rows.get(_image_key(image), [])

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """The stored vectors of ``ids`` (exact for flat/HNSW/IVF, decoded for PQ)."""
        faiss = _faiss()
        ids_arr = np.asarray(list(ids), dtype=np.int64)
        index = self.index
        if isinstance(index, faiss.IndexRefineFlat):
            index = faiss.downcast_index(index.refine_index)
        ivf = _ivf_of(index) if self.params.kind in ("ivf", "ivfpq") else None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        if len(ids_arr) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(index.reconstruct_batch(ids_arr))

    # -- files -------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``index.faiss``, ``texts.jsonl`` and ``meta.json`` into ``folder``,
        atomically: the folder appears complete or not at all."""
        faiss = _faiss()
        target = Path(folder)
        if target.exists() and not overwrite:
            raise RetrievalError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            from ..fileio import _umask

            os.chmod(tmp, 0o777 & ~_umask())  # a plain mkdir's mode, not mkdtemp's 0700
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            with open(tmp / TEXTS_FILE, "w", encoding="utf-8") as handle:
                for row, text in enumerate(self.texts):
                    entry: dict[str, Any] = {"text": text}
                    if self.images and self.images[row] is not None:
                        entry["image"] = self.images[row]
                    handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            meta = {
                "format_version": FORMAT_VERSION,
                "count": len(self.texts),
                "dim": self.dim,
                "metric": "inner_product",
                "normalized": True,
                "embedder": self.embedder_spec,
                "params": dataclasses.asdict(self.params),
                "created_with": f"lvlm-safety-plugins {__version__}",
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.replace(target, old / "index")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "CaptionIndex":
        """An index saved by :meth:`save`; every missing, corrupt or inconsistent part is
        an error naming the file."""
        faiss = _faiss()
        base = Path(folder)
        if not base.is_dir():
            raise RetrievalError(f"{base}: index folder not found")
        for name in (META_FILE, INDEX_FILE, TEXTS_FILE):
            if not (base / name).is_file():
                raise RetrievalError(f"{base / name}: missing (not an index saved by lvlm-safety index build?)")
        try:
            meta = json.loads((base / META_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RetrievalError(f"{base / META_FILE}: not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise RetrievalError(f"{base / META_FILE}: unsupported index format {meta.get('format_version') if isinstance(meta, dict) else meta!r}")
        try:
            params = IndexParams(**meta["params"])
        except (KeyError, TypeError) as exc:
            raise RetrievalError(f"{base / META_FILE}: bad 'params': {exc}") from None
        try:
            index = faiss.read_index(str(base / INDEX_FILE))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RetrievalError(f"{base / INDEX_FILE}: corrupt or truncated faiss index ({first})") from None
        texts: list[str] = []
        images: list[str | None] = []
        with open(base / TEXTS_FILE, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                try:
                    entry = json.loads(line)
                    texts.append(entry["text"])
                    images.append(entry.get("image"))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RetrievalError(f"{base / TEXTS_FILE}: line {line_no}: expected {{\"text\": ...}}") from None
        if index.ntotal != len(texts) or meta.get("count") != len(texts):
            raise RetrievalError(
                f"{base}: {INDEX_FILE} holds {index.ntotal} vectors, {TEXTS_FILE} {len(texts)} texts, "
                f"{META_FILE} says {meta.get('count')}: the files do not belong together"
            )
        if index.d != meta.get("dim"):
            raise RetrievalError(f"{base}: {INDEX_FILE} has vectors of size {index.d}, {META_FILE} says {meta.get('dim')}")
        _apply_search_params(index, params)
        return cls(index, texts, params, meta.get("embedder"), images if any(i is not None for i in images) else None)

    def __repr__(self) -> str:
        return f"<CaptionIndex {self.params.kind} n={len(self)} dim={self.dim} embedder={self.embedder_spec!r}>"


def same_embedder(a: str, b: str) -> bool:
    """Two embedder specs name the same embedder: equal prefixes and equal arguments,
    or paths of the same folder (``clip:./m`` and ``clip:/abs/m``)."""
    pa, _, xa = str(a).partition(":")
    pb, _, xb = str(b).partition(":")
    if pa != pb:
        return False
    if xa == xb:
        return True
    try:
        return Path(xa).resolve() == Path(xb).resolve()
    except (OSError, ValueError):
        return False


def _image_key(name: str) -> str:
    return os.path.normpath(str(name)).replace("\\", "/").lstrip("./")


def _use_gpu(gpu: str) -> bool:
    if gpu not in ("auto", "never", "always"):
        raise RetrievalError(f"gpu must be 'auto', 'never' or 'always', got {gpu!r}")
    if gpu == "never":
        return False
    n = gpu_count()
    if gpu == "always" and n == 0:
        raise RetrievalError("gpu='always' but faiss sees no GPU (install faiss-gpu and check faiss.get_num_gpus())")
    return n > 0


__all__ = ["INDEX_KINDS", "CaptionIndex", "IndexParams", "SearchHit", "gpu_count", "same_embedder"]
