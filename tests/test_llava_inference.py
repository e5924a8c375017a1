"""CMRM in LLaVA's inference, against the real ``llava`` package: a model loaded with
``load_pretrained_model``, LLaVA's own ``generate`` (which splices the image in and runs
the forward on ``inputs_embeds``), steering equal to the same subtraction done by hand,
removed on exit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llava.model.builder", reason="needs the LLaVA framework (pip install --no-deps llava-torch)")
pytest.importorskip("sentencepiece", reason="LLaVA loads a slow (sentencepiece) tokenizer")

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402

from lvlm_safety_plugins import get_adapter  # noqa: E402
from lvlm_safety_plugins.integrations import llava as lsp  # noqa: E402
from lvlm_safety_plugins.methods.cmrm import SteeringVectors, model_fingerprint  # noqa: E402
from lvlm_safety_plugins.testing import build_tiny_llava_package_model, make_image, save_tiny_clip_vision_tower, train_tiny_sentencepiece  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import llava.model.builder as builder

    root = tmp_path_factory.mktemp("tiny-llava")
    tower = save_tiny_clip_vision_tower(root / "clip")
    folder = root / "tiny-llava-v1.5"
    train_tiny_sentencepiece(folder)
    model = build_tiny_llava_package_model(tower, mm_use_im_patch_token=False, mm_use_im_start_end=False, vocab_size=400)
    model.save_pretrained(folder)
    tokenizer, model, image_processor, _ = builder.load_pretrained_model(str(folder), None, "tiny-llava-v1.5", device="cpu")
    return tokenizer, model.float().eval(), image_processor, folder


def inputs(tokenizer, image_processor, model):
    ids = tokenizer_image_token("USER: <image>\nwhat is in the image? ASSISTANT:", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    images = process_images([make_image(1)], image_processor, model.config).float()
    return ids, images


def vectors_for(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    adapter = get_adapter(model)
    v = SteeringVectors(vectors={l: torch.randn(adapter.hidden_size, generator=g) for l in (0, 2)}, model_class=type(model).__name__,
                        fingerprint=model_fingerprint(model), hidden_size=adapter.hidden_size, num_layers=adapter.num_layers, samples=1)
    return v, v.save(tmp_path / "v.safetensors")


@pytest.mark.parametrize("positions", ["all", "from_image"])
def test_cmrm_in_llava_generate_equals_the_subtraction_by_hand(loaded, tmp_path, positions):
    tokenizer, model, image_processor, _ = loaded
    ids, images = inputs(tokenizer, image_processor, model)
    vectors, path = vectors_for(model, tmp_path)
    gen = dict(images=images, do_sample=False, max_new_tokens=4, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **gen)
    lsp.apply_steering(model, "cmrm_llava15_dataset", [f"cmrm.vectors={path}", "cmrm.alpha=0.5", f"cmrm.positions={positions}",
                                                       "cmrm.composition=independent"],
                       tokenizer=tokenizer, image_processor=image_processor)
    try:
        with torch.no_grad():
            steered = model.generate(ids, **gen)
    finally:
        lsp.uninstall_inference()
    # by hand: the same subtraction at every position of every forward (prefill on
    # LLaVA's spliced sequence, then each generated token); from_image: in the prefill
    # only from the image's first feature on (LLaVA splices the features in where the
    # image token stood, so the tokens before it keep their places)
    adapter = get_adapter(model)
    from lvlm_safety_plugins.adapters import layer_hidden, replace_layer_hidden

    first = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    assert first > 0

    def by_hand(v):
        def hook(m, a, o):
            h = layer_hidden(o)
            delta = 0.5 * v.to(h.dtype).expand_as(h).clone()
            if positions == "from_image" and h.shape[1] > 1:  # the prefill
                delta[:, :first] = 0
            return replace_layer_hidden(o, h - delta)
        return hook

    handles = [adapter.decoder_layers[l].register_forward_hook(by_hand(v), prepend=True) for l, v in vectors.vectors.items()]
    try:
        with torch.no_grad():
            manual = model.generate(ids, **gen)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(steered.sequences, manual.sequences)
    for a, b in zip(steered.scores, manual.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(steered.scores, plain.scores))
    # removed on exit: the model generates exactly as before
    with torch.no_grad():
        again = model.generate(ids, **gen)
    for a, b in zip(again.scores, plain.scores):
        assert torch.equal(a, b)
    assert "generate" not in model.__dict__


@pytest.mark.skipif(
    int(__import__("transformers").__version__.split(".")[0]) >= 5,
    reason="transformers 5.x: a sentencepiece tokenizer saved by LlavaTokenizer loads without its vocabulary, so "
           "the reloaded model sees an empty prompt (LLaVA users run 4.37; see docs/install.md)",
)
def test_install_inference_steers_models_loaded_by_llava(loaded, tmp_path):
    import llava.eval.run_llava as run_llava
    import llava.model.builder as builder

    tokenizer, model, image_processor, folder = loaded
    vectors, path = vectors_for(model, tmp_path)
    original = builder.load_pretrained_model
    lsp.install_inference("cmrm_llava15_sample", ["cmrm.layers=0-1", "cmrm.strict=false"])
    try:
        assert run_llava.load_pretrained_model is builder.load_pretrained_model is not original
        tok2, model2, proc2, _ = builder.load_pretrained_model(str(folder), None, "tiny-llava-v1.5", device="cpu")
        model2 = model2.float()
        ids, images = inputs(tok2, proc2, model2)
        with torch.no_grad():
            steered = model2.generate(ids, images=images, do_sample=False, max_new_tokens=3, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    finally:
        lsp.uninstall_inference()
    assert builder.load_pretrained_model is original and run_llava.load_pretrained_model is original
    with torch.no_grad():
        plain = model2.generate(ids, images=images, do_sample=False, max_new_tokens=3, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert any(not torch.allclose(a, b) for a, b in zip(steered.scores, plain.scores))
