"""Content identities: what a cached result or a calibrated file was made *from*.

A path or a model name says where something was, not what it was: a vector file
recalibrated into the same path, or new weights copied into the same model folder, keep
their names. These helpers identify content instead, cheaply:

* :func:`file_digest` - sha256 of a file's bytes;
* :func:`weights_files_identity` - a model folder's weight files (``*.safetensors``,
  ``*.bin``, ``*.pt``): name, size, modification time and a hash of the safetensors
  header (names, dtypes, shapes, offsets), the whole content for files up to
  :data:`FULL_HASH_BYTES`;
* :func:`weights_sample` / :func:`weights_digest` - four values at fixed positions of
  every parameter tensor of a loaded model (what vector files compare, with a
  tolerance, and evaluation caches hash);
* :func:`recipe_files` - the digest of every existing file a recipe names (a vector
  file, for example).

Torch is imported only by the functions that read a model.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

#: weight files up to this size are hashed whole; larger ones by size, mtime and header
FULL_HASH_BYTES = 64 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: values sampled from each parameter tensor by :func:`weights_sample`
PER_PARAM = 4


def file_digest(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """sha256 (hex, 32 characters) of the file's bytes (its first ``limit`` bytes)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as handle:
        while left is None or left > 0:
            chunk = handle.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()[:32]


def _safetensors_header_len(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return n if 0 < n < 100 * 1024 * 1024 else None


def weights_files_identity(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{file name: identity}`` for the weight files of a model folder (``None`` when
    ``folder`` is not a folder). Each identity holds the size and modification time and
    either a hash of the whole file (small files) or of its safetensors header."""
    base = Path(folder)
    if not base.is_dir():
        return None
    out: dict[str, Any] = {}
    for file in sorted(p for p in base.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        stat = file.stat()
        entry: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size <= FULL_HASH_BYTES:
            entry["sha256"] = file_digest(file)
        else:
            n = _safetensors_header_len(file) if file.suffix == ".safetensors" else None
            entry["header_sha256" if n else "head_sha256"] = file_digest(file, limit=8 + n if n else 1 << 20)
        out[file.name] = entry
    return out


def weights_sample(model: Any) -> "Any":
    """``PER_PARAM`` values at fixed positions (first, a third, two thirds, last) of
    every parameter tensor, in ``named_parameters`` order, as one float32 CPU tensor.
    Parameters without local data (meta device, ZeRO-3 partitions) give NaN."""
    import torch

    out: list[torch.Tensor] = []
    positions: dict[tuple[int, Any], torch.Tensor] = {}  # the index tensor per size and device, made once
    for _, param in model.named_parameters():
        n = param.numel()
        if n == 0 or param.device.type == "meta":
            out.append(torch.full((PER_PARAM,), float("nan")))
            continue
        idx = positions.get((n, param.device))
        if idx is None:
            idx = positions[(n, param.device)] = torch.tensor([0, n // 3, (2 * n) // 3, n - 1], device=param.device)
        values = param.detach().reshape(-1).index_select(0, idx)
        if values.dtype != torch.float32:
            values = values.float()
        out.append(values if values.device.type == "cpu" else values.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def weights_digest(model: Any) -> str:
    """A short hash of :func:`weights_sample` (exact values): the same loaded weights
    give the same digest, trained or replaced weights another."""
    return hashlib.sha256(weights_sample(model).numpy().tobytes()).hexdigest()[:20]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def recipe_files(recipe: Any) -> dict[str, str]:
    """``{path: sha256}`` of every existing file a recipe's values name (vector files,
    for example), so a file rewritten under the same name changes the identity."""
    data = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    out: dict[str, str] = {}
    for text in _strings(data):
        if not text or len(text) > 4096 or "\n" in text:
            continue
        try:
            path = Path(text)
            if path.is_file():
                out[text] = file_digest(path)
        except (OSError, ValueError):
            continue
    return out


__all__ = ["FULL_HASH_BYTES", "PER_PARAM", "file_digest", "recipe_files", "weights_digest", "weights_files_identity",
           "weights_sample"]
