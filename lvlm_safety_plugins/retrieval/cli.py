"""``lvlm-safety index build | query | annotate | info``."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _params(args: argparse.Namespace) -> Any:
    from .index import IndexParams

    return IndexParams(
        kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
        ef_construction=args.ef_construction, pq_m=args.pq_m, pq_bits=args.pq_bits, refine=args.refine,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .corpus import read_corpus
    from .embedders import RetrievalError, load_embedder
    from .index import CaptionIndex

    from ..fileio import check_output

    check_output(args.out, overwrite=args.overwrite, kind="folder", replace_folder=True, inputs=[args.data])
    params = _params(args)  # bad parameters fail before any embedding is done
    corpus = read_corpus(args.data, text_field=args.text_field, image_field=args.image_field, split=args.split,
                         dedupe=not args.keep_duplicates)
    embedder = load_embedder(args.embedder, device=args.device)
    index = CaptionIndex.build(corpus.texts, embedder, params, images=corpus.images, batch_size=args.batch_size,
                               gpu=args.gpu, progress=not args.quiet)
    index.save(args.out, overwrite=args.overwrite)
    dup = f" ({corpus.duplicates_dropped} duplicate texts skipped)" if corpus.duplicates_dropped else ""
    print(f"indexed {len(index)} texts from {corpus.source}{dup}: {index.params.kind}, dim {index.dim}, "
          f"embedder {embedder.spec}")
    print(f"wrote {args.out}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from ..loading import open_image
    from .embedders import RetrievalError, load_embedder
    from .index import CaptionIndex

    index = CaptionIndex.load(args.index)
    _tune(index, args)
    if not args.text and not args.image:
        raise RetrievalError("give at least one --text or --image query")
    if args.embedder:
        index.check_embedder(args.embedder, force=args.force_embedder)
    embedder = load_embedder(args.embedder or index.embedder_spec or "", device=args.device)
    queries: list[tuple[str, Any]] = []
    if args.text:
        vecs = embedder.embed_texts(args.text)
        queries += [(f"text: {t}", v) for t, v in zip(args.text, vecs)]
    if args.image:
        images = [open_image(p, "--image") for p in args.image]
        vecs = embedder.embed_images(images)
        queries += [(f"image: {p}", v) for p, v in zip(args.image, vecs)]
    import numpy as np

    scores, ids = index.search(np.stack([v for _, v in queries]), args.k)
    results = index.hits(scores, ids)
    if args.json:
        print(json.dumps([{"query": q, "hits": [h.__dict__ for h in hits]} for (q, _), hits in zip(queries, results)],
                         indent=2, ensure_ascii=False))
        return 0
    for (q, _), hits in zip(queries, results):
        print(q)
        for rank, hit in enumerate(hits, start=1):
            print(f"  {rank:2d}. {hit.score:.4f}  {hit.text}" + (f"  [{hit.image}]" if hit.image else ""))
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from ..fileio import check_output
    from .annotate import annotate
    from .index import CaptionIndex

    report_path = args.report or f"{args.out}.report.json"
    # before any embedding: never the input, one --overwrite rule for both outputs
    check_output(args.out, overwrite=args.overwrite, inputs=[args.data])
    check_output(report_path, overwrite=args.overwrite, inputs=[args.data, args.out], flag="--report")
    index = CaptionIndex.load(args.index)
    _tune(index, args)
    report = annotate(
        args.data, index, args.out, image_folder=args.image_folder, embedder=args.embedder, k=args.k,
        near_duplicate=None if args.near_duplicate > 1 else args.near_duplicate, caption_key=args.caption_key,
        batch_size=args.batch_size, strict=args.strict, report_path=report_path, progress=not args.quiet, gpu=args.gpu,
        force_embedder=args.force_embedder,
    )
    print(report.summary())
    for problem in report.bad_rows[:20]:
        print(f"  bad row {problem.row} (id {problem.id!r}): {problem.reason}")
    if len(report.bad_rows) > 20:
        print(f"  ... {len(report.bad_rows) - 20} more in {report_path}")
    print(f"wrote {args.out} and {report_path}")
    return 1 if report.bad_rows and args.fail_on_bad else 0


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    from .index import CaptionIndex

    index = CaptionIndex.load(args.index)
    info = {"path": args.index, "texts": len(index), "dim": index.dim, "embedder": index.embedder_spec,
            "images": sum(1 for i in (index.images or []) if i), "params": dataclasses.asdict(index.params)}
    print(json.dumps(info, indent=2))
    return 0


def _tune(index: Any, args: argparse.Namespace) -> None:
    """Search-time knobs given on the command line (nprobe, ef_search)."""
    index.set_search(nprobe=getattr(args, "nprobe", None) or None, ef_search=getattr(args, "ef_search", None) or None)


def add_index_command(sub: Any) -> None:
    top = sub.add_parser("index", help="caption retrieval index (faiss): build, query, annotate, info")
    isub = top.add_subparsers(dest="index_command", metavar="SUBCOMMAND")

    b = isub.add_parser("build", help="embed a caption corpus and build a faiss index")
    b.add_argument("--data", required=True, help="captions: .json/.jsonl records, LLaVA-format JSON, a .txt file (one a line) "
                   "or a folder written by datasets' save_to_disk")
    b.add_argument("--embedder", required=True, help="clip:PATH (image-to-caption), st:PATH or minilm (text-to-text)")
    b.add_argument("--out", required=True, help="index folder to write (atomically)")
    b.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw", "ivfpq"], help="exact (flat) or approximate")
    b.add_argument("--text-field", help="record field holding the text (default: caption, image_caption, text, "
                   "sentence, or LLaVA's first gpt turn)")
    b.add_argument("--image-field", default="image", help="record field naming the described image (for the leak guard)")
    b.add_argument("--split", help="dataset split, for a saved DatasetDict")
    b.add_argument("--keep-duplicates", action="store_true", help="index repeated texts once per occurrence")
    b.add_argument("--nlist", type=int, help="IVF cells (default ~4*sqrt(n))")
    b.add_argument("--pq-m", type=int, help="PQ sub-quantisers (a divisor of the vector size)")
    b.add_argument("--pq-bits", type=int, help="bits per PQ code (default 8)")
    b.add_argument("--refine", action="store_true", help="ivfpq: re-rank with exact vectors")
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    b.add_argument("--ef-construction", type=int, default=80)
    b.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    b.set_defaults(func=cmd_build)

    q = isub.add_parser("query", help="search an index with texts or images")
    q.add_argument("index", help="index folder")
    q.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    q.add_argument("--image", action="append", default=[], help="an image file query (repeatable; needs a CLIP index)")
    q.add_argument("-k", type=int, default=5, help="results per query")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_query)

    a = isub.add_parser("annotate", help="add retrieved captions to LLaVA-format training JSON")
    a.add_argument("index", help="index folder (built with a clip: embedder)")
    a.add_argument("--data", required=True, help="LLaVA-format .json (or .jsonl) training records")
    a.add_argument("--image-folder", help="folder the records' image paths are relative to (default: the data file's)")
    a.add_argument("--out", required=True, help="annotated output file (written atomically; never the input)")
    a.add_argument("-k", type=int, default=1, help="texts per image (retrieved_caption is the first; k>1 also writes retrieved_captions)")
    a.add_argument("--near-duplicate", type=float, default=0.9,
                   help="exclude texts whose cosine with the sample's own caption reaches this (>1 switches it off)")
    a.add_argument("--caption-key", help="record field with the sample's own caption (default: image_caption, caption)")
    a.add_argument("--report", help="JSON report of bad rows and counts (default: OUT.report.json)")
    a.add_argument("--strict", action="store_true", help="fail, writing nothing, when any image is missing or unreadable")
    a.add_argument("--fail-on-bad", action="store_true", help="write the output but exit 1 when rows were bad")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its report)")
    a.set_defaults(func=cmd_annotate)

    i = isub.add_parser("info", help="show an index's size, kind, embedder and parameters")
    i.add_argument("index", help="index folder")
    i.set_defaults(func=cmd_info)

    for p in (b, q, a):
        p.add_argument("--device", default="cpu", help="embedder device")
        p.add_argument("--gpu", default="auto", choices=["auto", "never", "always"], help="faiss on GPU (faiss-gpu)")
    for p in (q, a):
        p.add_argument("--embedder", help="embedder spec (default: the one the index was built with)")
        p.add_argument("--force-embedder", action="store_true",
                       help="use --embedder although the index was built with another one (only if it is the same model)")
        p.add_argument("--nprobe", type=int, help="IVF cells searched")
        p.add_argument("--ef-search", type=int, help="HNSW candidates searched")
    b.add_argument("--nprobe", type=int, help="IVF cells searched (stored as the index default)")
    b.add_argument("--ef-search", type=int, default=64, help="HNSW candidates searched (stored as the index default)")
    for p in (b, a):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--batch-size", type=int, default=256)
