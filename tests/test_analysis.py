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
from lvlm_safety_plugins.analysis import analyze, locate_safety_layers, logit_lens_refusal, refusal_token_ids
from lvlm_safety_plugins.testing import make_image


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
