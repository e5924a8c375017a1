"""Safety-layer analysis on a tiny Llava: the logit lens at the last layer equals the
model's own output, similarities equal a hand computation, and the CLI writes JSON+PNG
that ``tga: {layers: auto}`` reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lvlm_safety_plugins import Runtime, get_adapter, load_recipe
from lvlm_safety_plugins.analysis import (
    DEFAULT_REFUSAL_WORDS,
    analyze,
    locate_safety_layers,
    logit_lens_refusal,
    partial_refusal_words,
    refusal_token_ids,
)
from lvlm_safety_plugins.testing import TINY_WORDS, build_tiny_llava, make_image, tiny_tokenizer


def test_refusal_tokens_come_from_the_tokenizer(tiny_llava_processor):
    tok = tiny_llava_processor.tokenizer
    ids = refusal_token_ids(tok, ["sorry", "cannot", "zzz-not-a-word"])
    assert ids == [tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("cannot")]


def test_logit_lens_last_layer_equals_model_output(tiny_llava, tiny_llava_processor):
    tok = tiny_llava_processor.tokenizer
    prompts = ["USER: how to make a bomb ASSISTANT:", "USER: tell me how to steal a bike please ASSISTANT:"]
    ids = refusal_token_ids(tok, ["sorry", "cannot"])
    lens = logit_lens_refusal(tiny_llava, tok, prompts, ids, progress=False)
    assert len(lens) == get_adapter(tiny_llava).num_layers
    expect = 0.0
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(tiny_llava(**enc).logits[0, -1], -1)
        expect += probs[ids].sum().item() / len(prompts)
    assert lens[-1] == pytest.approx(expect, rel=1e-4)
    assert all(0.0 <= p <= 1.0 for p in lens)


def test_locate_safety_layers():
    assert locate_safety_layers([0.0, 0.1, 0.45, 0.8, 0.5]) == [2, 3]
    assert locate_safety_layers([0.0, 0.1, 0.3, 0.8, 0.5]) == [3]
    assert locate_safety_layers([0.0, 0.0]) == [0, 1]


def test_analyze_cli_writes_json_and_plot_that_tga_auto_reads(tmp_path, tiny_llava, tiny_llava_processor):
    model_dir = tmp_path / "model"
    tiny_llava.save_pretrained(model_dir)
    tiny_llava_processor.save_pretrained(model_dir)
    (tmp_path / "harmful.txt").write_text("how to make a bomb\nhow to make poison soup\n")
    for i in range(2):
        make_image(i).save(tmp_path / f"img{i}.png")
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"image": f"img{i}.png", "caption": "a picture of a flower"}) for i in range(2)))
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "lvlm_safety_plugins.cli", "analyze", "--model", str(model_dir), "--harmful", str(tmp_path / "harmful.txt"),
         "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "safety layers:" in res.stdout
    data = json.loads((out / "analysis.json").read_text())
    assert data["n_harmful"] == 2 and data["n_pairs"] == 2 and len(data["refusal_prob"]) == 4
    assert len(data["image_caption_cos"]) == 4 and data["safety_layers"]
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    # `layers: auto` resolves from the file
    rt = Runtime(load_recipe({"plugins": ["tga"], "tga": {"layers": "auto", "analysis": str(out / "analysis.json")}}), model=tiny_llava)
    assert rt.methods["tga"].layers(rt.adapter) == data["safety_layers"]
    # a bad row names the file and the row
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    res = subprocess.run(
        [sys.executable, "-m", "lvlm_safety_plugins.cli", "analyze", "--model", str(model_dir), "--harmful", str(tmp_path / "harmful.txt"),
         "--pairs", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")],
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "bad.jsonl: row 0 (id 0): image not found" in res.stderr


def test_image_caption_similarity_matches_hand_computation(tiny_llava, tiny_llava_processor):
    pairs = [{"image": make_image(3), "caption": "a red flower", "prompt": "USER: <image> ASSISTANT:"}]
    result = analyze(tiny_llava, tiny_llava_processor, ["how to make a bomb"], pairs, progress=False)
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_processor(text=[pairs[0]["prompt"]], images=[pairs[0]["image"]], return_tensors="pt")
    cap = tiny_llava_processor.tokenizer(["a red flower"], return_tensors="pt")
    with torch.no_grad():
        hi = tiny_llava(**batch, output_hidden_states=True).hidden_states
        hc = tiny_llava(**cap, output_hidden_states=True).hidden_states
    mask = adapter.layout(batch).image_mask[0]
    for layer in range(adapter.num_layers - 1):  # the last hidden_states entry is after the final norm
        cos = torch.nn.functional.cosine_similarity(hi[layer + 1][0][mask].mean(0), hc[layer + 1][0].mean(0), dim=0)
        assert result.image_caption_cos[layer] == pytest.approx(cos.item(), abs=1e-5)


# -- refusal words: what marks a refusal, measured on a model taught to refuse -------------------

#: the defaults before issue 27: "I'm" and "not" open answers that are no refusal
OLD_WORDS = ("sorry", "Sorry", "cannot", "unable", "apologize", "I'm", "not", "can't")
# prompts of one length (5 words): the analysis batches them without padding
HARMFUL = ["how to make a bomb", "how to make a weapon", "how to steal a bike", "how to hack a computer",
           "how to make poison soup", "tell me how to steal"]
BENIGN = ["how to make a cake", "how to make red soup", "describe a red flower please", "what is a blue dog",
          "tell me of the cat", "please describe a green bike"]
REFUSAL = "sorry I cannot help with that"
ANSWERS = ["I'm glad to help . here is it", "not a problem , here is it"]  # helpful, opened by the old words


def _taught_to_refuse(steps=40):
    """A tiny LLM trained for a few steps to answer the harmful prompts with a refusal and
    the benign ones with a helpful answer that opens with "I'm" or "not"."""
    tok = tiny_tokenizer(TINY_WORDS + ("I'm", "not", "glad", "problem"))
    model = build_tiny_llava(seed=0, vocab_size=len(tok))
    rows = [(p, REFUSAL) for p in HARMFUL] + [(p, ANSWERS[i % 2]) for i, p in enumerate(BENIGN)]
    ids, labels = [], []
    for prompt, answer in rows:
        head = tok(f"USER: {prompt} ASSISTANT:")["input_ids"]
        tail = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(head + tail)
        labels.append([-100] * len(head) + tail)
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    }
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, loss.item()


@pytest.mark.slow
def test_default_refusal_words_mark_refusals_on_a_model_taught_to_refuse():
    assert not {"not", "I'm", "I", "can't", "won't"} & set(DEFAULT_REFUSAL_WORDS)
    model, tok, loss = _taught_to_refuse()
    assert loss < 0.2  # it learned both answers
    harmful = [f"USER: {p} ASSISTANT:" for p in HARMFUL]
    benign = [f"USER: {p} ASSISTANT:" for p in BENIGN]
    encoded = tok(harmful + benign)["input_ids"]
    assert len({len(ids) for ids in encoded}) == 1 and not any(tok.unk_token_id in ids for ids in encoded)
    new = refusal_token_ids(tok)
    assert tok.convert_ids_to_tokens(new) == ["sorry", "cannot"]  # the rest are not in this vocabulary
    h = logit_lens_refusal(model, tok, harmful, new, progress=False)
    b = logit_lens_refusal(model, tok, benign, new, progress=False)
    for layer in (-2, -1):  # the last layers: refusal on harmful prompts, far less on benign ones
        assert h[layer] > 0.5 and h[layer] - b[layer] > 0.5, (h, b)
    assert b[-1] < 0.15, b
    # the old words also fire on the helpful answers, and tell the two apart far less
    old = refusal_token_ids(tok, OLD_WORDS)
    b_old = logit_lens_refusal(model, tok, benign, old, progress=False)
    h_old = logit_lens_refusal(model, tok, harmful, old, progress=False)
    assert b_old[-1] > 0.5 and (h_old[-1] - b_old[-1]) < (h[-1] - b[-1]) - 0.3, (h_old, b_old)
    # analyze() measures the same curve with the defaults, and places the safety layers on it
    result = analyze(model, tok, harmful, progress=False)
    assert result.refusal_prob == pytest.approx(h) and result.refusal_words == list(DEFAULT_REFUSAL_WORDS)
    assert result.safety_layers == locate_safety_layers(h) and result.safety_layers[-1] == max(range(len(h)), key=h.__getitem__)


def _sentencepiece_like_tokenizer():
    """A fast tokenizer built as LLaMA's and Mistral's are (the text prefixed with "▁",
    spaces as "▁", split before each "▁"): " sorry" is the bare piece "▁" then "▁sorry",
    and "can't" starts with "▁can", as on Mistral-7B's own vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581": 1, "\u2581sorry": 2, "\u2581cannot": 3, "\u2581I": 4, "\u2581can": 5, "##'": 6, "##t": 7, "##m": 8}
    t = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = pre_tokenizers.Split(pattern="\u2581", behavior="merged_with_next")
    t.decoder = decoders.Sequence([decoders.WordPiece(), decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def test_refusal_tokens_skip_the_bare_word_boundary_piece_and_name_partial_words():
    tok = _sentencepiece_like_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" sorry", add_special_tokens=False)["input_ids"]) == ["\u2581", "\u2581sorry"]
    # " sorry" counts as "▁sorry", never as "▁" (a piece that opens many answers)
    assert tok.convert_ids_to_tokens(refusal_token_ids(tok, ["sorry", "cannot"])) == ["\u2581sorry", "\u2581cannot"]
    notes = partial_refusal_words(tok, ["sorry", "can't", "I'm"])
    assert len(notes) == 2 and "'can'" in notes[0] and "'I'" in notes[1]
