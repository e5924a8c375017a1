"""Model adapters on real tiny models (transformers 5.x here; the CI's second
environment runs the same tests on transformers 4.37.2)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from lvlm_safety_plugins import UnsupportedModelError, get_adapter
from lvlm_safety_plugins.adapters import layer_hidden
from lvlm_safety_plugins.adapters.hf import HFLlavaAdapter
from lvlm_safety_plugins.testing import SPECIAL_TOKENS, decoder_input, processor_expands_image_tokens, tiny_llava_batch

IMAGE_ID = SPECIAL_TOKENS.index("<image>")
TF_MAJOR = int(transformers.__version__.split(".")[0])


def _image_features(model, pixel_values):
    with torch.no_grad():
        if hasattr(model, "get_image_features") and TF_MAJOR >= 5:
            feats = model.get_image_features(pixel_values=pixel_values)
            feats = getattr(feats, "pooler_output", feats)
            return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        tower = model.vision_tower(pixel_values, output_hidden_states=True)
        selected = tower.hidden_states[model.config.vision_feature_layer][:, 1:]
        return model.multi_modal_projector(selected)


def test_structure(tiny_llava):
    adapter = get_adapter(tiny_llava)
    assert isinstance(adapter, HFLlavaAdapter)
    assert adapter.num_layers == 4 == len(adapter.decoder_layers)
    assert adapter.hidden_size == 32
    assert adapter.projector is (tiny_llava.model.multi_modal_projector if TF_MAJOR >= 5 else tiny_llava.multi_modal_projector)
    assert adapter.image_token_id == IMAGE_ID
    assert adapter.resolve_layers([-1, 0]) == [3, 0]
    with pytest.raises(IndexError, match="layer 4 does not exist.*4 decoder layers"):
        adapter.resolve_layers([4])
    assert adapter.describe()["projector"] == type(adapter.projector).__name__


def test_layer_output_type_is_probed(tiny_llava, tiny_llava_processor):
    """Decoder layers return tuples up to 4.53 and tensors from 4.54; layer_hidden reads both."""
    adapter = get_adapter(tiny_llava)
    outs = []
    h = adapter.decoder_layers[1].register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with torch.no_grad():
            tiny_llava(**tiny_llava_batch(tiny_llava_processor))
    finally:
        h.remove()
    from lvlm_safety_plugins.compat import transformers_version

    assert isinstance(outs[0], torch.Tensor if transformers_version() >= (4, 54) else tuple)
    assert layer_hidden(outs[0]).shape[-1] == 32


def test_image_positions_hold_the_projected_features(tiny_llava, tiny_llava_processor):
    """The layout's image mask marks exactly where the projector output enters the LLM,
    in the LLM's own sequence (expanded by the model itself on transformers 4.37)."""
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    layout = adapter.layout(batch)
    x = decoder_input(tiny_llava, **batch)
    assert x.shape[:2] == layout.image_mask.shape
    feats = _image_features(tiny_llava, batch["pixel_values"])  # [images, patches, hidden]
    for row in range(x.shape[0]):
        got = x[row][layout.image_mask[row]]
        torch.testing.assert_close(got, feats[row], rtol=1e-5, atol=1e-5)
    # every real text token is marked real, padding is not
    assert int(layout.attention_mask.sum()) == int(batch["attention_mask"].sum()) + (
        0 if processor_expands_image_tokens(tiny_llava_processor) else 2 * (feats.shape[1] - 1)
    )
    assert bool((layout.text_mask & layout.image_mask).sum() == 0)
    assert torch.equal(adapter.image_token_mask(batch), layout.image_mask)


