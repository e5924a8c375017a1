"""Hidden-state capture: pooled on the fly, equal to the full states, hooks always removed."""

from __future__ import annotations

import pytest
import torch

from lvlm_safety_plugins import CaptureError, HiddenCapture, get_adapter
from lvlm_safety_plugins.capture import pool
from lvlm_safety_plugins.testing import tiny_llava_batch


def _hook_count(adapter) -> int:
    return sum(len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in adapter.decoder_layers)


@pytest.mark.parametrize("how", ["mean", "last"])
def test_pooled_states_equal_full_hidden_states(tiny_llava, tiny_llava_processor, how):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    layout = adapter.layout(batch)
    masks = {"image": layout.image_mask, "text": layout.text_mask}
    with torch.no_grad():
        tiny_llava(**batch, output_hidden_states=True)  # transformers may add hooks of its own
    before = _hook_count(adapter)
    with torch.no_grad(), HiddenCapture(adapter, [0, 2, -1], masks, pooling=how) as cap:
        out = tiny_llava(**batch, output_hidden_states=True)
    assert cap.layers == [0, 2, 3]
    for name, mask in masks.items():
        for layer in cap.layers:
            full = out.hidden_states[layer + 1]  # hidden_states[0] is the embedding output
            if layer == adapter.num_layers - 1:
                continue  # the last entry of hidden_states is after the final norm
            expect = torch.stack([
                full[b][mask[b]].mean(0) if how == "mean" else full[b][mask[b]][-1] for b in range(full.shape[0])
            ])
            torch.testing.assert_close(cap.pooled[name][layer], expect, rtol=1e-5, atol=1e-6)
    assert cap.stacked("image").shape == (3, 2, 32)
    assert _hook_count(adapter) == before


def test_hooks_removed_after_exception_in_body(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    mask = adapter.layout(batch).image_mask
    tiny_llava(**batch)  # let transformers install any hooks of its own first
    before = _hook_count(adapter)
    with pytest.raises(RuntimeError, match="boom"):
        with HiddenCapture(adapter, None, {"image": mask}):
            assert _hook_count(adapter) == before + adapter.num_layers
            tiny_llava(**batch)
            raise RuntimeError("boom")
    assert _hook_count(adapter) == before


def test_mask_shape_mismatch_names_the_layer(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    wrong = torch.ones(2, 3, dtype=torch.bool)
    before = _hook_count(adapter)
    with pytest.raises(CaptureError, match=r"layer 1: hidden states have shape \(2, \d+\).*mask 'x' has shape \(2, 3\)"):
        with torch.no_grad(), HiddenCapture(adapter, [1], {"x": wrong}):
            tiny_llava(**batch)
    assert _hook_count(adapter) == before
    with pytest.raises(CaptureError, match="layer 9 does not exist"):
        HiddenCapture(adapter, [9])
    with pytest.raises(CaptureError, match="unknown pooling 'max'"):
        HiddenCapture(adapter, [1], pooling="max")


def test_skip_mismatch_keeps_prefill_states_during_generate(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    layout = adapter.layout(batch)
    with torch.no_grad():
        with HiddenCapture(adapter, [1], {"all": layout.attention_mask}, on_mismatch="skip", detach=True) as cap:
            tiny_llava.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with HiddenCapture(adapter, [1], {"all": layout.attention_mask}) as ref:
            tiny_llava(**batch)
    torch.testing.assert_close(cap.pooled["all"][1], ref.pooled["all"][1])


def test_gradients_flow_through_pooled_states(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    mask = adapter.layout(batch).image_mask
    with HiddenCapture(adapter, [2], {"image": mask}) as cap:
        tiny_llava(**batch)
    cap.pooled["image"][2].pow(2).sum().backward()
    grads = [p.grad for p in adapter.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_pool_empty_rows_are_zero():
    h = torch.randn(2, 4, 3)
    m = torch.tensor([[True, False, True, False], [False] * 4])
    for how in ("mean", "last"):
        out = pool(h, m, how)
        assert torch.equal(out[1], torch.zeros(3))
    torch.testing.assert_close(pool(h, m, "mean")[0], (h[0, 0] + h[0, 2]) / 2)
    torch.testing.assert_close(pool(h, m, "last")[0], h[0, 2])


def test_run_stops_after_the_deepest_captured_layer(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    mask = adapter.layout(batch).attention_mask
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(adapter.decoder_layers)]
    try:
        with torch.no_grad():
            with HiddenCapture(adapter, [0, 1], {"all": mask}, detach=True) as early:
                early.run(tiny_llava, **batch)
            assert ran == [0, 1]  # layers 2 and 3 never ran
            with HiddenCapture(adapter, [0, 1], {"all": mask}, detach=True) as full:
                tiny_llava(**batch)
    finally:
        for h in handles:
            h.remove()
    for layer in (0, 1):
        torch.testing.assert_close(early.pooled["all"][layer], full.pooled["all"][layer])


def test_eval_mode_puts_every_module_in_eval_and_gives_each_its_own_flag_back(tiny_llava):
    """Inside the block no module is training; afterwards each module has the flag it
    had (a vision tower frozen in eval mode stays so, where model.train() would flip
    it), also after an error, and also when a module overrides ``train`` (then the
    library calls train/eval instead of setting the flags)."""
    import copy

    from lvlm_safety_plugins.capture import eval_mode

    model = copy.deepcopy(tiny_llava)  # the fixture is shared: its modes are not touched
    model.train()
    frozen = model.model.vision_tower if hasattr(model, "model") and hasattr(model.model, "vision_tower") else \
        model.vision_tower
    frozen.eval()
    before = {name: m.training for name, m in model.named_modules()}
    assert any(before.values()) and not all(before.values())
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == before

    class Counting(torch.nn.Module):  # overrides train: the flags are not set behind its back
        calls = 0

        def train(self, mode=True):
            Counting.calls += 1
            return super().train(mode)

    model.add_module("counting", Counting())
    before = {name: m.training for name, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before and Counting.calls >= 2
