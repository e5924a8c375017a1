"""Safety-layer analysis: where does the LLM's safety mechanism switch on, and how far
are image tokens from their captions there?

Per decoder layer:

- **refusal probability (logit lens)**: on harmful *text* prompts, the hidden state of
  the last prompt token at layer l is put through the final norm and the LM head; the
  probability mass on refusal tokens (first tokens of configurable words such as
  "sorry", "cannot", found through the tokenizer, never hard-coded ids) is averaged
  over prompts. The layers where it rises are where the text safety mechanism acts.
- **image-caption similarity**: cosine similarity between the mean hidden state of an
  image's tokens and the mean hidden state of its caption in a text-only pass. Layers
  whose image states the adapter refuses (Qwen3-VL's deepstack layers, where visual
  features are added after the layer's output) are ``None`` (``null`` in
  ``analysis.json``), with a note naming them and why.

``safety_layers`` (the input of ``tga: {layers: auto}``): from the first layer whose
refusal probability reaches half of its peak, through the peak layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .adapters import get_adapter
from .capture import HiddenCapture
from .errors import DataError, LayerError
from .fileio import atomic_write_text, save_figure
from .progress import progress_bar

#: Words that open or mark a refusal, and whose FIRST token does too (it is the first token
#: that the logit lens measures): "I'm sorry" / "Sorry, ..." / "I cannot" / "I am unable" /
#: "I apologize" / "Unfortunately, ...". On Mistral-7B's tokenizer each of these is one
#: whole-word token, except "apologize", whose first piece "apolog" is still its own.
#: Left out on purpose: "I'm" (first token "I", which opens most answers), "not" (in most
#: non-refusals), "can't" and "won't" (first tokens "can", "won": "I can help ..."), and
#: "Cannot", "Unable", "Apologies" (first pieces "C", "Un", "Ap"). docs/tga.md has the table.
DEFAULT_REFUSAL_WORDS = ("sorry", "Sorry", "cannot", "unable", "apologize", "Unfortunately")


@dataclass
class SafetyAnalysis:
    """The result of :func:`analyze`; ``to_json`` is what ``layers: auto`` reads."""

    model_class: str
    num_layers: int
    refusal_words: list[str]
    refusal_token_ids: list[int]
    refusal_prob: list[float]
    image_caption_cos: list[float | None] | None
    safety_layers: list[int]
    n_harmful: int
    n_pairs: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _word_tokens(tokenizer: Any, word: str) -> list[tuple[int, str]]:
    """For each way ``word`` starts a response (as is, after a space): its first token
    that carries a character of the word (a bare word-boundary piece such as
    sentencepiece's "▁" before it is passed over), as ``(id, text)``."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for variant in (word, " " + word):
        for tid in tokenizer(variant, add_special_tokens=False)["input_ids"]:
            text = tokenizer.decode([tid]).strip()
            if text:
                if tid != unk:
                    out.append((int(tid), text))
                break
    return out


def refusal_token_ids(tokenizer: Any, words: Iterable[str] = DEFAULT_REFUSAL_WORDS) -> list[int]:
    """The first token of each refusal word, as it starts a response (with and without
    a leading space), de-duplicated; unknown-token ids and bare word-boundary pieces
    (sentencepiece's "▁", which " sorry" starts with on tokenizers such as Mistral-7B's,
    and which is no refusal) are dropped."""
    found: list[int] = []
    for word in words:
        for tid, _ in _word_tokens(tokenizer, word):
            if tid not in found:
                found.append(tid)
    return found


def partial_refusal_words(tokenizer: Any, words: Iterable[str]) -> list[str]:
    """Notes on the words whose first token is only a piece of the word (what the logit
    lens measures for them), e.g. "can't" -> "can", which also opens "I can help"."""
    notes = []
    for word in words:
        pieces = sorted({text for _, text in _word_tokens(tokenizer, word) if text != word.strip()})
        if pieces:
            shown = ", ".join(repr(p) for p in pieces)
            notes.append(f"refusal word {word!r} is measured through its first token {shown} (the logit lens sees a "
                         "word's first token only): check that this piece opens no answer that is not a refusal")
    return notes


def locate_safety_layers(refusal_prob: Sequence[float]) -> list[int]:
    """From the first layer reaching half of the peak refusal probability through the
    peak layer (all layers when the curve is flat at zero)."""
    if not refusal_prob:
        return []
    peak = max(range(len(refusal_prob)), key=lambda i: refusal_prob[i])
    top = refusal_prob[peak]
    if top <= 0:
        return list(range(len(refusal_prob)))
    start = next(i for i, p in enumerate(refusal_prob) if p >= 0.5 * top)
    return list(range(start, peak + 1))


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def logit_lens_refusal(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """Mean probability of ``token_ids`` at the last prompt token, per layer."""
    adapter = get_adapter(model)
    head, norm = adapter.lm_head, adapter.final_norm
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    totals = torch.zeros(adapter.num_layers, dtype=torch.float64)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for chunk in progress_bar(list(_batches(prompts, batch_size)), desc="logit lens", enabled=progress):
            enc = tokenizer(list(chunk), padding=True, return_tensors="pt")
            device = next(model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            with HiddenCapture(adapter, None, {"last": enc["attention_mask"].bool()}, "last", detach=True) as cap:
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            states = cap.stacked("last")  # [L, B, H]
            probs = torch.softmax(head(norm(states)).float(), dim=-1)[..., ids.to(states.device)].sum(-1)  # [L, B]
            totals += probs.sum(dim=1).double().cpu()
    finally:
        tokenizer.padding_side = side
    return (totals / max(1, len(prompts))).tolist()


def unmeasured_image_layers(adapter: Any) -> tuple[list[int], str | None]:
    """The layers whose image states ``adapter`` refuses (its ``check_image_state_layers``,
    as :class:`~lvlm_safety_plugins.capture.ForwardCapture` does; Qwen3-VL's deepstack
    layers) and the adapter's reason, or ``([], None)``."""
    check = adapter.check_image_state_layers
    refused = []
    for layer in range(adapter.num_layers):
        try:
            check([layer])
        except LayerError:
            refused.append(layer)
    if not refused:
        return [], None
    try:
        check(refused)
    except LayerError as exc:
        return refused, str(exc)
    return refused, None  # pragma: no cover - a check that refuses layers one by one only


@torch.no_grad()
def image_caption_similarity(
    model: torch.nn.Module,
    processor: Any,
    pairs: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[float | None]:
    """Mean cosine similarity per layer between an image's tokens and its caption;
    ``None`` at the layers whose image states the adapter refuses
    (:func:`unmeasured_image_layers`: Qwen3-VL's deepstack layers).

    ``pairs``: dicts with ``image`` (PIL image), ``caption`` and ``prompt`` (the text
    that carries the image placeholder, e.g. ``"USER: <image> ASSISTANT:"``).
    """
    adapter = get_adapter(model)
    tok = processor.tokenizer
    totals = torch.zeros(adapter.num_layers, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for chunk in progress_bar(list(_batches(pairs, batch_size)), desc="image-caption similarity", enabled=progress):
        batch = processor(text=[p["prompt"] for p in chunk], images=[p["image"] for p in chunk], return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        with HiddenCapture(adapter, None, {"img": adapter.layout(batch).image_mask}, detach=True) as img:
            model(**batch)
        caps = tok([p["caption"] for p in chunk], return_tensors="pt", padding=True)
        caps = {k: v.to(device) for k, v in caps.items()}
        with HiddenCapture(adapter, None, {"cap": caps["attention_mask"].bool()}, detach=True) as cap:
            model(**caps)
        cos = torch.nn.functional.cosine_similarity(img.stacked("img").float(), cap.stacked("cap").float(), dim=-1)
        totals += cos.sum(dim=1).double().cpu()
        count += len(chunk)
    refused, _ = unmeasured_image_layers(adapter)
    return [None if layer in refused else value for layer, value in enumerate((totals / max(1, count)).tolist())]


def analyze(
    model: torch.nn.Module,
    processor: Any,
    harmful_prompts: Sequence[str],
    pairs: Sequence[dict[str, Any]] = (),
    *,
    refusal_words: Sequence[str] = DEFAULT_REFUSAL_WORDS,
    batch_size: int = 8,
    progress: bool = True,
) -> SafetyAnalysis:
    """Run both measurements and locate the safety layers."""
    if not harmful_prompts:
        raise DataError("analyze needs at least one harmful text prompt")
    tok = getattr(processor, "tokenizer", processor)
    ids = refusal_token_ids(tok, refusal_words)
    notes = partial_refusal_words(tok, refusal_words)
    if not ids:
        raise DataError(f"none of the refusal words {list(refusal_words)} is a known token of this tokenizer")
    was_training = model.training
    model.eval()
    try:
        refusal = logit_lens_refusal(model, tok, harmful_prompts, ids, batch_size=batch_size, progress=progress)
        cos = image_caption_similarity(model, processor, pairs, batch_size=batch_size, progress=progress) if pairs else None
    finally:
        model.train(was_training)
    if not pairs:
        notes.append("no image-caption pairs given: image_caption_cos not measured")
    adapter = get_adapter(model)
    refused, reason = unmeasured_image_layers(adapter)
    if cos is not None and refused:
        notes.append(f"image_caption_cos is null at layers {refused}: {reason}")
    return SafetyAnalysis(
        model_class=type(model).__name__,
        num_layers=adapter.num_layers,
        refusal_words=list(refusal_words),
        refusal_token_ids=ids,
        refusal_prob=refusal,
        image_caption_cos=cos,
        safety_layers=locate_safety_layers(refusal),
        n_harmful=len(harmful_prompts),
        n_pairs=len(pairs),
        notes=notes,
    )


def draw_analysis(result: SafetyAnalysis) -> Any:
    """The figure of ``analysis.png``: the refusal probability per layer (and the
    image-caption cosine on a second axis), with one legend below the axes, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(result.num_layers))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.plot(layers, result.refusal_prob, marker="o", label="refusal-token probability (logit lens, harmful text)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("probability")
    if result.safety_layers:
        ax.axvspan(min(result.safety_layers) - 0.5, max(result.safety_layers) + 0.5, alpha=0.15, label="safety layers")
    handles, labels = ax.get_legend_handles_labels()
    if result.image_caption_cos is not None:
        ax2 = ax.twinx()
        cos = [float("nan") if c is None else c for c in result.image_caption_cos]  # unmeasured layers: a gap
        ax2.plot(layers, cos, marker="s", color="tab:orange", label="cos(image tokens, caption)")
        ax2.set_ylabel("cosine similarity")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_title(f"{result.model_class}: where safety acts")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def write_report(result: SafetyAnalysis, out_dir: str | Path) -> dict[str, str]:
    """Write ``analysis.json`` and (with matplotlib) ``analysis.png``; atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "analysis.json")}
    atomic_write_text(out / "analysis.json", result.to_json())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    fig = draw_analysis(result)
    written["png"] = str(save_figure(fig, out / "analysis.png", dpi=120))
    return written


__all__ = [
    "DEFAULT_REFUSAL_WORDS",
    "SafetyAnalysis",
    "analyze",
    "image_caption_similarity",
    "locate_safety_layers",
    "logit_lens_refusal",
    "partial_refusal_words",
    "refusal_token_ids",
    "unmeasured_image_layers",
    "write_report",
]
