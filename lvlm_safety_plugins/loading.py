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
    check_device(device)
    try:
        model = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise LVLMSafetyError(f"{folder}: the weights cannot be loaded (a truncated or corrupt weight file?): "
                              f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise LVLMSafetyError(f"{folder}: a weight file is truncated or corrupt (safetensors: {exc})") from None
    model = model.to(device).eval()
    processor = load_processor(folder)
    from .adapters.hf import record_image_markers

    record_image_markers(model, processor)  # image markers only the processor names (Idefics3, SmolVLM, Llama 4)
    return model, processor


def check_device(device: Any) -> None:
    """Refuse a device this machine does not have (``cuda`` without CUDA, ``cuda:3`` on
    two GPUs, ``mps`` without MPS) with a one-line error, before any loading."""
    import torch

    text = str(device)
    kind, _, index = text.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LVLMSafetyError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__}, "
                                  f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise LVLMSafetyError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LVLMSafetyError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    else:
        try:
            torch.device(text)
        except (RuntimeError, ValueError) as exc:
            raise LVLMSafetyError(f"--device {text}: not a device torch knows ({exc})") from None


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


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """A data file's text; bytes that are not ``encoding`` are a :class:`DataFileError`
    naming the file, the line and the byte offset (never a raw UnicodeDecodeError)."""
    file = Path(path)
    data = file.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(f"{file}: line {line} (byte {exc.start}): not valid {exc.encoding.upper()} text ({exc.reason}); "
                            f"save the file as {encoding.upper()}") from None


def read_records(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON list, or (for a single ``prompt`` field) a text file
    with one prompt a line. Each row must have the ``required`` keys."""
    file = Path(path)
    if not file.is_file():
        raise DataFileError(f"{file}: file not found")
    text = read_text(file)
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
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataFileError(f"{where}: unreadable image {path}: {exc}") from None


__all__ = ["DataFileError", "check_device", "load_model_and_processor", "load_processor", "open_image", "read_records",
           "read_text"]
