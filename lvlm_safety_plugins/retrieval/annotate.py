"""Annotating LLaVA-format training data with retrieved captions for TGA.

For every record with an image, the image is embedded (CLIP image tower), the caption
index is searched, and the top-``k`` texts that are *not the sample's own caption* are
written as ``retrieved_caption`` (and ``retrieved_captions`` when ``k > 1``). The own
caption is recognised three ways (the leak guard):

* the index entry was built from the same image (the corpus named it);
* the text equals the record's own caption after case and whitespace folding;
* its vector's cosine with the own caption's vector reaches ``near_duplicate``.

Where the record's caption is known (a ``image_caption``/``caption`` field, or the index
entry of the same image), it is written as ``image_caption``. Records without an image
(text-only turns in LLaVA's fine-tune mix) pass through unchanged. Records whose image is
missing or unreadable are kept unchanged in the output, reported by row and id, and
counted; with ``strict`` they fail the run and nothing is written. The output file is
written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write
from ..loading import DataFileError, open_image, read_records
from .corpus import record_image
from .embedders import Embedder, RetrievalError, load_embedder
from .index import CaptionIndex

CAPTION_FIELDS = ("image_caption", "caption")


@dataclasses.dataclass
class RowProblem:
    """A record that could not be annotated."""

    row: int
    id: Any
    image: str | None
    reason: str


@dataclasses.dataclass
class AnnotateReport:
    """What :func:`annotate` did, row by row where something went wrong."""

    records: int = 0
    annotated: int = 0
    text_only: int = 0
    captions_added: int = 0
    excluded_own: int = 0
    excluded_near_duplicate: int = 0
    bad_rows: list[RowProblem] = dataclasses.field(default_factory=list)
    unmatched: list[RowProblem] = dataclasses.field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (
            f"{self.records} records: {self.annotated} annotated, {self.text_only} without image, "
            f"{len(self.bad_rows)} bad (missing or unreadable image), {len(self.unmatched)} with no text left "
            f"after the leak guard; excluded {self.excluded_own} own captions and "
            f"{self.excluded_near_duplicate} near-duplicates; {self.captions_added} image_caption fields added"
        )


def fold_text(text: str) -> str:
    """Case- and whitespace-folded text, trailing punctuation dropped (the exact-duplicate
    test of the leak guard)."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?,;: ").casefold()


def _own_captions(record: dict, image: str, index: CaptionIndex, caption_key: str | None) -> tuple[list[str], list[int]]:
    rows = index.rows_for_image(image)
    keys = (caption_key,) if caption_key else CAPTION_FIELDS
    given = [record[k].strip() for k in keys if isinstance(record.get(k), str) and record[k].strip()]
    return given + [index.texts[r] for r in rows if index.texts[r] not in given], rows


def annotate(
    records_path: str | Path,
    index: CaptionIndex | str | Path,
    out: str | Path,
    image_folder: str | Path | None = None,
    embedder: Embedder | str | None = None,
    k: int = 1,
    near_duplicate: float | None = 0.9,
    caption_key: str | None = None,
    retrieved_key: str = "retrieved_caption",
    caption_out_key: str = "image_caption",
    batch_size: int = 32,
    strict: bool = False,
    report_path: str | Path | None = None,
    progress: bool = True,
    gpu: str = "auto",
    force_embedder: bool = False,
) -> AnnotateReport:
    """Write ``out``: the records of ``records_path`` (LLaVA-format JSON or JSONL) with
    retrieved captions added. See the module docstring for the rules.

    ``out`` (and ``report_path``) may not be ``records_path``: the input is never
    replaced. ``embedder`` defaults to the one the index was built with; another one
    is an error (its vectors live in another space, so the retrieved captions would
    be meaningless) unless ``force_embedder``."""
    from ..fileio import check_output
    from ..progress import progress_bar

    if k < 1:
        raise RetrievalError(f"k must be >= 1, got {k}")
    if near_duplicate is not None and not (-1.0 <= near_duplicate <= 1.0):
        raise RetrievalError(f"near_duplicate is a cosine threshold in [-1, 1] (or None to switch it off), got {near_duplicate}")
    source = Path(records_path)
    check_output(out, overwrite=True, inputs=[source], flag="out")
    if report_path is not None:
        check_output(report_path, overwrite=True, inputs=[source, out], flag="report")
    records = read_records(source)
    if source.suffix not in (".json", ".jsonl"):
        raise DataFileError(f"{source}: annotate reads LLaVA-format .json or .jsonl files")
    if not isinstance(index, CaptionIndex):
        index = CaptionIndex.load(index)
    if embedder is not None:
        index.check_embedder(embedder.spec if isinstance(embedder, Embedder) else str(embedder), force=force_embedder)
    emb = load_embedder(embedder if embedder is not None else (index.embedder_spec or ""))
    if "image" not in emb.modalities:
        emb.embed_images([])  # raises the embedder's own explanation
    folder = Path(image_folder) if image_folder is not None else source.parent
    report = AnnotateReport(records=len(records))

    todo: list[int] = []
    for row, record in enumerate(records):
        if record_image(record) is None:
            report.text_only += 1
        else:
            todo.append(row)

    with progress_bar(total=len(todo), desc="annotate", unit="record", enabled=progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images, ok = [], []
            for row in chunk:
                name = record_image(records[row])
                try:
                    images.append(open_image(folder / name, f"image {name!r}"))
                    ok.append(row)
                except DataFileError as exc:
                    report.bad_rows.append(RowProblem(row, records[row].get("id"), name, str(exc)))
            if ok:
                _annotate_batch(records, ok, images, index, emb, k, near_duplicate, caption_key,
                                retrieved_key, caption_out_key, batch_size, report, gpu)
            bar.update(len(chunk))

    if strict and report.bad_rows:
        shown = "; ".join(f"row {p.row} (id {p.id!r}): {p.reason}" for p in report.bad_rows[:5])
        more = f" and {len(report.bad_rows) - 5} more" if len(report.bad_rows) > 5 else ""
        raise DataFileError(f"{source}: {len(report.bad_rows)} records have missing or unreadable images: {shown}{more}; nothing written")

    target = Path(out)
    with atomic_write(target) as handle:
        if target.suffix == ".jsonl":
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(records, handle, ensure_ascii=False, indent=2)
    report.output = str(target)
    if report_path is not None:
        with atomic_write(report_path) as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)
    return report


