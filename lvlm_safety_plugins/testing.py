"""Tiny models, processors and batches for tests: plugin authors' fixtures.

Everything is built from configs with random weights, offline, in well under a second.
Registered as a pytest plugin through the ``pytest11`` entry point, so these fixtures
are available in any project that installs lvlm-safety-plugins:

``tiny_llava``            a tiny HF ``LlavaForConditionalGeneration`` (eval mode, fp32)
``tiny_llava_processor``  a matching ``LlavaProcessor`` (word-level tokenizer)
``tiny_llava_batch_fixture``     a left-padded batch of two prompts with one image each
``tiny_llava_sft_batch_fixture`` a right-padded training batch with labels (loss plugins)

Works with transformers 4.37.x and 5.x.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: words known to the tiny tokenizer (besides the special tokens)
TINY_WORDS: tuple[str, ...] = tuple(
    "USER: ASSISTANT: what is in the image ? describe this picture please tell me how to make a "
    "bomb cake poison soup weapon flower steal bike hack computer sorry I cannot help with that "
    "sure here is it . , a an of and or Retrieved Text: red blue green dog cat".split()
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_SIZE = 28
PATCH_SIZE = 14


def tiny_tokenizer(words: Sequence[str] = TINY_WORDS, wrap: bool = False) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (``<pad>``=0, ``<image>``=4); with
    ``wrap``, every text is encoded as ``<s> ... </s>`` (as CLIP's text tower expects)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .compat import llava_processor_needs_llama_tokenizer

    cls = PreTrainedTokenizerFast
    if llava_processor_needs_llama_tokenizer() and not wrap:
        from transformers import LlamaTokenizerFast as cls  # type: ignore[no-redef]

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if wrap:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    fast = cls(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def tiny_llava_config(vocab_size: int = 64, num_layers: int = 4, hidden_size: int = 32) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # no padding_idx: transformers 4.37's Llava finds image slots by all-zero
        # embeddings, which a zeroed pad embedding would confuse
        pad_token_id=None,
        bos_token_id=2,
        eos_token_id=3,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    cfg.pad_token_id = 0
    return cfg


def build_tiny_llava(seed: int = 0, **config_kwargs: Any) -> Any:
    """A tiny random ``LlavaForConditionalGeneration`` in eval mode (fp32, CPU)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs))
    return model.eval()


def tiny_image_processor() -> Any:
    from .compat import clip_image_processor_class

    return clip_image_processor_class()(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def build_tiny_llava_processor() -> Any:
    """A ``LlavaProcessor`` matching :func:`build_tiny_llava` (4.37 and 5.x)."""
    from transformers import LlavaProcessor

    from .compat import llava_processor_kwargs

    kwargs = llava_processor_kwargs(patch_size=PATCH_SIZE, strategy="default", additional_tokens=1)
    return LlavaProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer(), **kwargs)


def processor_expands_image_tokens(processor: Any) -> bool:
    """True if the processor writes one ``<image>`` per image feature (5.x style)."""
    ids = processor(text=["<image> what"], images=[make_image(0)], return_tensors="pt")["input_ids"]
    return int((ids == SPECIAL_TOKENS.index("<image>")).sum()) > 1


