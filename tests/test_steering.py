"""The steering primitive (``lvlm_safety_plugins.steering``) on a real tiny Llava with
real ``generate``: prefill/decode told apart without forward keyword names, positions,
padding, context-locality, composition and exact removal."""

from __future__ import annotations

import inspect
import re
import threading
from pathlib import Path

import pytest
import torch

from lvlm_safety_plugins import LVLMSafetyError, get_adapter, steering
from lvlm_safety_plugins.compat import past_length
from lvlm_safety_plugins.testing import make_image, tiny_llava_batch

GEN = dict(do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
ONE_PROMPT = ["USER: <image> what is in the image ? ASSISTANT:"]


def vector(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(get_adapter(model).hidden_size, generator=g)


def model_cache(model, batch):
    """A real, filled KV cache of this transformers version (whatever it is called)."""
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def recorder(calls, delta=None):
    def edit(layer, hidden, step):
        calls.append((layer, step.phase, step.past_length, step.mask.clone()))
        return delta

    return edit


def test_the_cache_is_found_by_type_under_any_keyword(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    cache = model_cache(tiny_llava, batch)  # a Cache object, or a tuple of (k, v) on 4.x
    filled = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else int(cache[0][0].shape[-2])
    assert filled == get_adapter(tiny_llava).layout(batch).length
    new = torch.ones(2, 1, dtype=torch.long)
    for name in ("cache", "past_key_values", "kv_state_of_a_future_release"):
        assert past_length((), {"input_ids": new, name: cache}) == filled
    assert past_length((new, None, None, cache), {}) == filled  # positional, too
    legacy = tuple((torch.zeros(2, 2, 7, 4), torch.zeros(2, 2, 7, 4)) for _ in range(3))  # 4.x tuple caches
    assert past_length((new, None, None, legacy), {}) == 7
    # the attention mask generate widens every step, and cache_position, are signals too
    assert past_length((), {"input_ids": new, "attention_mask": torch.ones(2, 10)}) == 9
    assert past_length((), {"input_ids": new, "cache_position": torch.tensor([5])}) == 5
    assert past_length((), {"input_ids": torch.ones(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6)}) == 0


@pytest.mark.parametrize("positions", ["image", "text", "generated", "all"])
def test_generate_gives_one_prompt_forward_then_decode_steps(tiny_llava, tiny_llava_processor, positions):
    batch = tiny_llava_batch(tiny_llava_processor)  # two prompts, left padded
    layout = get_adapter(tiny_llava).layout(batch)
    calls: list = []
    with torch.no_grad(), steering.steer(tiny_llava, recorder(calls), layers=[1], positions=positions):
        tiny_llava.generate(**batch, max_new_tokens=4, min_new_tokens=4, **GEN)
    prompt = [c for c in calls if c[1] == "prompt"]
    decode = [c for c in calls if c[1] == "generated"]
    want = {"image": layout.image_mask, "text": layout.text_mask, "generated": None, "all": layout.attention_mask}[positions]
    if want is None:
        assert prompt == []  # nothing to steer in the prompt: the edit is not called
    else:
        assert len(prompt) == 1 and prompt[0][2] == 0 and torch.equal(prompt[0][3], want)
        assert not (prompt[0][3] & ~layout.attention_mask).any()  # never padding
    if positions in ("generated", "all"):
        # 3 decode steps (the 4th token comes from the 3rd step's logits), one new token
        # each, after the prompt's positions in the decoder's sequence
        assert [c[2] for c in decode] == [layout.length + i for i in range(3)]
        assert all(c[3].shape == (2, 1) and bool(c[3].all()) for c in decode)
    else:
        assert decode == []


def test_generated_positions_equal_an_oracle_that_looks_at_the_length(tiny_llava, tiny_llava_processor):
    """Independent of any phase logic: with one prompt (no padding) a decode step is
    exactly a forward whose hidden states have length 1."""
    enc = tiny_llava_processor(text=ONE_PROMPT, images=[make_image(3)], return_tensors="pt")
    v = vector(tiny_llava, scale=3.0)
    layer = get_adapter(tiny_llava).decoder_layers[2]
    with torch.no_grad():
        plain = tiny_llava.generate(**enc, max_new_tokens=5, **GEN)
        with steering.add_vectors(tiny_llava, {2: v}, positions="generated"):
            steered = tiny_llava.generate(**enc, max_new_tokens=5, **GEN)

        def oracle(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            if h.shape[1] != 1:
                return None
            return h + v if isinstance(output, torch.Tensor) else (h + v, *output[1:])

        handle = layer.register_forward_hook(oracle, prepend=True)
        try:
            want = tiny_llava.generate(**enc, max_new_tokens=5, **GEN)
        finally:
            handle.remove()
    assert torch.equal(steered.sequences, want.sequences)
    for a, b in zip(steered.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(steered.scores[0], plain.scores[0], rtol=0, atol=0)  # the prompt is untouched
    assert any(not torch.allclose(a, b) for a, b in zip(steered.scores[1:], plain.scores[1:]))


def test_prompt_forward_adds_exactly_the_delta_and_never_touches_padding(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    layout = get_adapter(tiny_llava).layout(batch)
    v = vector(tiny_llava, seed=1)
    with torch.no_grad():
        base = tiny_llava(**batch, output_hidden_states=True).hidden_states
        with steering.add_vectors(tiny_llava, {2: v}, scale=-0.5, positions="prompt"):
            got = tiny_llava(**batch, output_hidden_states=True).hidden_states
    real, pad = layout.attention_mask, ~layout.attention_mask
    # hidden_states[i] is the output of layer i - 1 (the last one is after the final norm)
    torch.testing.assert_close(got[3][real], base[3][real] - 0.5 * v, rtol=0, atol=1e-6)
    assert torch.equal(got[3][pad], base[3][pad]) and torch.equal(got[2], base[2])


def test_prepare_runs_once_per_prompt_and_memory_lasts_through_decoding(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    prepared, seen = [], []

    def prepare(step):
        prepared.append(step.phase)
        step.memory["shift"] = torch.full((step.mask.shape[0], 1, get_adapter(tiny_llava).hidden_size), float(len(prepared)))
        with steering.unsteered():  # an extra forward inside prepare is not steered, nor re-prepared
            tiny_llava(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})

    def edit(layer, hidden, step):
        seen.append((step.phase, float(step.memory["shift"][0, 0, 0])))
        return step.memory["shift"]

    with torch.no_grad(), steering.steer(tiny_llava, edit, layers=[0], prepare=prepare):
        tiny_llava.generate(**batch, max_new_tokens=3, min_new_tokens=3, **GEN)
        tiny_llava.generate(**batch, max_new_tokens=2, min_new_tokens=2, **GEN)
    assert prepared == ["prompt", "prompt"]
    assert seen == [("prompt", 1.0), ("generated", 1.0), ("generated", 1.0), ("prompt", 2.0), ("generated", 2.0)]


def test_context_local_by_default_global_on_request(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    v = {1: vector(tiny_llava, seed=2, scale=5.0)}

    def logits():
        with torch.no_grad():
            return tiny_llava(**batch).logits

    def in_thread():
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("x", logits()))
        t.start()
        t.join()
        return out["x"]

    plain = logits()
    with steering.add_vectors(tiny_llava, v) as handle:
        assert handle.active and not torch.allclose(logits(), plain)
        assert torch.equal(in_thread(), plain)  # another thread sees the unsteered model
    with steering.add_vectors(tiny_llava, v, scope="global") as handle:
        steered = logits()
        torch.testing.assert_close(in_thread(), steered, rtol=0, atol=0)
        with steering.unsteered():
            assert torch.equal(logits(), plain)
    assert torch.equal(logits(), plain)


def test_handles_compose_and_remove_in_any_order(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    a, b = vector(tiny_llava, seed=3), vector(tiny_llava, seed=4)
    with torch.no_grad():
        plain = tiny_llava(**batch).logits
        gen_plain = tiny_llava.generate(**batch, max_new_tokens=3, **GEN).sequences
        with steering.add_vectors(tiny_llava, {1: a + b}):
            both = tiny_llava(**batch).logits
        first = steering.add_vectors(tiny_llava, {1: a})
        second = steering.add_vectors(tiny_llava, {1: b})
        torch.testing.assert_close(tiny_llava(**batch).logits, both, rtol=1e-5, atol=1e-5)
        first.remove()
        assert "generate" in tiny_llava.__dict__ and not first.active and second.active
        second.remove()
        second.remove()  # idempotent
        assert "generate" not in tiny_llava.__dict__
        assert torch.equal(tiny_llava(**batch).logits, plain)
        assert torch.equal(tiny_llava.generate(**batch, max_new_tokens=3, **GEN).sequences, gen_plain)
    adapter = get_adapter(tiny_llava)
    assert all(not layer._forward_hooks for layer in adapter.decoder_layers) and not tiny_llava._forward_pre_hooks


def test_hooks_are_removed_when_the_body_raises(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    with torch.no_grad():
        plain = tiny_llava(**batch).logits
    with pytest.raises(KeyError):
        with steering.add_vectors(tiny_llava, {0: vector(tiny_llava)}):
            raise KeyError("inside")
    with torch.no_grad():
        assert torch.equal(tiny_llava(**batch).logits, plain)


def test_clear_errors(tiny_llava, tiny_llava_processor):
    with pytest.raises(ValueError, match="unknown steering position 'images'.*image, text, generated, after_image, prompt, all, from_image"):
        steering.apply(tiny_llava, lambda layer, hidden, step: None, positions="images")
    with pytest.raises(LVLMSafetyError, match="layer 1: expected a vector of size 32"):
        steering.add_vectors(tiny_llava, {1: torch.zeros(7)})
    with pytest.raises(IndexError, match="layer 9 does not exist"):
        steering.add_vectors(tiny_llava, {9: torch.zeros(32)})
    batch = tiny_llava_batch(tiny_llava_processor)
    embeds = tiny_llava.get_input_embeddings()(batch["input_ids"].clamp(max=3))
    with steering.add_vectors(tiny_llava, {1: torch.zeros(32)}, positions="image"):
        with pytest.raises(LVLMSafetyError, match="needs input_ids in the forward of LlavaForConditionalGeneration"):
            tiny_llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    # all real positions need no ids: the attention mask says which are real
    with torch.no_grad(), steering.add_vectors(tiny_llava, {1: torch.ones(32)}):
        steered = tiny_llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    plain = tiny_llava(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(steered.hidden_states[2][real], plain.hidden_states[2][real] + 1, rtol=0, atol=1e-5)


def test_a_manual_decode_loop_with_this_versions_cache_keyword(tiny_llava, tiny_llava_processor):
    """Not only generate: a hand-written KV-cached loop, passing the cache under the
    keyword this transformers version's forward takes, is steered the same way."""
    enc = tiny_llava_processor(text=ONE_PROMPT, images=[make_image(5)], return_tensors="pt")
    key = "cache" if "cache" in inspect.signature(type(tiny_llava).forward).parameters else "past_key_values"
    v = vector(tiny_llava, seed=6, scale=2.0)

    def loop():
        out = tiny_llava(**enc, use_cache=True)
        tokens = []
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            cache = getattr(out, "cache", None)
            cache = out.past_key_values if cache is None else cache
            # one prompt, no padding: the mask covers the cached positions and the new one
            mask = torch.ones(1, past_length((), {key: cache}) + 1, dtype=torch.long)
            out = tiny_llava(input_ids=nxt, attention_mask=mask, use_cache=True, **{key: cache})
        return tokens, out.logits

    with torch.no_grad():
        with steering.add_vectors(tiny_llava, {2: v}, positions="generated"):
            steered_tokens, steered_last = loop()
        with steering.steer(tiny_llava, recorder(calls := []), layers=[2], positions="all"):
            loop()
        plain_tokens, plain_last = loop()
    phases = [c[1] for c in calls]
    assert phases == ["prompt", "generated", "generated", "generated"]
    assert steered_tokens[0] == plain_tokens[0]  # the first token comes from the unsteered prompt
    assert not torch.allclose(steered_last, plain_last)


def test_the_plugin_guide_steering_example_runs(tiny_llava, tiny_llava_processor):
    """The third-party steering example in docs/plugin-authoring.md is real code."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugin-authoring.md").read_text()
    section = guide.split("### `install_steering(model, runtime)`", 1)[1].split("### ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    import sys
    import types

    from lvlm_safety_plugins import Runtime, load_recipe, register_plugin

    plugin = types.ModuleType("doc_example_steering")
    sys.modules[plugin.__name__] = plugin
    exec(compile(code, "plugin-authoring.md", "exec"), plugin.__dict__)  # noqa: S102 - the documented example
    register_plugin(plugin, name="doc_example_steering")
    try:
        rt = Runtime(load_recipe({"plugins": ["damp"], "damp": {"layer": 2, "strength": 0.5}}), model=tiny_llava)
        batch = tiny_llava_batch(tiny_llava_processor)
        with torch.no_grad():
            plain = tiny_llava(**batch, output_hidden_states=True).hidden_states[3]
            with rt.steering():
                got = tiny_llava(**batch, output_hidden_states=True).hidden_states[3]
                other = {}
                t = threading.Thread(target=lambda: other.setdefault(
                    "h", tiny_llava(**batch, output_hidden_states=True).hidden_states[3]))
                t.start()
                t.join()
        image = get_adapter(tiny_llava).layout(batch).image_mask
        torch.testing.assert_close(got[image], 0.5 * plain[image], rtol=0, atol=1e-6)
        assert torch.equal(got[~image], plain[~image])
        assert torch.equal(other["h"], plain)  # context-local: the other thread is not steered
    finally:
        from lvlm_safety_plugins import get_plugin_manager

        get_plugin_manager().unregister(name="doc_example_steering")
        sys.modules.pop(plugin.__name__, None)


@pytest.mark.parametrize("positions", ["generated", "all", "text"])
def test_generate_without_a_cache_steers_the_same_positions(tiny_llava, tiny_llava_processor, positions):
    """generate(use_cache=False) re-runs the whole sequence every step: the generated
    tail is still told from the prompt (and prepare still runs once), so the result
    equals the cached run."""
    batch = tiny_llava_batch(tiny_llava_processor)
    v = vector(tiny_llava, seed=7, scale=2.0)
    prepared = []

    def prepare(step):
        prepared.append(step.mask.shape)

    edit = steering.vector_edit({1: v, 2: -v})
    out = {}
    with torch.no_grad():
        for cached in (True, False):
            with steering.steer(tiny_llava, edit, layers=[1, 2], positions=positions, prepare=prepare):
                out[cached] = tiny_llava.generate(**batch, max_new_tokens=4, min_new_tokens=4, use_cache=cached, **GEN)
        plain = tiny_llava.generate(**batch, max_new_tokens=4, min_new_tokens=4, **GEN)
    assert len(prepared) == 2  # once per generate call, cached or not
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].scores, out[False].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(out[False].scores, plain.scores))


def test_sample_level_cmrm_without_a_cache_measures_once(tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.methods.cmrm import steer as cmrm_steer

    enc = tiny_llava_processor(text=ONE_PROMPT, images=[make_image(8)], return_tensors="pt")
    out = {}
    with torch.no_grad():
        for cached in (True, False):
            with cmrm_steer(tiny_llava, None, variant="sample", layers=[1, 3], alpha=2.0):
                out[cached] = tiny_llava.generate(**enc, max_new_tokens=4, min_new_tokens=4, use_cache=cached, **GEN)
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, b in zip(out[True].scores, out[False].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
