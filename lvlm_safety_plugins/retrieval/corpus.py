"""Reading a caption corpus: JSON, JSONL, a text file, LLaVA-format JSON or an HF dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..loading import DataFileError

#: fields tried, in order, when no text field is named
TEXT_FIELDS = ("caption", "image_caption", "text", "sentence")


@dataclasses.dataclass
class Corpus:
    """Texts to index and, where the corpus says, the image each one describes."""

    texts: list[str]
    images: list[str | None]
    source: str
    duplicates_dropped: int = 0

    def __len__(self) -> int:
        return len(self.texts)


def llava_response(record: Mapping[str, Any]) -> str | None:
    """The first ``gpt`` turn of a LLaVA-format record (the caption in LLaVA's pretrain
    data, where the human turn is ``<image>`` plus an instruction)."""
    for turn in record.get("conversations") or ():
        if isinstance(turn, Mapping) and turn.get("from") in ("gpt", "assistant"):
            value = turn.get("value")
            return value.strip() if isinstance(value, str) else None
    return None


def record_image(record: Mapping[str, Any], field: str = "image") -> str | None:
    """The record's image file name (the first one if it lists several)."""
    value = record.get(field)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return str(value) if value else None


def _rows_from_file(file: Path) -> Iterable[tuple[str, Any]]:
    from ..loading import read_text

    text = read_text(file)  # a file that is not UTF-8 is a DataFileError naming it and the line
    if file.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_no}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{file}: line {line_no}: not valid JSON: {exc.msg}") from None
    elif file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(rows, list):
            raise DataFileError(f"{file}: expected a JSON list of records")
        for i, row in enumerate(rows):
            yield f"row {i}", row
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield f"line {line_no}", {"text": line.strip()}


def _rows_from_dataset(dataset: Any, split: str | None, where: str) -> Iterable[tuple[str, Any]]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise DataFileError(f"{where}: a dataset with splits {sorted(dataset)}: name one with split=/--split")
            split = next(iter(dataset))
        if split not in dataset:
            raise DataFileError(f"{where}: no split {split!r}; splits: {sorted(dataset)}")
        dataset = dataset[split]
    for i, row in enumerate(dataset):
        yield f"row {i}", row


def read_corpus(
    source: Any,
    text_field: str | None = None,
    image_field: str = "image",
    split: str | None = None,
    dedupe: bool = True,
) -> Corpus:
    """Texts (and image names) from ``source``: a ``.json``/``.jsonl`` file of records or
    LLaVA-format conversations, a text file with one caption a line, a folder written by
    ``datasets.Dataset.save_to_disk``, or a ``datasets`` object.

    The text is ``text_field`` if given, else the first of :data:`TEXT_FIELDS` a record
    has, else (LLaVA format) its first ``gpt`` turn. With ``dedupe``, repeated texts are
    indexed once. A row without a text is an error naming the file and the row.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if path.is_dir():
            import datasets

            try:
                rows = _rows_from_dataset(datasets.load_from_disk(str(path)), split, where)
            except FileNotFoundError as exc:
                raise DataFileError(f"{path}: not a folder written by datasets' save_to_disk: {exc}") from None
        elif path.is_file():
            rows = _rows_from_file(path)
        else:
            raise DataFileError(f"{path}: file not found")
    else:
        where = f"<{type(source).__name__}>"
        rows = _rows_from_dataset(source, split, where)

    texts: list[str] = []
    images: list[str | None] = []
    seen: set[str] = set()
    dropped = 0
    for position, row in rows:
        if not isinstance(row, Mapping):
            raise DataFileError(f"{where}: {position}: expected an object, got {type(row).__name__}")
        if text_field is not None:
            text = row.get(text_field)
        else:
            text = next((row[f] for f in TEXT_FIELDS if isinstance(row.get(f), str)), None)
            if text is None:
                text = llava_response(row)
        if not isinstance(text, str) or not text.strip():
            wanted = repr(text_field) if text_field else f"one of {', '.join(TEXT_FIELDS)} or a LLaVA 'gpt' turn"
            raise DataFileError(f"{where}: {position} (id {row.get('id', '?')!r}): no text ({wanted})")
        text = text.strip()
        if dedupe:
            if text in seen:
                dropped += 1
                continue
            seen.add(text)
        texts.append(text)
        images.append(record_image(row, image_field))
    if not texts:
        raise DataFileError(f"{where}: no texts found")
    return Corpus(texts, images, where, dropped)


__all__ = ["Corpus", "TEXT_FIELDS", "llava_response", "read_corpus", "record_image"]