def make_image(seed: int, size: int = IMAGE_SIZE, color: tuple[int, int, int] | None = None) -> Any:
    """A deterministic RGB ``PIL.Image`` (random pixels from ``seed``, or one colour)."""
    import numpy as np
    from PIL import Image

    if color is not None:
        return Image.new("RGB", (size, size), color)
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def tiny_sft_rows(n: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` supervised rows ``{"id", "image", "prompt", "response"}`` for
    :class:`~lvlm_safety_plugins.integrations.hf_training.LlavaSFTCollator`."""
    words = ("dog", "cat", "flower", "cake")
    return [{"id": i, "image": make_image(seed + i), "prompt": "USER: <image> describe this picture ASSISTANT:",
             "response": f"a picture of a {words[(seed + i) % len(words)]}"} for i in range(n)]


def tiny_llava_sft_batch(processor: Any, n: int = 2, seed: int = 0) -> dict[str, "torch.Tensor"]:
    """A right-padded training batch with ``labels`` (the loss on the responses only),
    as the HF training integration's collator builds it."""
    from .integrations.hf_training import LlavaSFTCollator

    return LlavaSFTCollator(processor)(tiny_sft_rows(n, seed))


def tiny_llava_batch(processor: Any, prompts: Sequence[str] | None = None, seed: int = 0) -> dict[str, "torch.Tensor"]:
    """A left-padded batch, one image per prompt, through the real processor."""
    prompts = list(prompts or ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:"])
    images = [make_image(seed + i) for i in range(len(prompts))]
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))


def save_tiny_clip_vision_tower(path: str | os.PathLike[str] | None = None, seed: int = 0) -> str:
    """Save a tiny random CLIP vision tower (model + image processor) to a folder, for
    frameworks such as LLaVA that load their vision tower from a path. Returns it."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="tiny-clip-")
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16,
    )
    CLIPVisionModel(cfg).save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    return folder


def save_tiny_llama_lm(path: str | os.PathLike[str], words: Sequence[str], *, seed: int = 0, max_positions: int = 512,
                       chat_template: str | None = None) -> str:
    """Save a tiny random ``LlamaForCausalLM`` (the class of Llama Guard 3 and
    Llama-3-8B-Instruct) with a word-level tokenizer over ``words`` (and
    ``chat_template``, given) to ``path``, as a local judge model is saved. Returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = os.fspath(path)
    tok = tiny_tokenizer(tuple(words))
    if chat_template is not None:
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_clip_model(path: str | os.PathLike[str] | None = None, seed: int = 0, projection_dim: int = 16) -> str:
    """Save a tiny random dual-tower ``CLIPModel`` with a word-level tokenizer and an
    image processor to a folder (the ``clip:PATH`` retrieval embedder loads it). Returns
    the folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="tiny-clip-model-")
    tokenizer = tiny_tokenizer(wrap=True)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
        },
        projection_dim=projection_dim,
    )
    CLIPModel(cfg).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    return folder


def build_tiny_llava_package_model(vision_tower: str | os.PathLike[str] | None = None, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random ``llava.model.LlavaLlamaForCausalLM`` from the LLaVA framework (needs
    ``llava-torch``), its vision tower saved to a folder first and loaded from there."""
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    tower = os.fspath(vision_tower) if vision_tower is not None else save_tiny_clip_vision_tower()
    settings: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        mm_vision_tower=tower, mm_hidden_size=16, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-1, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        tokenizer_padding_side="right", pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(LlavaConfig(**settings))
    model.get_vision_tower().load_model()
    return model.eval()


def train_tiny_sentencepiece(folder: str | os.PathLike[str], extra_text: Sequence[str] = ()) -> str:
    """Train a tiny sentencepiece model (as a Llama tokenizer uses) on a generated
    corpus and save a slow ``LlamaTokenizer`` in ``folder``; returns the folder.

    LLaVA's training script loads its tokenizer with ``use_fast=False`` and its
    conversation preprocessing assumes Llama's sentencepiece behaviour, so a real
    sentencepiece model is needed (needs the ``sentencepiece`` package)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    lines = [" ".join(TINY_WORDS), *extra_text]
    lines += [
        "A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER: what is in the image? ASSISTANT: a picture of a red flower.",
        "Retrieved Text: a blue dog on a bike. Describe this picture please.",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_writer=model, vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2,
    )
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as fh:
        fh.write(model.getvalue())
    LlamaTokenizer(vocab_file=path, legacy=True).save_pretrained(folder)
    return folder


def write_llava_training_assets(folder: str | os.PathLike[str], n_records: int = 4, seed: int = 0) -> dict[str, str]:
    """Everything a real ``llava.train.train.train()`` run needs, offline: a tiny Llama
    checkpoint with a sentencepiece tokenizer, a tiny CLIP vision tower, images, and a
    LLaVA-format JSON (with ``image_caption`` and ``retrieved_caption`` fields)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    root = os.fspath(folder)
    llm = os.path.join(root, "llm")
    train_tiny_sentencepiece(llm)
    tok = LlamaTokenizer.from_pretrained(llm)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(llm, safe_serialization=True)
    tower = save_tiny_clip_vision_tower(os.path.join(root, "clip"), seed=seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    words = ["flower", "cake", "dog", "cat", "bike", "soup"]
    records = []
    for i in range(n_records):
        make_image(seed + i).save(os.path.join(images, f"{i}.png"))
        w, other = words[i % len(words)], words[(i + 1) % len(words)]
        records.append({
            "id": f"rec{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe this picture please."},
                {"from": "gpt", "value": f"a picture of a red {w}."},
            ],
            "image_caption": f"a picture of a red {w}",
            "retrieved_caption": f"a blue {other} on a bike",
        })
    data = os.path.join(root, "data.json")
    with open(data, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1)
    return {"model": llm, "vision_tower": tower, "image_folder": images, "data": data}


def decoder_input(model: Any, **batch: Any) -> "torch.Tensor":
    """The hidden states entering the first decoder layer during ``model(**batch)``:
    what the LLM actually sees (image features spliced in), for checking positions."""
    import torch

    from .adapters import get_adapter

    seen: dict[str, Any] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = get_adapter(model).decoder_layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------------------
# pytest fixtures (pytest11 entry point); pytest is only imported when it is running
# ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional at run time
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def tiny_llava() -> Any:
        return build_tiny_llava()

    @pytest.fixture(scope="session")
    def tiny_llava_processor() -> Any:
        return build_tiny_llava_processor()

    @pytest.fixture
    def tiny_llava_batch_fixture(tiny_llava_processor: Any) -> dict[str, Any]:
        return tiny_llava_batch(tiny_llava_processor)

    @pytest.fixture
    def tiny_llava_sft_batch_fixture(tiny_llava_processor: Any) -> dict[str, Any]:
        return tiny_llava_sft_batch(tiny_llava_processor)


__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "TINY_WORDS",
    "build_tiny_llava",
    "build_tiny_llava_package_model",
    "build_tiny_llava_processor",
    "decoder_input",
    "make_image",
    "processor_expands_image_tokens",
    "save_tiny_clip_model",
    "save_tiny_clip_vision_tower",
    "save_tiny_llama_lm",
    "tiny_image_processor",
    "tiny_llava_batch",
    "tiny_llava_config",
    "tiny_llava_sft_batch",
    "tiny_sft_rows",
    "tiny_tokenizer",
    "train_tiny_sentencepiece",
    "write_llava_training_assets",
]
