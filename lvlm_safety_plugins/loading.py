"""Loading a local model folder and reading small data files, with errors that name
the file and the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataError, LVLMSafetyError


class DataFileError(DataError):
    """A data file is missing, unreadable, or has a bad row (named in the message)."""


def load_model_and_processor(path: str | Path, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """A vision-language model (or a causal LM) and its processor/tokenizer from a local
    folder, in eval mode. Nothing is downloaded."""
    import transformers
    from transformers import AutoConfig

    from .compat import dtype_kwargs

    folder = Path(path)
    if not folder.is_dir():
        raise LVLMSafetyError(f"{folder}: model folder not found")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LVLMSafetyError(f"{folder}: not a transformers model folder: {exc}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    kwargs = {"local_files_only": True}
    kwargs.update(dtype_kwargs(dtype))
    model = cls.from_pretrained(folder, **kwargs).to(device).eval()
    processor = load_processor(folder)
    from .adapters.hf import record_image_markers

    record_image_markers(model, processor)  # image markers only the processor names (Idefics3, SmolVLM, Llama 4)
    return model, processor


def load_processor(path: str | Path) -> Any:
    """The processor of a local model folder (its tokenizer for a text-only model)."""
    import transformers

    folder = Path(path)
    if not folder.is_dir():
        raise LVLMSafetyError(f"{folder}: model folder not found")
    try:
        return transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def read_records(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON list, or (for a single ``prompt`` field) a text file
    with one prompt a line. Each row must have the ``required`` keys."""
    file = Path(path)
    if not file.is_file():
        raise DataFileError(f"{file}: file not found")
    text = file.read_text(encoding="utf-8")
    rows: list[Any]
    if file.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{file}: line {n}: not valid JSON: {exc.msg}") from None
    elif file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(rows, list):
            raise DataFileError(f"{file}: expected a JSON list of records")
    else:
        rows = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFileError(f"{file}: row {i}: expected an object, got {type(row).__name__}")
        for key in required:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataFileError(f"{file}: row {i} (id {row.get('id', i)!r}): missing or empty {key!r}")
    return rows


def open_image(path: str | Path, where: str) -> Any:
    """An RGB PIL image; ``where`` (file and row) goes into the error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataFileError(f"{where}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataFileError(f"{where}: unreadable image {path}: {exc}") from None


__all__ = ["DataFileError", "load_model_and_processor", "load_processor", "open_image", "read_records"]