def test_text_only_batch(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    text = adapter.text_only_batch(batch)
    assert "pixel_values" not in text
    assert not bool((text["input_ids"] == IMAGE_ID).any())
    # same real tokens in the same order, minus the image placeholders, left padded
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        expect = ids[ids != IMAGE_ID]
        got = text["input_ids"][row][text["attention_mask"][row].bool()]
        assert torch.equal(got, expect)
        assert text["attention_mask"][row, -1] == 1  # left padding kept
    with torch.no_grad():
        out = tiny_llava(**text)
    assert out.logits.shape[:2] == text["input_ids"].shape
    # text-only: no image positions anywhere
    assert not bool(adapter.layout(text).image_mask.any())


def test_blank_and_noise_batches(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    blank = adapter.blank_image_batch(batch)
    assert torch.equal(blank["pixel_values"], torch.zeros_like(batch["pixel_values"]))
    grey = adapter.blank_image_batch(batch, image_processor=tiny_llava_processor.image_processor, fill=128)
    px = grey["pixel_values"]
    # a constant image: every pixel of a channel equal, and both images identical
    assert torch.allclose(px, px[:, :, :1, :1].expand_as(px))
    assert torch.equal(px[0], px[1])
    noise1 = adapter.blank_image_batch(batch, "noise", seed=3)["pixel_values"]
    noise2 = adapter.blank_image_batch(batch, "noise", seed=3)["pixel_values"]
    assert torch.equal(noise1, noise2) and not torch.equal(noise1, batch["pixel_values"])
    assert torch.equal(blank["input_ids"], batch["input_ids"])
    with torch.no_grad():
        a = tiny_llava(**batch).logits
        b = tiny_llava(**blank).logits
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown reference image kind 'red'"):
        adapter.blank_image_batch(batch, "red")


def test_unsupported_model_lists_families():
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(nn.Linear(2, 2))
    msg = str(info.value)
    assert "no adapter for Linear" in msg
    for family in ("HF Llava", "HF LlavaNext", "LLaVA (llava package)"):
        assert family in msg


@pytest.mark.skipif(TF_MAJOR < 5, reason="LlavaNext placeholders are expanded by the processor from 4.45 on")
def test_llava_next_adapter():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from lvlm_safety_plugins.testing import tiny_llava_config

    base = tiny_llava_config()
    cfg = LlavaNextConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[28, 28]],
        vision_feature_layer=-1,
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    adapter = get_adapter(model)
    assert adapter.family == "HF LlavaNext"
    assert adapter.num_layers == 4 and adapter.hidden_size == 32
    assert adapter.projector is model.model.multi_modal_projector
    ids = torch.tensor([[5, IMAGE_ID, IMAGE_ID, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(1, 2, 3, 28, 28), "image_sizes": torch.tensor([[28, 28]])}
    assert adapter.image_token_mask(batch).tolist() == [[False, True, True, False]]
    text = adapter.text_only_batch(batch)
    assert text["input_ids"].tolist() == [[5, 7]] and "image_sizes" not in text


@pytest.mark.skipif(TF_MAJOR < 5, reason="Qwen2-VL needs a newer transformers than 4.37")
def test_qwen2vl_adapter():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=60, vision_start_token_id=61, vision_end_token_id=62, bos_token_id=2, eos_token_id=3,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    adapter = get_adapter(model)
    assert adapter.family == "HF Qwen2-VL" and adapter.num_layers == 3 and adapter.hidden_size == 32
    assert adapter.projector is model.model.visual.merger
    ids = torch.tensor([[0, 0, 5, 61, 60, 60, 62, 7]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": torch.zeros(8, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    assert adapter.image_token_mask(batch)[0].tolist() == [False] * 4 + [True, True] + [False] * 2
    text = adapter.text_only_batch(batch)
    # image placeholders and the vision start/end markers are gone; padding stays left
    assert text["input_ids"].tolist() == [[0, 0, 5, 7]]
    assert text["attention_mask"].tolist() == [[0, 0, 1, 1]]
    assert "pixel_values" not in text and "image_grid_thw" not in text


def test_text_only_causal_lm_adapter(tiny_llava):
    """A plain decoder LLM (the Llava's own language model rebuilt as a causal LM)."""
    from transformers import LlamaForCausalLM

    from lvlm_safety_plugins.adapters.hf import HFCausalLMAdapter

    llm = LlamaForCausalLM(tiny_llava.config.text_config).eval()
    adapter = get_adapter(llm)
    assert isinstance(adapter, HFCausalLMAdapter)
    assert adapter.num_layers == 4 and adapter.hidden_size == 32
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    layout = adapter.layout(batch)
    assert not bool(layout.image_mask.any()) and layout.attention_mask.tolist() == [[False, True, True], [True] * 3]
    assert torch.equal(adapter.text_only_batch(batch)["input_ids"], ids)
    with pytest.raises(UnsupportedModelError, match="no projector"):
        adapter.projector
    with pytest.raises(UnsupportedModelError, match="text-only model"):
        adapter.blank_image_batch(batch)


def test_token_masks_map_into_decoder_coordinates(tiny_llava, tiny_llava_processor):
    """A mask over input_ids (here: the word 'what') lands on the same token's decoder
    position, also when the model splices image features in (transformers 4.37)."""
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    word = tiny_llava_processor.tokenizer.convert_tokens_to_ids("what")
    mask = batch["input_ids"] == word
    layout = adapter.layout(batch)
    mapped = layout.map_token_mask(mask)
    assert int(mapped.sum()) == int(mask.sum()) == 1
    # the embedding entering layer 0 at the mapped position is the word's embedding
    x = decoder_input(tiny_llava, **batch)
    emb = tiny_llava.get_input_embeddings().weight[word]
    torch.testing.assert_close(x[mapped][0], emb.detach())
    assert not bool((mapped & layout.image_mask).any())
