"""ShieldGemma 2 as an input-side image check, on a tiny random
``ShieldGemma2ForImageClassification`` with its own processor class (a Gemma 3 image
processor and a word-level tokenizer with Gemma 3's image tokens), saved to a folder
and loaded as a user's model would be."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ShieldGemma2ForImageClassification"):
    pytest.skip("ShieldGemma 2 needs transformers >= 4.50", allow_module_level=True)

from lvlm_safety_plugins.evaluation import BenchmarkSpec, evaluate, load_benchmark  # noqa: E402
from lvlm_safety_plugins.evaluation.generate import GenerationSettings  # noqa: E402
from lvlm_safety_plugins.evaluation.image_check import ShieldGemma2Check, check_images  # noqa: E402
from lvlm_safety_plugins.evaluation.judges import JudgeError  # noqa: E402
from lvlm_safety_plugins.loading import open_image  # noqa: E402
from lvlm_safety_plugins.testing import TINY_WORDS  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<start_of_turn> {{ m['role'] }} {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "<end_of_turn> {% endfor %}<start_of_turn> model")


@pytest.fixture(scope="module")
def tiny_shieldgemma2(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Gemma3TextConfig, PreTrainedTokenizerFast, ShieldGemma2Config, ShieldGemma2ForImageClassification,
                              ShieldGemma2Processor, SiglipVisionConfig)
    try:  # transformers 5: the PIL image processor has its own class
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    except ImportError:  # transformers 4.5x
        from transformers import Gemma3ImageProcessor as Gemma3ImageProcessorPil

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "Yes", "No",
             "<start_of_turn>", "<end_of_turn>", "user", "model", *TINY_WORDS, "Dangerous", "Content:", "The", "image", "shall"]
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", extra_special_tokens={
                                      "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    processor = ShieldGemma2Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tok,
                                      chat_template=CHAT_TEMPLATE, image_seq_length=4)
    text = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, sliding_window=512)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                                patch_size=14)
    cfg = ShieldGemma2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                             boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                             image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=True)
    cfg.yes_token_index, cfg.no_token_index = vocab["Yes"], vocab["No"]
    torch.manual_seed(0)
    model = ShieldGemma2ForImageClassification(cfg).eval()
    with torch.no_grad():  # the projector starts at zero: make the image matter
        for name, p in model.named_parameters():
            if "multi_modal_projector" in name:
                torch.nn.init.normal_(p, std=0.5)
    folder = tmp_path_factory.mktemp("shieldgemma2")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_shieldgemma2_scores_are_the_models_yes_probability_per_policy(tiny_shieldgemma2, tmp_path):
    from transformers import AutoProcessor, ShieldGemma2ForImageClassification

    from test_eval import write_vlguard

    file = write_vlguard(tmp_path / "VLGuard")
    check = ShieldGemma2Check(model=str(tiny_shieldgemma2), policies="dangerous,violence")
    images = [open_image(file.parent / "test" / p, "t") for p in ("bad_ads/a.png", "privacy/b.png")]
    got = check.scores(images)
    # against the classifier's own forward on the processor's inputs, one image and policy
    # at a time (the loaded model: transformers 4.57 re-initialises a reloaded tiny
    # checkpoint's lm_head, so a second load would be another model there)
    processor, model = check._processor, check._model
    assert isinstance(processor, AutoProcessor.from_pretrained(tiny_shieldgemma2).__class__)
    assert isinstance(model, ShieldGemma2ForImageClassification)
    for image, scores in zip(images, got):
        for policy in ("dangerous", "violence"):
            inputs = processor(images=[image], policies=[policy], return_tensors="pt")
            with torch.no_grad():
                want = float(model(**inputs).probabilities[0, 0])
            assert scores[policy] == pytest.approx(want, abs=1e-5)
    assert got[0] != got[1]  # the image matters

    # the harness: per benchmark and policy, the share of images at or above the threshold
    threshold = sorted(s["dangerous"] for s in got)[1]  # exactly one image reaches it
    check.threshold = threshold  # the same loaded classifier (see above)
    results = evaluate(None, None, [BenchmarkSpec("vlguard", str(file))], out=tmp_path / "out", generator=_Echo(),
                       settings=GenerationSettings(max_new_tokens=1), progress=False, plot=False, image_check=check)
    summary = results["image_check"]["per_benchmark"]["vlguard"]
    assert summary["images"] == 2 and summary["policies"]["dangerous"]["k"] == 1
    flagged = sum(max(s.values()) >= threshold for s in got)  # any policy
    assert summary["any"]["k"] == flagged and results["image_check"]["flagged_total"] == flagged
    assert "## Image check: shieldgemma2" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["image_check"]["threshold"] == threshold
    # check_images on its own: one score per distinct image
    examples = {"vlguard": load_benchmark(BenchmarkSpec("vlguard", str(file)))}
    assert check_images(check, examples)["per_benchmark"]["vlguard"]["images"] == 2


def test_shieldgemma2_option_errors(tiny_shieldgemma2, tmp_path):
    with pytest.raises(JudgeError, match=r"unknown policies weapons \(the processor's: dangerous, sexual, violence\)"):
        ShieldGemma2Check(model=str(tiny_shieldgemma2), policies="weapons").scores([])
    with pytest.raises(JudgeError, match="model=PATH"):
        ShieldGemma2Check()
    with pytest.raises(JudgeError, match="threshold must lie in"):
        ShieldGemma2Check(model=str(tiny_shieldgemma2), threshold="2")


class _Echo:
    """A generator that answers every prompt with a fixed text (the image check does
    not depend on the answers)."""

    model_id = "echo"

    def generate(self, examples):
        return ["I cannot help with that." for _ in examples]

    def prompt_text(self, example):
        return example.prompt

    def describe(self):
        return {"name": "echo"}
