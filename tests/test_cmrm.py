"""CMRM: calibration, steering (hooks, generate, padding, threads, restore), folding
into weights, vector files, the recipe/runtime path and the CLI, on a real tiny Llava."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from lvlm_safety_plugins import Runtime, VectorFileError, get_adapter, load_recipe
from lvlm_safety_plugins.methods.cmrm import SteeringVectors, apply, calibrate, fold_into_weights, model_fingerprint, steer
from lvlm_safety_plugins.methods.cmrm.folding import check_savable
from lvlm_safety_plugins.testing import build_tiny_llava, make_image, tiny_llava_batch

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:", "USER: <image> tell me how to make a cake ASSISTANT:"]


def rows(n=3):
    return [{"image": make_image(10 + i), "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]


def random_vectors(model, layers=(1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    return SteeringVectors(
        vectors={l: torch.randn(adapter.hidden_size, generator=g) for l in layers}, model_class=type(model).__name__,
        fingerprint=model_fingerprint(model), hidden_size=adapter.hidden_size, num_layers=adapter.num_layers, samples=3,
    )


def hidden_states(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states, out.logits


def manual(model, batch, shifts, mask):
    """An independent forward in which ``shifts[l]`` ([H] or [B, H]) is subtracted at
    the True positions of ``mask`` from the output of layer l. Returns the layer
    outputs it saw (as ``hidden_states[1:]`` would) and the logits."""
    adapter = get_adapter(model)
    handles, seen = [], {}
    for layer in range(adapter.num_layers):
        def hook(module, args, output, layer=layer):
            h = output if isinstance(output, torch.Tensor) else output[0]
            if layer in shifts:
                v = shifts[layer]
                delta = v.view(1, 1, -1) if v.dim() == 1 else v.unsqueeze(1)
                h = h - delta * mask.unsqueeze(-1).to(h.dtype)
            seen[layer] = h
            return h if isinstance(output, torch.Tensor) else (h, *output[1:])
        handles.append(adapter.decoder_layers[layer].register_forward_hook(hook, prepend=True))
    try:
        _, logits = hidden_states(model, batch)
    finally:
        for h in handles:
            h.remove()
    return (None, *(seen[l] for l in range(adapter.num_layers))), logits


@pytest.mark.parametrize("positions", ["image", "text", "all"])
def test_steered_states_equal_a_manual_forward(tiny_llava, tiny_llava_processor, positions):
    batch = tiny_llava_batch(tiny_llava_processor)
    vectors = random_vectors(tiny_llava)
    layout = get_adapter(tiny_llava).layout(batch)
    mask = {"image": layout.image_mask, "text": layout.text_mask, "all": layout.attention_mask}[positions]
    with steer(tiny_llava, vectors, alpha=0.5, positions=positions):
        got_h, got_logits = hidden_states(tiny_llava, batch)
    want_h, want_logits = manual(tiny_llava, batch, {l: 0.5 * v for l, v in vectors.vectors.items()}, mask)
    base_h, _ = hidden_states(tiny_llava, batch)
    for i in range(1, 4):  # hidden_states[i] is the output of layer i-1
        torch.testing.assert_close(got_h[i], want_h[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-6)
    assert torch.equal(got_h[1], base_h[1])  # layer 0 is not steered
    assert not torch.equal(got_h[2], base_h[2])
    pad = ~layout.attention_mask
    assert torch.equal(got_h[2][pad], base_h[2][pad])  # padding never touched


def test_dataset_vectors_equal_the_mean_difference_by_hand(tiny_llava, tiny_llava_processor):
    data = rows(3)
    independent = type("C", (), {"composition": "independent"})()
    got = calibrate(tiny_llava, tiny_llava_processor, data, independent, layers=[0, 2], progress=False)  # batch_size 8: padded batch
    adapter = get_adapter(tiny_llava)
    expect = {0: torch.zeros(32), 2: torch.zeros(32)}
    # the blank reference: a black image through the model's own processor, against the
    # prompt with its image tokens removed, at the last token
    black = tiny_llava_processor.image_processor(images=make_image(0, color=(0, 0, 0)), return_tensors="pt")["pixel_values"]
    for r in data:
        enc = tiny_llava_processor(text=[r["prompt"]], images=[r["image"]], return_tensors="pt")
        with_blank, _ = hidden_states(tiny_llava, dict(enc, pixel_values=black))
        text, _ = hidden_states(tiny_llava, adapter.text_only_batch(enc))
        for layer in expect:
            expect[layer] += (with_blank[layer + 1][0, -1] - text[layer + 1][0, -1]) / 3
    assert got.samples == 3 and got.layers == [0, 2]
    for layer in expect:
        torch.testing.assert_close(got.vectors[layer], expect[layer], rtol=1e-4, atol=1e-5)
    # reference none: the sample's own image, h(with its image) - h(image tokens removed)
    none = calibrate(tiny_llava, tiny_llava_processor, data, config=type("C", (), {"reference": "none", "batch_size": 2})(), layers=[1], progress=False)
    assert none.composition == "sequential"  # one layer: nothing earlier steers it
    by_hand = torch.zeros(32)
    for r in data:
        enc = tiny_llava_processor(text=[r["prompt"]], images=[r["image"]], return_tensors="pt")
        text = adapter.text_only_batch(enc)
        by_hand += (hidden_states(tiny_llava, enc)[0][2][0, -1] - hidden_states(tiny_llava, text)[0][2][0, -1]) / 3
    torch.testing.assert_close(none.vectors[1], by_hand, rtol=1e-4, atol=1e-5)


def test_sample_level_generate_applies_the_prefill_shift_at_every_step(tiny_llava, tiny_llava_processor):
    r = rows(1)[0]
    enc = tiny_llava_processor(text=[r["prompt"]], images=[r["image"]], return_tensors="pt")
    layers = [1, 3]
    # the shift by hand: unsteered forwards with the reference image (no processor
    # given: the all-zero pixel tensor) and text only, last prompt token
    from lvlm_safety_plugins.capture import HiddenCapture

    adapter = get_adapter(tiny_llava)
    pooled = []
    for inputs in (dict(enc, pixel_values=torch.zeros_like(enc["pixel_values"])), adapter.text_only_batch(enc)):
        with torch.no_grad(), HiddenCapture(adapter, layers, {"m": adapter.layout(inputs).attention_mask}, "last") as cap:
            tiny_llava(**inputs)
        pooled.append(cap.stacked("m"))
    shift = {l: (pooled[0] - pooled[1])[i, 0] for i, l in enumerate(layers)}
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with steer(tiny_llava, None, variant="sample", composition="independent", layers=layers, alpha=2.0):
            sample = tiny_llava.generate(**enc, **gen)
        with steer(tiny_llava, shift, layers=layers, alpha=2.0):
            fixed = tiny_llava.generate(**enc, **gen)
        plain = tiny_llava.generate(**enc, **gen)
    assert torch.equal(sample.sequences, fixed.sequences)
    for a, b in zip(sample.scores, fixed.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(sample.scores, plain.scores))


@pytest.mark.parametrize("variant", ["dataset", "sample"])
def test_left_padded_batch_equals_each_prompt_alone(tiny_llava, tiny_llava_processor, variant):
    vectors = random_vectors(tiny_llava) if variant == "dataset" else None
    batch = tiny_llava_batch(tiny_llava_processor)  # two prompts of different lengths, left padded
    opts = dict(variant=variant, alpha=0.7, processor=tiny_llava_processor, layers=[1, 2])
    with torch.no_grad(), steer(tiny_llava, vectors, **opts):
        together = tiny_llava(**batch).logits
        alone = []
        for i, prompt in enumerate(["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:"]):
            one = tiny_llava_processor(text=[prompt], images=[make_image(i)], return_tensors="pt")
            alone.append(tiny_llava(**one).logits[0])
    for i, logits in enumerate(alone):
        torch.testing.assert_close(together[i, -logits.shape[0]:], logits, rtol=1e-4, atol=1e-5)


def test_exact_restore_also_after_an_exception(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    with torch.no_grad():
        before = tiny_llava(**batch).logits
    hooks = lambda: sum(len(l._forward_hooks) for l in get_adapter(tiny_llava).decoder_layers) + len(tiny_llava._forward_pre_hooks)  # noqa: E731
    n = hooks()
    with pytest.raises(RuntimeError, match="inside"):
        with steer(tiny_llava, None, variant="sample", processor=tiny_llava_processor):
            assert "generate" in tiny_llava.__dict__
            tiny_llava.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
            raise RuntimeError("inside")
    handle = apply(tiny_llava, random_vectors(tiny_llava))
    handle.remove()
    handle.remove()  # idempotent
    with torch.no_grad():
        after = tiny_llava(**batch).logits
    assert torch.equal(before, after) and hooks() == n and "generate" not in tiny_llava.__dict__
    assert all(torch.equal(a, b) for a, b in zip(tiny_llava.state_dict().values(), build_tiny_llava().state_dict().values()))


def test_threads_do_not_cross_talk(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    vectors = random_vectors(tiny_llava)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    def run(alpha):
        with torch.no_grad():
            if alpha is None:
                return tiny_llava.generate(**batch, **gen).scores
            with steer(tiny_llava, vectors, alpha=alpha):
                return tiny_llava.generate(**batch, **gen).scores

    expected = {a: run(a) for a in (None, 1.0, -3.0)}
    results: dict = {}
    barrier = threading.Barrier(3)

    def worker(alpha, key):
        barrier.wait()
        results[key] = [run(alpha) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(a, str(a))) for a in (None, 1.0, -3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for alpha in (None, 1.0, -3.0):
        for scores in results[str(alpha)]:
            for a, b in zip(scores, expected[alpha]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[1.0][0], expected[-3.0][0])


def test_fold_matches_hooks_and_saves_a_plain_checkpoint(tmp_path, tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    vectors = random_vectors(tiny_llava, layers=(0, 2))
    with torch.no_grad(), steer(tiny_llava, vectors, alpha=0.8, positions="all"):
        hooked = tiny_llava(**batch).logits
    folded_model = copy.deepcopy(tiny_llava)
    assert fold_into_weights(folded_model, vectors, alpha=0.8) == [0, 2]
    assert not any(l._forward_hooks for l in get_adapter(folded_model).decoder_layers)
    with torch.no_grad():
        folded = folded_model(**batch).logits
    real = get_adapter(tiny_llava).layout(batch).attention_mask  # real positions in the decoder's sequence
    torch.testing.assert_close(folded[real], hooked[real], rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="only dataset-level CMRM on all positions"):
        fold_into_weights(copy.deepcopy(tiny_llava), vectors, positions="image")
    try:
        check_savable()
    except Exception:
        pytest.skip("this transformers has no LlamaConfig.mlp_bias: folded checkpoints cannot be saved (documented)")
    folded_model.save_pretrained(tmp_path / "folded")
    torch.save(batch, tmp_path / "batch.pt")
    code = (
        "import sys, torch, transformers\n"
        "m = transformers.LlavaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
        "b = torch.load(sys.argv[2])\n"
        "assert 'lvlm_safety_plugins' not in sys.modules\n"
        "torch.save(m(**b).logits, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "folded"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")], check=True, capture_output=True)
    reloaded = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(reloaded[real], hooked[real], rtol=0, atol=1e-5)


def test_vector_files_round_trip_and_every_bad_case(tmp_path, tiny_llava):
    vectors = random_vectors(tiny_llava)
    path = vectors.save(tmp_path / "v.safetensors")
    loaded = SteeringVectors.load(path)
    assert loaded.layers == [1, 2] and torch.equal(loaded.vectors[1], vectors.vectors[1])
    loaded.check(tiny_llava)
    with pytest.raises(VectorFileError, match="nope.safetensors: vector file not found"):
        SteeringVectors.load(tmp_path / "nope.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VectorFileError, match="trunc.safetensors: not a readable safetensors"):
        SteeringVectors.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(VectorFileError, match="junk.safetensors: not a readable safetensors"):
        SteeringVectors.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VectorFileError, match="other.safetensors: missing metadata"):
        SteeringVectors.load(tmp_path / "other.safetensors")
    wide = SteeringVectors(vectors={1: torch.zeros(64)}, model_class="X", fingerprint=vectors.fingerprint, hidden_size=64, num_layers=4)
    with pytest.raises(VectorFileError, match="w.safetensors: vectors have hidden size 64, the model has 32"):
        SteeringVectors.load(wide.save(tmp_path / "w.safetensors")).check(tiny_llava, source=tmp_path / "w.safetensors")
    deep = SteeringVectors(vectors={9: torch.zeros(32)}, model_class="X", fingerprint=vectors.fingerprint, hidden_size=32, num_layers=12)
    with pytest.raises(VectorFileError, match=r"d.safetensors: layers \[9\] do not exist: the model has 4 decoder layers"):
        SteeringVectors.load(deep.save(tmp_path / "d.safetensors")).check(tiny_llava, source=tmp_path / "d.safetensors")
    other = build_tiny_llava(hidden_size=32, num_layers=4, vocab_size=80)
    with pytest.raises(VectorFileError, match="v.safetensors: vectors were calibrated on another model"):
        loaded.check(other, source=path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.check(other, strict=False, source=path)
    assert any("calibrated on another model" in str(w.message) for w in caught)
    # a failed save leaves nothing behind
    bad = SteeringVectors(vectors={1: "not a tensor"}, model_class="X", fingerprint="f", hidden_size=32, num_layers=4)  # type: ignore[dict-item]
    with pytest.raises(Exception):
        bad.save(tmp_path / "half.safetensors")
    assert not list(tmp_path.glob("*half*"))


def test_apply_to_prompt_steers_the_prefill_and_leaves_decode_steps_alone(tiny_llava, tiny_llava_processor):
    """``apply_to: prompt`` against hand-written hooks: the prompt's positions (all of
    them, one unpadded row) get ``alpha * v`` subtracted in the prefill forward; the
    decode steps (one new position each) run unsteered on that steered cache."""
    enc = tiny_llava_processor(text=[PROMPTS[0]], images=[make_image(3)], return_tensors="pt")
    vectors = random_vectors(tiny_llava)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    adapter = get_adapter(tiny_llava)
    with torch.no_grad():
        with steer(tiny_llava, vectors, alpha=0.5, positions="all", apply_to="prompt"):
            got = tiny_llava.generate(**enc, **gen)
        with steer(tiny_llava, vectors, alpha=0.5, positions="all", apply_to="both"):
            both = tiny_llava.generate(**enc, **gen)
        handles = []
        for layer, v in vectors.vectors.items():
            def prefill_only(module, args, output, v=v):
                h = output if isinstance(output, torch.Tensor) else output[0]
                if h.shape[1] == 1:  # a decode step
                    return None
                h = h - 0.5 * v
                return h if isinstance(output, torch.Tensor) else (h, *output[1:])
            handles.append(adapter.decoder_layers[layer].register_forward_hook(prefill_only, prepend=True))
        try:
            want = tiny_llava.generate(**enc, **gen)
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.scores[0], both.scores[0], rtol=0, atol=1e-6)  # the same prefill
    assert any(not torch.allclose(a, b) for a, b in zip(got.scores[1:], both.scores[1:]))  # decode steps differ


def test_recipe_runtime_calibrate_and_steer(tmp_path, tiny_llava, tiny_llava_processor):
    out = tmp_path / "vectors.safetensors"
    rt = Runtime(load_recipe("cmrm_llava15_dataset", [f"cmrm.vectors={out}", "cmrm.layers=1-2", "cmrm.batch_size=2"]),
                 model=tiny_llava, processor=tiny_llava_processor)
    [artifact] = rt.calibrate(tiny_llava_processor, rows(3))
    assert artifact["path"] == str(out) and artifact["layers"] == [1, 2] and artifact["samples"] == 3
    assert "cmrm" in SteeringVectors.load(out).recipe
    batch = tiny_llava_batch(tiny_llava_processor)
    with torch.no_grad():
        base = tiny_llava(**batch).logits
        with rt.steering():
            steered = tiny_llava(**batch).logits
        with steer(tiny_llava, SteeringVectors.load(out), alpha=1.0):
            direct = tiny_llava(**batch).logits
        after = tiny_llava(**batch).logits
    assert torch.equal(steered, direct) and not torch.equal(base, steered) and torch.equal(base, after)


def test_calibrate_cli(tmp_path, tiny_llava, tiny_llava_processor):
    model_dir = tmp_path / "model"
    tiny_llava.save_pretrained(model_dir)
    tiny_llava_processor.save_pretrained(model_dir)
    lines = []
    for i in range(3):
        make_image(i).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": "what is in the image ?"}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines))
    out = tmp_path / "v.safetensors"
    cmd = [sys.executable, "-m", "lvlm_safety_plugins.cli", "calibrate", "--recipe", "cmrm_llava15_dataset", "cmrm.layers=0-1",
           "--model", str(model_dir), "--data", str(tmp_path / "calib.jsonl"), "--template", "USER: <image> {prompt} ASSISTANT:", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "calibrated 2 layers on 3 samples" in res.stdout
    assert SteeringVectors.load(out).samples == 3
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.png", "prompt": "x"}))
    cmd[cmd.index(str(tmp_path / "calib.jsonl"))] = str(tmp_path / "bad.jsonl")
    res = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert res.returncode == 2 and "bad.jsonl: row 0 (id 0): image not found" in res.stderr


def test_hf_integration_generate(tiny_llava, tiny_llava_processor, tmp_path):
    from lvlm_safety_plugins.integrations.hf import recipe_steering, steered_generate

    vectors = random_vectors(tiny_llava)
    path = vectors.save(tmp_path / "v.safetensors")
    batch = tiny_llava_batch(tiny_llava_processor)
    overrides = [f"cmrm.vectors={path}", "cmrm.alpha=3.0", "cmrm.composition=independent"]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = steered_generate(tiny_llava, "cmrm_llava15_dataset", overrides, processor=tiny_llava_processor, **batch, **gen)
        with steer(tiny_llava, vectors, alpha=3.0):
            direct = tiny_llava.generate(**batch, **gen)
        with recipe_steering(tiny_llava, "cmrm_llava15_dataset", overrides):
            ctx = tiny_llava.generate(**batch, **gen)
    assert torch.equal(out, direct) and torch.equal(ctx, direct)


def test_hf_integration_image_text_to_text_pipeline(tiny_llava, tiny_llava_processor, tmp_path):
    from transformers import pipeline

    from lvlm_safety_plugins.integrations.hf import steered_pipeline

    try:
        pipe = pipeline("image-text-to-text", model=tiny_llava, processor=tiny_llava_processor, device="cpu")
    except (KeyError, ValueError) as exc:
        pytest.skip(f"this transformers has no image-text-to-text pipeline: {exc}")
    path = random_vectors(tiny_llava).save(tmp_path / "v.safetensors")
    ask = dict(images=make_image(0), text="USER: <image> what is in the image ? ASSISTANT:", generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    plain = pipe(**ask)[0]["generated_text"]
    with steered_pipeline(pipe, "cmrm_llava15_dataset", [f"cmrm.vectors={path}", "cmrm.alpha=4.0", "cmrm.composition=independent"]) as steered:
        got = steered(**ask)[0]["generated_text"]
    with steer(tiny_llava, SteeringVectors.load(path), alpha=4.0):
        direct = pipe(**ask)[0]["generated_text"]
    assert got == direct and got != plain
    assert pipe(**ask)[0]["generated_text"] == plain  # removed on exit


def test_calibration_reads_hf_datasets_and_llava_json(tmp_path, tiny_llava, tiny_llava_processor):
    import datasets

    data = rows(3)
    from_list = calibrate(tiny_llava, tiny_llava_processor, data, layers=[1], progress=False)
    ds = datasets.Dataset.from_list([{"image": r["image"], "prompt": r["prompt"]} for r in data])
    from_ds = calibrate(tiny_llava, tiny_llava_processor, ds, layers=[1], progress=False)
    records = []
    for i, r in enumerate(data):
        r["image"].save(tmp_path / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": r["prompt"]}, {"from": "gpt", "value": "x"}]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    from_json = calibrate(tiny_llava, tiny_llava_processor, tmp_path / "llava.json", layers=[1], progress=False)
    torch.testing.assert_close(from_ds.vectors[1], from_list.vectors[1], rtol=1e-4, atol=1e-4)  # PNG round trip of HF datasets
    torch.testing.assert_close(from_json.vectors[1], from_list.vectors[1], rtol=1e-4, atol=1e-4)
    records[1]["conversations"] = [{"from": "gpt", "value": "no human turn"}]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(Exception, match=r"bad.json: row 1 \(id 's1'\): missing 'prompt'"):
        calibrate(tiny_llava, tiny_llava_processor, tmp_path / "bad.json", layers=[1], progress=False)


def test_in_memory_fold_matches_and_refuses_to_be_saved(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    vectors = random_vectors(tiny_llava, layers=(1,))
    with torch.no_grad(), steer(tiny_llava, vectors, alpha=0.5, positions="all"):
        hooked = tiny_llava(**batch).logits
    fast = copy.deepcopy(tiny_llava)
    fold_into_weights(fast, vectors, alpha=0.5, savable=False)
    layer = get_adapter(fast).decoder_layers
    assert layer[1].mlp.down_proj.bias is not None and layer[0].mlp.down_proj.bias is None and layer[1].mlp.up_proj.bias is None
    with torch.no_grad():
        got = fast(**batch).logits
    real = get_adapter(fast).layout(batch).attention_mask
    torch.testing.assert_close(got[real], hooked[real], rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="savable=False"):
        check_savable(fast)


# -- sequential calibration in one pass ---------------------------------------------------


def per_layer_reference(model, batches, layers, alpha, positions, measure_at="last"):
    """Sequential vectors the way they are defined, written here: the text-only mean
    at every layer, then for each layer in order one reference-image forward over every
    batch, steered (through the public ``steer``) by the vectors found so far at
    ``positions`` (prompt only), its pooled mean minus the text-only mean."""
    from lvlm_safety_plugins.capture import HiddenCapture

    adapter = get_adapter(model)

    def pooled_mean(inputs_list, at):
        total, n = {l: torch.zeros(adapter.hidden_size, dtype=torch.float64) for l in at}, 0
        for inputs in inputs_list:
            layout = adapter.layout(inputs)
            mask = layout.attention_mask if measure_at == "last" else layout.text_mask
            with torch.no_grad(), HiddenCapture(adapter, at, {"m": mask}, measure_at, detach=True) as cap:
                model(**inputs, use_cache=False)
            for l in at:
                total[l] += cap.pooled["m"][l].double().sum(0)
            n += int(mask.shape[0])
        return {l: total[l] / n for l in at}

    text = pooled_mean([t for _, t in batches], layers)
    vectors = {}
    for layer in layers:
        if vectors:
            handle = apply(model, dict(vectors), alpha=[alpha] * len(vectors), layers=sorted(vectors), positions=positions,
                           apply_to="prompt")
        else:
            handle = None
        try:
            image = pooled_mean([w for w, _ in batches], [layer])
        finally:
            if handle is not None:
                handle.remove()
        vectors[layer] = (image[layer] - text[layer]).float()
    return vectors


def hf_batches(model, processor, data, batch_size, side):
    adapter = get_adapter(model)
    processor.tokenizer.padding_side = side
    out = []
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        enc = dict(processor(text=[r["prompt"] for r in chunk], images=[r["image"] for r in chunk], return_tensors="pt",
                             padding=True))
        out.append((adapter.blank_image_batch(enc, "blank", image_processor=processor.image_processor), adapter.text_only_batch(enc)))
    return out


@pytest.mark.parametrize("side,positions,store,measure_at", [("left", "from_image", "cpu", "last"),
                                                             ("right", "all", "disk", "mean"),
                                                             ("left", "image", "device", "last")])
def test_one_pass_sequential_vectors_equal_one_steered_pass_per_layer(tiny_llava, tiny_llava_processor, side, positions,
                                                                      store, measure_at):
    data = rows(5)
    cfg = type("C", (), {"batch_size": 2, "alpha": 0.7, "positions": positions, "apply_to": "both",
                         "calibration_store": store, "measure_at": measure_at})()
    tiny_llava_processor.tokenizer.padding_side = side
    try:
        got = calibrate(tiny_llava, tiny_llava_processor, data, cfg, layers=[0, 2, 3], progress=False)
        want = per_layer_reference(tiny_llava, hf_batches(tiny_llava, tiny_llava_processor, data, 2, side), [0, 2, 3], 0.7,
                                   positions, measure_at)
    finally:
        tiny_llava_processor.tokenizer.padding_side = "left"
    assert got.extra["calibration"] == "one pass" and got.samples == 5
    for layer in (0, 2, 3):
        torch.testing.assert_close(got.vectors[layer], want[layer], rtol=1e-5, atol=1e-6)
    # the earlier layers' edits matter: unsteered (independent) vectors differ at layer 3
    independent = calibrate(tiny_llava, tiny_llava_processor, data, type("C", (), {"batch_size": 2, "composition": "independent",
                                                                                   "measure_at": measure_at})(),
                            layers=[0, 2, 3], progress=False)
    assert not torch.allclose(independent.vectors[3], got.vectors[3], atol=1e-6)


def test_disk_store_is_removed_also_after_an_error(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.methods.cmrm.calibration import sequential_vectors

    batches = hf_batches(tiny_llava, tiny_llava_processor, rows(4), 2, "left")
    folder = tmp_path / "store"
    folder.mkdir()
    seen = []

    def failing():
        yield batches[0]
        seen.extend(folder.iterdir())  # the first batch's states are on disk by now
        raise RuntimeError("data went away")

    with pytest.raises(RuntimeError, match="data went away"):
        sequential_vectors(tiny_llava, failing(), [1, 2], {1: 1.0, 2: 1.0}, frozenset({"image", "text"}), store="disk",
                           store_folder=folder)
    assert len(seen) == 1 and seen[0].name.startswith("cmrm-calibration-")
    assert list(folder.iterdir()) == []
    vectors, n = sequential_vectors(tiny_llava, batches, [1, 2], {1: 1.0, 2: 1.0}, frozenset({"image", "text"}), store="disk",
                                    store_folder=folder)
    assert n == 4 and sorted(vectors) == [1, 2] and list(folder.iterdir()) == []


def test_a_model_whose_layers_need_their_own_masks_falls_back_to_a_pass_per_layer(tiny_llava, tiny_llava_processor):
    model = copy.deepcopy(tiny_llava)
    get_adapter(model).text_config.layer_types = ["full_attention", "sliding_attention"] * 2  # what 5.x mixed models carry
    cfg = type("C", (), {"batch_size": 2, "alpha": 0.5})()
    with pytest.warns(RuntimeWarning, match="cannot be calibrated in one pass.*different attention kinds"):
        got = calibrate(model, tiny_llava_processor, rows(3), cfg, layers=[1, 3], progress=False)
    assert got.extra["calibration"].startswith("one reference pass per layer: ")
    one_pass = calibrate(tiny_llava, tiny_llava_processor, rows(3), cfg, layers=[1, 3], progress=False)
    for layer in (1, 3):
        torch.testing.assert_close(got.vectors[layer], one_pass.vectors[layer], rtol=1e-5, atol=1e-6)


def test_one_pass_calibration_of_qwen2vl_equals_a_pass_per_layer():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the tiny Qwen2-VL config here needs transformers 5")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from lvlm_safety_plugins.methods.cmrm.calibration import sequential_vectors

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=60, vision_start_token_id=61, vision_end_token_id=62, bos_token_id=2, eos_token_id=3,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    adapter = get_adapter(model)
    ids = torch.tensor([[0, 0, 5, 61, 60, 60, 62, 7], [5, 9, 61, 60, 60, 62, 7, 8]])  # left padded, images at two places
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
             "image_grid_thw": torch.tensor([[1, 2, 4], [1, 2, 4]]), "mm_token_type_ids": (ids == 60).long()}
    batches = [(adapter.blank_image_batch(batch, "noise", seed=3), adapter.text_only_batch(batch))]
    got, n = sequential_vectors(model, batches, [0, 1, 2], {0: 0.6, 1: 0.6, 2: 0.6}, frozenset({"image", "text", "after_image"}))
    want = per_layer_reference(model, batches, [0, 1, 2], 0.6, "from_image")
    assert n == 2
    for layer in (0, 1, 2):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)


def test_one_pass_calibration_of_a_llava_package_model_equals_a_pass_per_layer():
    pytest.importorskip("llava.model", reason="needs the LLaVA framework (llava-torch)")
    from llava.constants import IMAGE_TOKEN_INDEX

    from lvlm_safety_plugins.methods.cmrm.calibration import sequential_vectors
    from lvlm_safety_plugins.testing import IMAGE_SIZE, build_tiny_llava_package_model

    model = build_tiny_llava_package_model(mm_use_im_patch_token=False, mm_use_im_start_end=False).float().eval()
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ((3, 5), (4, 2)):
        # right padded (LLaVA's training side), the image token at a different place per row
        width = 4 + max(lengths)  # padded to the longest row, as a tokenizer pads
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for r, before in enumerate(lengths):
            row = [1] + [7 + r] * before + [IMAGE_TOKEN_INDEX] + [9, 10]
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "images": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}
        batches.append((batch, adapter.text_only_batch(batch)))  # reference none: the row's own image
    got, n = sequential_vectors(model, batches, [0, 1, 2], {0: 1.0, 1: 1.0, 2: 1.0}, frozenset({"image", "text", "after_image"}),
                                store="cpu")
    want = per_layer_reference(model, batches, [0, 1, 2], 1.0, "from_image")
    assert n == 4
    for layer in (0, 1, 2):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)
        assert want[layer].norm() > 0


def test_one_pass_calibration_runs_each_layer_once_per_batch_and_input(tiny_llava, tiny_llava_processor):
    """Counted with pre-hooks on the real layers: 5 rows in batches of 2 are 3 batches,
    each with one text-only and one reference-image input, so every decoder layer runs
    6 times (layer 0 too: the forward that records the layer arguments keeps its
    output; it ran 9 times when the loop called it again), and a probe, not layer 1,
    stands after it in that forward. No hook is left behind."""
    adapter = get_adapter(tiny_llava)
    counts = {l: 0 for l in range(adapter.num_layers)}

    def count(layer):
        def hook(module, args, kwargs):
            counts[layer] += 1
        return hook

    handles = [adapter.decoder_layers[l].register_forward_pre_hook(count(l), with_kwargs=True) for l in counts]
    try:
        cfg = type("C", (), {"batch_size": 2, "alpha": 0.5})()
        got = calibrate(tiny_llava, tiny_llava_processor, rows(5), cfg, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert got.extra["calibration"] == "one pass" and got.samples == 5
    assert counts == {l: 6 for l in counts}
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in adapter.decoder_layers)
    assert list(adapter.decoder_layers) == [m for m in adapter.decoder_layers if type(m).__name__ != "LayerProbe"]


def test_same_call_names_the_argument_that_differs():
    from lvlm_safety_plugins.compat import LayerCall, same_call

    mask = torch.zeros(1, 1, 3, 3)
    cos = torch.ones(1, 3, 4)
    a = LayerCall((), {"attention_mask": mask, "position_embeddings": (cos, cos), "use_cache": False}, False)
    assert same_call(a, LayerCall((), {"attention_mask": mask.clone(), "position_embeddings": (cos, cos.clone()),
                                       "use_cache": False}, False)) is None
    assert same_call(a, LayerCall((), {"attention_mask": mask + 1, "position_embeddings": (cos, cos), "use_cache": False},
                                  False)) == "'attention_mask'"
    assert same_call(a, LayerCall((), {"attention_mask": mask, "position_embeddings": (cos, cos)}, False)) == "'use_cache'"
    assert same_call(a, LayerCall((mask,), dict(a.kwargs), False)) == "the positional arguments"


# -- sample level, reference none: two forwards per prefill -----------------------------------


@contextlib.contextmanager
def _edited_layers(adapter, layers, edit):
    """Forward hooks (prepended, so hidden_states shows them) that replace each of
    ``layers``' output hidden states ``h`` by ``edit(h, layer)``; removed on exit."""
    def hook(module, args, output, layer):
        h = edit(output if isinstance(output, torch.Tensor) else output[0], layer)
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])

    handles = [adapter.decoder_layers[l].register_forward_hook(lambda m, a, o, l=l: hook(m, a, o, l), prepend=True)
               for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _counted_forwards(adapter):
    """A list that gets one entry per forward through the decoder while the block runs."""
    calls = []
    counter = adapter.decoder_layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        counter.remove()


def _text_only_last_states(model, adapter, batch, layers):
    """The text-only prompt's last-token states at ``layers`` (what sample-level CMRM measures against)."""
    from lvlm_safety_plugins.capture import HiddenCapture

    text_only = adapter.text_only_batch(batch)
    with torch.no_grad(), HiddenCapture(adapter, layers, {"m": adapter.layout(text_only).attention_mask}, "last") as cap:
        model(**text_only)
    return {l: cap.pooled["m"][l] for l in layers}


def test_sample_level_reference_none_reads_its_shift_from_the_prefill(tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.steering import after_image_mask

    batch = tiny_llava_batch(tiny_llava_processor)  # two prompts, left padded
    adapter = get_adapter(tiny_llava)
    layers, alpha = [0, 2, 3], 0.8
    layout = adapter.layout(batch)
    steered = layout.attention_mask & after_image_mask(layout.image_mask)  # from_image
    # by hand: the text-only prompt's last-token states, then a forward of the input that
    # at each steered layer measures its own (already steered) last-token state against
    # them and subtracts alpha times that shift at the steered positions
    text = _text_only_last_states(tiny_llava, adapter, batch, layers)
    shifts = {}
    last = layout.last_index()

    def measure(h, layer):
        shifts[layer] = h[torch.arange(h.shape[0]), last] - text[layer]
        return h - alpha * shifts[layer].unsqueeze(1) * steered.unsqueeze(-1).to(h.dtype)

    with torch.no_grad(), _edited_layers(adapter, layers, measure):
        want = tiny_llava(**batch).logits
    with _counted_forwards(adapter) as calls, torch.no_grad(), steer(tiny_llava, None, variant="sample", reference="none",
                                                                     layers=layers, alpha=alpha):
        got = tiny_llava(**batch).logits
    assert len(calls) == 2  # the text-only prompt and the prefill itself: no separate reference forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # generate: the prefill's shifts are subtracted at every decode step of the call
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    def fixed(h, layer):
        where = steered if h.shape[1] > 1 else torch.ones(h.shape[:2], dtype=torch.bool)
        return h - alpha * shifts[layer].unsqueeze(1) * where.unsqueeze(-1).to(h.dtype)

    with torch.no_grad(), _edited_layers(adapter, layers, fixed):
        by_hand = tiny_llava.generate(**batch, **gen)
    with torch.no_grad(), steer(tiny_llava, None, variant="sample", reference="none", layers=layers, alpha=alpha):
        sample = tiny_llava.generate(**batch, **gen)
    assert torch.equal(sample.sequences, by_hand.sequences)
    for a, b in zip(sample.scores, by_hand.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_truncated_passes_skip_the_lm_head_and_put_it_back(tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.capture import HiddenCapture, skipped_lm_head

    batch = tiny_llava_batch(tiny_llava_processor)
    adapter = get_adapter(tiny_llava)
    head = tiny_llava.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            full = tiny_llava(**batch, output_hidden_states=True)
            assert len(calls) == 1
            with HiddenCapture(adapter, [1, 2], {"m": adapter.layout(batch).attention_mask}, "mean", detach=True) as cap:
                cap.run(tiny_llava, **batch)  # a teacher / calibration pass: its logits are not read
        assert len(calls) == 1  # the vocabulary projection did not run
        mask = adapter.layout(batch).attention_mask.unsqueeze(-1).float()
        for layer in (1, 2):  # (the last entry of hidden_states is after the final norm on 5.x)
            want = (full.hidden_states[layer + 1] * mask).sum(1) / mask.sum(1)
            torch.testing.assert_close(cap.pooled["m"][layer], want, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="inside"), skipped_lm_head(adapter):
            assert tiny_llava.get_output_embeddings() is not head
            raise RuntimeError("inside")
        assert tiny_llava.get_output_embeddings() is head  # back, also after an error
        with torch.no_grad():
            assert torch.equal(tiny_llava(**batch).logits, full.logits)
    finally:
        hook.remove()


@pytest.mark.parametrize("reference", ["blank", "noise"])
def test_sample_level_blank_and_noise_batch_the_reference_with_the_text_only_rows(tiny_llava, tiny_llava_processor, reference):
    from lvlm_safety_plugins.compat import llava_splices_image_features
    from lvlm_safety_plugins.steering import after_image_mask

    batch = tiny_llava_batch(tiny_llava_processor)
    adapter = get_adapter(tiny_llava)
    layers, alpha = [0, 2, 3], 0.8
    ref = adapter.blank_image_batch(batch, reference, seed=0, image_processor=tiny_llava_processor.image_processor)
    # by hand, as separate forwards: the text-only prompt's last-token states; the
    # reference input, measuring its own (already steered) last-token state at each
    # steered layer against them and subtracting alpha times it from its image positions on
    text = _text_only_last_states(tiny_llava, adapter, batch, layers)
    ref_layout = adapter.layout(ref)
    ref_steered = ref_layout.attention_mask & after_image_mask(ref_layout.image_mask)
    last = ref_layout.last_index()
    shifts = {}

    def measure(h, layer):
        shifts[layer] = h[torch.arange(h.shape[0]), last] - text[layer]
        return h - alpha * shifts[layer].unsqueeze(1) * ref_steered.unsqueeze(-1).to(h.dtype)

    with torch.no_grad(), _edited_layers(adapter, layers, measure):
        tiny_llava(**ref)
    # the prefill subtracts those shifts at its own from_image positions
    layout = adapter.layout(batch)
    steered = layout.attention_mask & after_image_mask(layout.image_mask)
    with torch.no_grad(), _edited_layers(adapter, layers,
                                         lambda h, l: h - alpha * shifts[l].unsqueeze(1) * steered.unsqueeze(-1).to(h.dtype)):
        want = tiny_llava(**batch).logits
    with _counted_forwards(adapter) as calls, torch.no_grad(), steer(tiny_llava, None, variant="sample", reference=reference,
                                                                     layers=layers, alpha=alpha, processor=tiny_llava_processor):
        got = tiny_llava(**batch).logits
    # one forward of the text-only and reference rows together, then the prefill (4.37's
    # Llava splices image features itself and cannot mix rows with and without an image)
    assert len(calls) == (3 if llava_splices_image_features(tiny_llava) else 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
