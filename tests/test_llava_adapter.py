"""The adapter for the LLaVA framework's own model, against the real ``llava`` package
(runs in the LLaVA test environment; skipped where llava-torch is not installed)."""

from __future__ import annotations

import pytest
import torch

llava = pytest.importorskip("llava.model", reason="needs the LLaVA framework (pip install --no-deps llava-torch)")

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402

from lvlm_safety_plugins import get_adapter  # noqa: E402
from lvlm_safety_plugins.adapters.llava_pkg import LlavaPackageAdapter  # noqa: E402
from lvlm_safety_plugins.testing import build_tiny_llava_package_model, decoder_input  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava_package_model()


@pytest.mark.parametrize("side", ["right", "left"])
def test_layout_matches_llava_splice(model, side):
    model.config.tokenizer_padding_side = side
    adapter = get_adapter(model)
    assert isinstance(adapter, LlavaPackageAdapter)
    assert adapter.num_layers == 3 and adapter.hidden_size == 32
    assert adapter.projector is model.get_model().mm_projector
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9], [5, 6, IMAGE_TOKEN_INDEX, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    images = torch.randn(2, 3, 28, 28)
    layout = adapter.layout({"input_ids": ids, "attention_mask": attn})
    x = decoder_input(model, input_ids=ids, attention_mask=attn, images=images)
    assert x.shape[:2] == layout.image_mask.shape
    with torch.no_grad():
        feats = model.encode_images(images)  # LLaVA's own projector output
    for row in range(2):
        torch.testing.assert_close(x[row][layout.image_mask[row]], feats[row], rtol=1e-5, atol=1e-5)
    assert layout.attention_mask.sum(1).tolist() == [4 + 4, 2 + 4]
    first_real = layout.attention_mask[1].float().argmax().item()
    assert (first_real == 0) == (side == "right")
    model.config.tokenizer_padding_side = "right"


def test_text_only_and_blank(model):
    adapter = get_adapter(model)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "images": torch.randn(1, 3, 28, 28)}
    text = adapter.text_only_batch(batch)
    assert text["input_ids"].tolist() == [[5, 7]] and "images" not in text
    with torch.no_grad():
        assert model(**text).logits.shape == (1, 2, 64)
    blank = adapter.blank_image_batch(batch)
    assert torch.equal(blank["images"], torch.zeros(1, 3, 28, 28))
    assert not bool(adapter.layout(text).image_mask.any())


def test_anyres_is_refused(model):
    adapter = get_adapter(model)
    model.config.mm_patch_merge_type = "spatial_unpad"
    try:
        with pytest.raises(Exception, match="only 'flat'"):
            adapter.layout({"input_ids": torch.tensor([[IMAGE_TOKEN_INDEX]])})
    finally:
        model.config.mm_patch_merge_type = "flat"


def test_token_mask_maps_into_llava_sequence(model):
    adapter = get_adapter(model)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8], [0, 5, IMAGE_TOKEN_INDEX, 7]])
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    layout = adapter.layout({"input_ids": ids, "attention_mask": attn})
    mapped = layout.map_token_mask(ids == 7)
    x = decoder_input(model, input_ids=ids, attention_mask=attn, images=torch.randn(2, 3, 28, 28))
    emb = model.get_input_embeddings().weight[7].detach()
    assert int(mapped.sum()) == 2
    for row in range(2):
        torch.testing.assert_close(x[row][mapped[row]][0], emb)
