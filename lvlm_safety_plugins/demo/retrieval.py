"""The demo's retrieved text, made as a user makes it for LLaVA's data: an image-text
embedder (a tiny CLIP, trained contrastively on the world's caption corpus, saved as an
HF ``CLIPModel`` folder so the library's ``clip:PATH`` embedder loads it), then
``lvlm-safety index build`` over the caption corpus (stage 1's captions, each naming its
image) and ``lvlm-safety index annotate`` of the stage 2 rows (faiss; the leak guard
drops the row's own caption) through the same functions those commands call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .world import World

#: contrastive steps of the tiny CLIP, and its learning rate
CLIP_STEPS = 150
CLIP_LR = 3e-3
#: ``index annotate --near-duplicate``: texts this close to the row's own caption are
#: excluded too (besides the own image's captions and exact copies)
NEAR_DUPLICATE = 0.98


def save_world_clip(world: World, folder: Path, seed: int, steps: int = CLIP_STEPS) -> str:
    """Train a tiny dual-tower CLIP on the align split's (image, caption) pairs of the
    seen concepts and save it (model, word-level tokenizer, image processor) to
    ``folder``; returns the ``clip:`` spec."""
    from transformers import CLIPConfig, CLIPModel

    from ..compat import clip_image_processor_class
    from ..testing import tiny_tokenizer

    tok = tiny_tokenizer(world.words(), wrap=True)
    size = world.config.image_size
    processor = clip_image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": size, "patch_size": 14},
        projection_dim=32,
    )
    model = CLIPModel(cfg)
    rows = world.caption_rows()
    pixels = processor(images=[r["image"] for r in rows], return_tensors="pt")["pixel_values"]
    enc = tok([r["response"] for r in rows], padding=True, return_tensors="pt")
    concept = torch.tensor([world.concepts.index(r["concept"]) for r in rows])
    same = (concept[:, None] == concept[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # every caption of the image's concept is a positive
    opt = torch.optim.AdamW(model.parameters(), lr=CLIP_LR, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
        logits = out.logits_per_image
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return f"clip:{folder}"


def retrieved_texts(world: World, rows: Sequence[dict[str, Any]], workdir: Path, seed: int) -> dict[str, Any]:
    """``{"texts": {row id: retrieved caption}, "report": annotate's counts}`` for the
    stage 2 ``rows``: the world's caption corpus and the rows are written as a user's
    LLaVA-format files (images as PNG), the index is built and the rows annotated with
    the library's own ``index build`` / ``index annotate`` functions."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # saving and loading the tiny CLIP: the demo's bar shows the stage
    try:
        return _retrieved_texts(world, rows, workdir, seed)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _retrieved_texts(world: World, rows: Sequence[dict[str, Any]], workdir: Path, seed: int) -> dict[str, Any]:
    from ..retrieval import CaptionIndex, IndexParams, annotate, load_embedder, read_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    corpus = []
    for r in world.caption_rows():
        r["image"].save(images / r["image_file"])
        corpus.append({"id": r["image_file"], "image": r["image_file"],
                       "conversations": [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": r["response"]}]})
    (workdir / "captions.json").write_text(json.dumps(corpus))
    records = [{"id": r["id"], "image": r["image_file"], "image_caption": r["image_caption"],
                "conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": r["response"]}]}
               for r in rows if r.get("image_file")]
    (workdir / "finetune.json").write_text(json.dumps(records))
    spec = save_world_clip(world, workdir / "clip", seed)
    # lvlm-safety index build --data captions.json --embedder clip:DIR --out index
    texts = read_corpus(workdir / "captions.json")
    index = CaptionIndex.build(texts.texts, load_embedder(spec), IndexParams(kind="flat"), images=texts.images,
                               progress=False)
    index.save(workdir / "index", overwrite=True)
    # lvlm-safety index annotate index --data finetune.json --image-folder images --out annotated.json
    report = annotate(workdir / "finetune.json", CaptionIndex.load(workdir / "index"), workdir / "annotated.json",
                      image_folder=images, near_duplicate=NEAR_DUPLICATE, progress=False, strict=True)
    annotated = json.loads((workdir / "annotated.json").read_text())
    return {"texts": {r["id"]: r["retrieved_caption"] for r in annotated if r.get("retrieved_caption")},
            "report": {k: v for k, v in report.to_dict().items() if k not in ("bad_rows", "unmatched", "output")}}