def _annotate_batch(
    records: list[dict],
    rows: Sequence[int],
    images: Sequence[Any],
    index: CaptionIndex,
    emb: Embedder,
    k: int,
    near_duplicate: float | None,
    caption_key: str | None,
    retrieved_key: str,
    caption_out_key: str,
    batch_size: int,
    report: AnnotateReport,
    gpu: str,
) -> None:
    queries = emb.embed_images(list(images), batch_size=batch_size)
    owns = [_own_captions(records[r], record_image(records[r]) or "", index, caption_key) for r in rows]
    # the own captions' vectors, for the near-duplicate test
    flat_texts = [t for captions, _ in owns for t in captions]
    own_vecs = emb.embed_texts(flat_texts, batch_size=batch_size) if (flat_texts and near_duplicate is not None) else None
    offsets = np.cumsum([0] + [len(c) for c, _ in owns])

    pending = list(range(len(rows)))
    width = min(len(index), k + 8 + max(len(own_rows) for _, own_rows in owns))
    chosen: dict[int, list[int]] = {}
    counts: dict[int, tuple[int, int]] = {}
    while pending:
        scores, ids = index.search(queries[pending], width, gpu=gpu)
        cand_ids = sorted({int(i) for i in ids.ravel() if i >= 0})
        lookup = dict(zip(cand_ids, index.vectors(cand_ids))) if own_vecs is not None else {}
        still = []
        for slot, row_ids in zip(pending, ids):
            captions, own_rows = owns[slot]
            folded = {fold_text(c) for c in captions}
            mine = own_vecs[offsets[slot]:offsets[slot + 1]] if own_vecs is not None else None
            keep: list[int] = []
            n_own = n_near = 0
            for cid in (int(i) for i in row_ids if i >= 0):
                if cid in own_rows or fold_text(index.texts[cid]) in folded:
                    n_own += 1
                elif mine is not None and len(mine) and float(np.max(mine @ lookup[cid])) >= near_duplicate:
                    n_near += 1
                else:
                    keep.append(cid)
                if len(keep) == k:
                    break
            if len(keep) < k and width < len(index):
                still.append(slot)
            else:
                chosen[slot], counts[slot] = keep, (n_own, n_near)
        pending = still
        width = min(len(index), width * 4)

    for slot, row in enumerate(rows):
        record = records[row]
        keep = chosen[slot]
        n_own, n_near = counts[slot]
        report.excluded_own += n_own
        report.excluded_near_duplicate += n_near
        captions, _ = owns[slot]
        if captions and not (isinstance(record.get(caption_out_key), str) and record[caption_out_key].strip()):
            record[caption_out_key] = captions[0]
            report.captions_added += 1
        if not keep:
            report.unmatched.append(RowProblem(row, record.get("id"), record_image(record), "every retrieved text was the own caption or a near-duplicate"))
            continue
        record[retrieved_key] = index.texts[keep[0]]
        if k > 1:
            record[retrieved_key + "s"] = [index.texts[c] for c in keep]
        report.annotated += 1


__all__ = ["AnnotateReport", "RowProblem", "annotate", "fold_text"]
