"""``lvlm-safety analyze``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, write_report
    from .fileio import check_output_folder
    from .loading import load_model_and_processor, open_image, read_records
    from .prompts import PromptFormat, check_template

    check_template(args.template)
    # before the model is loaded: the one --overwrite rule, never an input
    check_output_folder(args.out, ("analysis.json", "analysis.png"), overwrite=args.overwrite,
                        inputs=[args.harmful, args.pairs])
    model, processor = load_model_and_processor(args.model, args.device)
    fmt = PromptFormat(processor, args.template)  # the format every command uses (docs: prompts)
    print(f"prompt format: {fmt.name}")
    harmful = [fmt(r["prompt"], image=False) for r in read_records(args.harmful, ("prompt",))]
    image_prompt = args.image_prompt if args.image_prompt is not None else fmt("", image=True)
    pairs = []
    if args.pairs:
        folder = Path(args.image_folder) if args.image_folder else Path(args.pairs).parent
        for i, row in enumerate(read_records(args.pairs, ("image", "caption"))):
            where = f"{args.pairs}: row {i} (id {row.get('id', i)!r})"
            pairs.append({
                "image": open_image(folder / row["image"], where),
                "caption": row["caption"],
                "prompt": row.get("prompt") or image_prompt,
            })
    words = [w.strip() for w in args.refusal_words.split(",") if w.strip()] if args.refusal_words else None
    kwargs: dict[str, Any] = {"batch_size": args.batch_size}
    if words:
        kwargs["refusal_words"] = words
    result = analyze(model, processor, harmful, pairs, **kwargs)
    written = write_report(result, args.out)
    print(f"{'layer':>5}  {'refusal p':>10}  {'cos(img,cap)':>12}")
    for layer, p in enumerate(result.refusal_prob):
        value = result.image_caption_cos[layer] if result.image_caption_cos else None
        cos = f"{value:12.4f}" if value is not None else f"{'-':>12}"  # '-': not measured (see the notes)
        mark = "  <- safety layer" if layer in result.safety_layers else ""
        print(f"{layer:>5}  {p:10.4f}  {cos}{mark}")
    print(f"safety layers: {result.safety_layers}")
    for note in result.notes:
        print(f"note: {note}")
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


def add_analyze_command(sub: Any) -> None:
    p = sub.add_parser("analyze", help="locate the safety layers (logit lens) and image-caption similarity per layer")
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--harmful", required=True, help="harmful text prompts: .txt (one a line), .jsonl or .json with 'prompt'")
    p.add_argument("--pairs", help="image-caption pairs: .jsonl/.json with 'image' (path) and 'caption'")
    p.add_argument("--image-folder", help="folder image paths are relative to (default: the pairs file's folder)")
    p.add_argument("--template", help="prompt template with {prompt} for the harmful prompts (default: as every command, "
                                      "the processor's chat template, else LLaVA-1.5's 'USER: <image>\\n{prompt} ASSISTANT:' "
                                      "without the image; the command prints which)")
    p.add_argument("--image-prompt", help="prompt carrying the image for the pairs (default: the same format with an "
                                          "empty text)")
    p.add_argument("--refusal-words", help="comma-separated words that open a refusal, measured through their first "
                   "token (default: sorry, Sorry, cannot, unable, apologize, Unfortunately)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder for analysis.json and analysis.png")
    p.add_argument("--overwrite", action="store_true", help="replace analysis.json and analysis.png in --out")
    p.set_defaults(func=cmd_analyze)
