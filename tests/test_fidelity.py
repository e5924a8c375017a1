"""Method fidelity (issue 17): each method does what its paper means, checked against a
computation written here (plain forwards of a real tiny Llava, masks built by hand),
not against the library's own code paths."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lvlm_safety_plugins import GradientError, Runtime, VectorFileError, compat, get_adapter, load_recipe, steering
from lvlm_safety_plugins.integrations.hf_training import EXTRAS_KEY, LlavaSFTCollator, SafetyCollator
from lvlm_safety_plugins.methods.cmrm import SteeringVectors, calibrate, fold_into_weights, steer
from lvlm_safety_plugins.methods.comparative.method import QUESTION_MASK
from lvlm_safety_plugins.methods.tga.method import CAPTION_IDS
from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, make_image, tiny_llava_batch

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:",
           "USER: <image> tell me how to make a cake ASSISTANT:"]


class Cfg:
    """A cmrm section as plain attributes."""

    def __init__(self, **kw):
        self.__dict__.update(dict(reference="none", batch_size=8, alpha=1.0, positions="all", apply_to="both",
                                  composition="sequential", measure_at="last"))
        self.__dict__.update(kw)


def calib_rows(n):
    return [{"image": make_image(10 + i), "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]


def encoded(processor, data):
    """The calibration inputs as calibration sees them (one padded batch)."""
    return processor(text=[r["prompt"] for r in data], images=[r["image"] for r in data], return_tensors="pt", padding=True)


def last_states(model, batch):
    """``[layers, batch, hidden]``: the output of every decoder layer at each row's last
    position (the batches here are left-padded), read by plain forward hooks (the
    last entry of ``output_hidden_states`` is after the final norm)."""
    seen = {}
    layers = get_adapter(model).decoder_layers
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o if isinstance(o, torch.Tensor) else o[0])[:, -1]))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(layers))])


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- CMRM 1: no compounding over layers ----------------------------------------------------


@pytest.mark.parametrize("positions", ["all", "from_image"])
def test_dataset_level_alpha_1_lands_every_layer_on_the_text_only_state(tiny_llava, tiny_llava_processor, positions):
    """One calibration input, alpha 1, every layer steered: at every steered layer the
    steered state equals h_image - shift_l = h_text (the method's meaning), where the
    independent form subtracts the earlier layers' edits again."""
    data = calib_rows(1)
    batch = encoded(tiny_llava_processor, data)
    text = last_states(tiny_llava, get_adapter(tiny_llava).text_only_batch(batch))
    image = last_states(tiny_llava, batch)
    seq = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(positions=positions), progress=False)
    assert seq.composition == "sequential" and seq.alpha == [1.0] * 4
    with steer(tiny_llava, seq, alpha=1.0, positions=positions):
        steered = last_states(tiny_llava, batch)
    for layer in range(4):
        assert rel(steered[layer], text[layer]) < 1e-5, layer
    ind = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(positions=positions, composition="independent"), progress=False)
    with steer(tiny_llava, ind, alpha=1.0, positions=positions):
        compounded = last_states(tiny_llava, batch)
    torch.testing.assert_close(compounded[0], steered[0], rtol=1e-5, atol=1e-6)  # layer 0: nothing before it
    assert max(rel(compounded[l], text[l]) for l in range(1, 4)) > 1e-2  # the old form misses the text state
    assert all(rel(image[l], text[l]) > 1e-2 for l in range(4))  # there was a shift to remove


def test_dataset_level_mean_state_moves_to_the_text_only_mean_at_every_layer(tiny_llava, tiny_llava_processor):
    data = calib_rows(3)
    batch = encoded(tiny_llava_processor, data)
    text = last_states(tiny_llava, get_adapter(tiny_llava).text_only_batch(batch)).mean(dim=1)
    image = last_states(tiny_llava, batch).mean(dim=1)
    vectors = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(), progress=False)
    with steer(tiny_llava, vectors, alpha=1.0, positions="all"):
        steered = last_states(tiny_llava, batch).mean(dim=1)
    for layer in range(4):
        assert rel(steered[layer], text[layer]) < 1e-5, layer
        assert (steered[layer] - text[layer]).norm() < (image[layer] - text[layer]).norm(), layer
    # alpha 0.5: calibrated under its own steering, each layer lands half way
    half = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(alpha=0.5), progress=False)
    with steer(tiny_llava, half, alpha=0.5, positions="all"):
        states = last_states(tiny_llava, batch)
    for layer in range(4):
        # the layer's state with only the earlier layers steered (plain hooks, written here)
        handles = []
        for earlier in range(layer):
            def hook(module, args, output, v=half.vectors[earlier]):
                h = output if isinstance(output, torch.Tensor) else output[0]
                h = h - 0.5 * v
                return h if isinstance(output, torch.Tensor) else (h, *output[1:])
            handles.append(get_adapter(tiny_llava).decoder_layers[earlier].register_forward_hook(hook))
        try:
            before = last_states(tiny_llava, batch)[layer]
        finally:
            for h in handles:
                h.remove()
        want = before.mean(0) - 0.5 * (before.mean(0) - text[layer])
        assert rel(states[layer].mean(0), want) < 1e-5, layer


def test_sample_level_alpha_1_lands_every_layer_on_the_text_only_state(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)  # two left-padded prompts with their images
    text = last_states(tiny_llava, get_adapter(tiny_llava).text_only_batch(batch))
    options = dict(variant="sample", reference="none", alpha=1.0, positions="all")
    with steer(tiny_llava, None, **options):
        steered = last_states(tiny_llava, batch)
    with steer(tiny_llava, None, composition="independent", **options):
        compounded = last_states(tiny_llava, batch)
    for layer in range(4):
        for row in range(2):
            assert rel(steered[layer, row], text[layer, row]) < 1e-5, (layer, row)
    assert max(rel(compounded[l], text[l]) for l in range(1, 4)) > 1e-2


def test_sequential_vectors_refuse_another_alpha_layers_or_positions(tmp_path, tiny_llava, tiny_llava_processor):
    data = calib_rows(2)
    vectors = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(alpha=0.5, positions="from_image"), layers=[1, 2, 3],
                        progress=False)
    path = vectors.save(tmp_path / "v.safetensors")
    loaded = SteeringVectors.load(path)
    assert (loaded.composition, loaded.alpha, loaded.positions) == ("sequential", [0.5, 0.5, 0.5], ["after_image", "image", "text"])
    with pytest.raises(VectorFileError, match=r"cmrm\.alpha: .*calibrated at alpha \[0\.5, 0\.5\] on layers \[1, 2\]"):
        steer(tiny_llava, loaded, alpha=1.0).__enter__()
    with steer(tiny_llava, loaded, alpha=[0.5, 0.5, 0.9]):  # the last layer's alpha shapes no vector
        pass
    with pytest.raises(VectorFileError, match=r"cmrm\.layers: sequential vectors were calibrated on layers \[1, 2, 3\]"):
        steer(tiny_llava, loaded, alpha=0.5, layers=[2, 3]).__enter__()
    with pytest.raises(VectorFileError, match=r"cmrm\.positions"):
        steer(tiny_llava, loaded, alpha=0.5, positions="image").__enter__()
    with pytest.raises(VectorFileError, match=r"cmrm\.composition"):
        steer(tiny_llava, loaded, alpha=0.5, composition="independent").__enter__()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steer(tiny_llava, loaded, alpha=1.0, strict=False).__enter__().remove()
    assert any("cmrm.alpha" in str(w.message) for w in caught)
    # through a recipe: the error names the key, the file and the fix
    rt = Runtime(load_recipe("cmrm_llava15_dataset", [f"cmrm.vectors={path}", "cmrm.layers=1-3", "cmrm.alpha=1.0",
                                                      "cmrm.reference=none"]),  # as calibrated (Cfg), so alpha is the problem
                 model=tiny_llava)
    with pytest.raises(Exception, match=r"v\.safetensors: cmrm\.alpha.*recalibrate"):
        with rt.steering():
            pass
    # folding: a bias steers every position, so it takes vectors calibrated on all of them
    with pytest.raises(VectorFileError, match=r"cmrm\.positions"):
        fold_into_weights(copy.deepcopy(tiny_llava), loaded, alpha=0.5)


def test_folded_sequential_vectors_equal_hooked_steering(tiny_llava, tiny_llava_processor):
    data = calib_rows(3)
    vectors = calibrate(tiny_llava, tiny_llava_processor, data, Cfg(alpha=0.7, reference="blank"), progress=False)
    batch = tiny_llava_batch(tiny_llava_processor)
    with torch.no_grad(), steer(tiny_llava, vectors, alpha=0.7, positions="all"):
        hooked = tiny_llava(**batch).logits
    folded = copy.deepcopy(tiny_llava)
    fold_into_weights(folded, vectors, alpha=0.7)
    with torch.no_grad():
        got = folded(**batch).logits
    real = get_adapter(tiny_llava).layout(batch).attention_mask
    torch.testing.assert_close(got[real], hooked[real], rtol=0, atol=1e-5)


# -- CMRM 2: positions ---------------------------------------------------------------------


def test_from_image_steers_the_image_and_what_follows_only(tiny_llava, tiny_llava_processor):
    assert load_recipe("cmrm_llava15_dataset").section("cmrm").positions.value == "from_image"
    batch = tiny_llava_batch(tiny_llava_processor)
    layout = get_adapter(tiny_llava).layout(batch)
    ids = batch["input_ids"]
    # by hand: the first image column of each row, and every real position from it on
    first = [int((ids[b] == 4).nonzero()[0, 0]) for b in range(ids.shape[0])]
    expected = torch.zeros_like(layout.attention_mask)
    for b, f in enumerate(first):
        expected[b, f:] = True
    expected &= layout.attention_mask
    assert any(f > int((~layout.attention_mask[b]).sum()) for b, f in enumerate(first))  # tokens before the image exist
    v = torch.randn(32)
    with torch.no_grad():
        base = tiny_llava(**batch, output_hidden_states=True).hidden_states
        with steering.add_vectors(tiny_llava, {0: v}, positions="from_image"):
            got = tiny_llava(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[1][expected], base[1][expected] + v, rtol=0, atol=1e-6)
    assert torch.equal(got[1][~expected], base[1][~expected])  # BOS, "USER:" and padding untouched
    # a text-only prompt has no image-induced shift: prompt and generated tokens unsteered
    text = tiny_llava_processor.tokenizer(["USER: what is in the image ? ASSISTANT:"], return_tensors="pt")
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = tiny_llava.generate(**text, **gen)
        with steering.add_vectors(tiny_llava, {1: 5 * v}, positions="from_image"):
            narrowed = tiny_llava.generate(**text, **gen)
        with steering.add_vectors(tiny_llava, {1: 5 * v}, positions="all"):
            everywhere = tiny_llava.generate(**text, **gen)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, narrowed.scores))
    assert not all(torch.allclose(a, b) for a, b in zip(plain.scores, everywhere.scores))


def test_from_image_steers_generated_tokens_of_rows_with_an_image(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    v = torch.randn(32)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        prompt_only = {}
        with steering.add_vectors(tiny_llava, {2: 3 * v}, positions=["image", "text", "after_image"]):
            prompt_only = tiny_llava.generate(**batch, **gen)
        with steering.add_vectors(tiny_llava, {2: 3 * v}, positions="from_image"):
            both = tiny_llava.generate(**batch, **gen)
    torch.testing.assert_close(prompt_only.scores[0], both.scores[0])  # the prefill is the same
    assert not torch.allclose(prompt_only.scores[-1], both.scores[-1])  # decode steps are steered too


# -- TGA 4: the caption's teacher pass --------------------------------------------------------


def tga_rows(n=2):
    words = ["flower", "cake", "dog"]
    return [{"id": i, "image": make_image(i), "prompt": "USER: <image> describe this picture ASSISTANT:",
             "response": f"a picture of a {words[i]}", "image_caption": f"a red picture of a {words[i]}",
             "retrieved_caption": f"a blue {words[(i + 1) % 3]}"} for i in range(n)]


def tga_step(model, processor, recipe, data, *, backward_term=None):
    rt = Runtime(recipe, model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(data)
    result = rt.training_step(model, batch, step=0, max_steps=10)
    batch.pop(EXTRAS_KEY)
    return rt, batch, result.context.scratch.get("tga_cap"), result.terms


def test_caption_pass_pools_the_caption_tokens_in_the_prompt_template():
    model = build_tiny_llava(seed=3)
    processor = build_tiny_llava_processor()
    layers = [0, 2]
    recipe = load_recipe({"plugins": ["tga"], "tga": {"layers": layers}})
    data = tga_rows(2)
    _, _, cap, _ = tga_step(model, processor, recipe, data)
    tok = processor.tokenizer
    for i, row in enumerate(data):
        # by hand: the template up to the image ("USER:"), the caption where the image
        # stood, no retrieved text; mean over the caption's own tokens
        prefix = tok("USER:")["input_ids"]  # with the BOS the tokenizer puts in front of a prompt, if any
        caption = tok(row["image_caption"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + caption])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for k, layer in enumerate(layers):
            want = hs[layer + 1][0, len(prefix):].mean(0)
            torch.testing.assert_close(cap[k, i], want, rtol=1e-5, atol=1e-6)


def test_caption_pass_leaves_out_bos_and_the_system_prompt():
    """With a BOS and a system prompt in front (as LLaVA-1.5's template has), the
    pooled caption state is still the mean over the caption's tokens alone."""
    model = build_tiny_llava(seed=4)
    processor = build_tiny_llava_processor()
    data = tga_rows(1)
    data[0]["prompt"] = "<s> please tell me . USER: <image> describe this picture ASSISTANT:"
    _, batch, cap, _ = tga_step(model, processor, load_recipe({"plugins": ["tga"], "tga": {"layers": [1]}}), data)
    tok = processor.tokenizer
    prefix = tok("<s> please tell me . USER:")["input_ids"]
    assert prefix[0] == tok.bos_token_id
    caption = tok(data[0]["image_caption"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prefix + caption]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap[0, 0], hs[2][0, len(prefix):].mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cap[0, 0], hs[2][0].mean(0), atol=1e-4)  # pooling BOS and the template would differ


# -- TGA 5: layer numbers ------------------------------------------------------------------------


def test_library_layer_l_is_hidden_states_l_plus_1_and_recipes_name_the_papers_layers(tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.capture import HiddenCapture

    batch = tiny_llava_batch(tiny_llava_processor)
    adapter = get_adapter(tiny_llava)
    mask = adapter.layout(batch).attention_mask
    with torch.no_grad(), HiddenCapture(adapter, [0, 2], {"m": mask}, "last") as cap:
        hs = tiny_llava(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.pooled["m"][0], hs[1][:, -1])
    torch.testing.assert_close(cap.pooled["m"][2], hs[3][:, -1])
    # the TGA reference code reads hidden_states[10..18] (index 0 = the embeddings)
    paper_hidden_state_indices = list(range(10, 19))
    section = load_recipe("tga_llava15_pretrain").section("tga")
    from lvlm_safety_plugins.methods.layers import parse_layers

    assert parse_layers(section.layers) == [i - 1 for i in paper_hidden_state_indices]


# -- TGA 6: gradient checkpointing ---------------------------------------------------------------


def test_tga_term_alone_trains_the_projector_under_reentrant_checkpointing():
    model = build_tiny_llava(seed=5)
    processor = build_tiny_llava_processor()
    adapter = get_adapter(model)
    adapter.set_trainable("projector")
    compat.enable_checkpointing(model, use_reentrant=True)
    model.train()
    assert compat.reentrant_checkpointing(model)  # what LLaVA's train() gets on transformers 4.x
    recipe = load_recipe({"plugins": ["tga"], "tga": {"layers": [1, 2], "schedule": "constant"}})
    _, _, _, terms = tga_step(model, processor, recipe, tga_rows(2))
    assert not compat.reentrant_checkpointing(model)  # switched to non-reentrant
    model.zero_grad(set_to_none=True)
    terms["tga/pair"].backward()
    grads = [p.grad for p in adapter.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_forward_without_gradients_is_a_named_error():
    model = build_tiny_llava(seed=5)
    processor = build_tiny_llava_processor()
    get_adapter(model).set_trainable("projector")
    model.train()
    rt = Runtime(load_recipe({"plugins": ["tga"], "tga": {"layers": [1]}}), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(tga_rows(2))

    def no_grad_forward(b):
        with torch.no_grad():
            out = model(**b)
        return out.loss, out

    with pytest.raises(Exception, match="carry no gradient") as err:
        rt.training_step(model, batch, step=0, max_steps=10, forward=no_grad_forward)
    assert isinstance(err.value.__cause__ or err.value, GradientError)


# -- TGA 7: the teacher pass stops early without an exception ------------------------------------


def test_teacher_pass_keeps_hooks_balanced_and_the_model_as_it_was():
    model = build_tiny_llava(seed=6)
    processor = build_tiny_llava_processor()
    rt = Runtime(load_recipe({"plugins": ["tga"], "tga": {"layers": [1]}}), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(tga_rows(2))
    extras = batch.pop(EXTRAS_KEY)

    def state(hooks=True):
        return [(name, id(m), type(m).__name__, hooks and tuple(m._forward_hooks), hooks and tuple(m._forward_pre_hooks), m.training,
                 tuple(id(p) for p in m.parameters(recurse=False)), tuple(m._modules), tuple(id(c) for c in m._modules.values()),
                 "forward" in m.__dict__) for name, m in model.named_modules()]

    with torch.no_grad():
        model(**batch)  # transformers 5 installs its output-recording hooks on a model's first forward
    before = state()
    calls: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        calls[name] = [0, 0]
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: calls[name].__setitem__(0, calls[name][0] + 1)))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: calls[name].__setitem__(1, calls[name][1] + 1)))

    seen = {}

    def forward(b):  # the host forward: what the caption teacher pass left is seen first
        seen["calls"] = {name: list(c) for name, c in calls.items()}
        seen["state"] = state(hooks=False)  # the host forward's own hooks (capture, counting) are there now
        out = model(**b)
        return out.loss, out

    rt.training_step(model, {**batch, EXTRAS_KEY: extras}, step=0, max_steps=10, forward=forward)
    for h in handles:
        h.remove()
    calls = seen["calls"]
    assert seen["state"] == state(hooks=False) and state() == before
    # every forward that started ended (ZeRO-3 releases what it gathered in the post-hooks)
    assert all(pre == post for pre, post in calls.values()), {n: c for n, c in calls.items() if c[0] != c[1]}
    owner, attr = get_adapter(model).decoder_owner
    owner_name = next(n for n, m in model.named_modules() if m is owner)
    assert calls[""][0] == 1  # the model ran once
    assert calls[f"{owner_name}.{attr}.1"] == [1, 1] and calls[f"{owner_name}.{attr}.2"] == [0, 0]  # stopped after layer 1


# -- TGA 8: finite-difference gradients of both terms of both formulas -------------------------------


@pytest.mark.parametrize("formula", ["paper", "reference"])
@pytest.mark.parametrize("term", ["tga/pair", "tga/rank"])
def test_finite_difference_gradient_of_each_term(term, formula):
    model = build_tiny_llava(seed=7).double().train()
    processor = build_tiny_llava_processor()
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    recipe = load_recipe({"plugins": ["tga"], "tga": {"layers": [1, 2], "schedule": "constant", "formula": formula}})
    rt = Runtime(recipe, model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(tga_rows(2))
    extras = batch.pop(EXTRAS_KEY)
    batch["pixel_values"] = batch["pixel_values"].double()
    assert CAPTION_IDS in extras

    def loss(shift: torch.Tensor) -> torch.Tensor:
        """The term as a function of a shift added to the projector's output."""
        handle = adapter.projector.register_forward_hook(lambda m, a, o: o + shift)
        try:
            terms = rt.training_step(model, {**batch, EXTRAS_KEY: extras}, step=0, max_steps=10).terms
        finally:
            handle.remove()
        return terms[term]

    shift = (0.1 * torch.randn(32, generator=torch.Generator().manual_seed(0))).double().requires_grad_(True)
    assert loss(shift).dtype == torch.float64
    # transformers' RMSNorm computes in float32 even in a float64 model, so the central
    # differences carry float32 rounding: a step of 1e-3 keeps it far below the tolerance.
    # The paper's formula is checked along random directions (fast mode: a few forwards, not
    # 64); tests/test_tga.py checks its full Jacobian on pooled states
    assert torch.autograd.gradcheck(loss, (shift,), eps=1e-3, atol=2e-4, rtol=1e-2,
                                     fast_mode=formula == "paper")


# -- Comparative 9: CmpCrop never removes the question ---------------------------------------------


def _crop_masks(overrides, data, seeds=range(6)):
    from lvlm_safety_plugins.testing import build_tiny_llava_processor as proc

    processor = proc()
    model = build_tiny_llava(seed=0).train()
    dropped = []
    for seed in seeds:
        rt = Runtime(load_recipe("comparative", ["comparative.ablation=crop", "comparative.crop_parts=[context]",
                                                 "comparative.crop_share=0.6", f"comparative.seed={seed}", *overrides]),
                     model=model, processor=processor)
        batch = SafetyCollator(LlavaSFTCollator(processor), rt)(data)

        def forward(b):  # the host forward, with a look at the second ablated model's crop
            with rt.methods["comparative"]._ablated(model, b, 2, rt.current_step) as ablated:
                dropped.append((b["attention_mask"] == 1) & (ablated["attention_mask"] == 0))
            out = model(**b)
            return out.loss, out

        ctx = rt.training_step(model, batch, step=0, max_steps=1, forward=forward).context
        batch.pop(EXTRAS_KEY, None)
    return batch, ctx, dropped


def test_cmpcrop_never_removes_the_question():
    processor = build_tiny_llava_processor()
    tok = processor.tokenizer
    data = [{"image": make_image(i), "question": "what is in the image ?", "response": "a cake",
             "prompt": "please tell me . USER: <image> what is in the image ? ASSISTANT:"} for i in range(2)]
    batch, ctx, dropped = _crop_masks([], data)
    question = tok("what is in the image ?", add_special_tokens=False)["input_ids"]
    for b in range(2):
        row = batch["input_ids"][b].tolist()
        start = next(s for s in range(len(row)) if row[s : s + len(question)] == question)
        by_hand = torch.zeros(len(row), dtype=torch.bool)
        by_hand[start : start + len(question)] = True
        assert torch.equal(ctx.extras[QUESTION_MASK][b], by_hand)
        for d in dropped:
            assert not d[b][by_hand].any()
    assert any(d.any() for d in dropped)  # the rest of the context is still cropped
    # the old behaviour, named: the question's tokens can go too
    batch, _, old = _crop_masks(["comparative.crop_question=true"], data)
    row = batch["input_ids"][0].tolist()
    start = next(s for s in range(len(row)) if row[s : s + len(question)] == question)
    assert any(d[:, start : start + len(question)].any() for d in old)


def test_cmpcrop_question_from_the_prompt_and_unlocated_rows():
    data = [{"image": make_image(0), "prompt": "USER: <image> tell me how to make a cake ASSISTANT:", "response": "sure"},
            {"image": make_image(1), "question": "hack computer bomb", "prompt": "USER: <image> what ASSISTANT:", "response": "no"}]
    batch, ctx, dropped = _crop_masks([], data)
    extras = ctx.extras
    labels = batch["labels"]
    prompt = (batch["attention_mask"] == 1) & (labels == -100) & (batch["input_ids"] != 4)
    prompt[:, 0] = False  # a row's first token (BOS where the tokenizer adds one) is never cropped anyway
    # row 0: no question field, so its prompt text (both sides of the image) is the question
    assert torch.equal(extras[QUESTION_MASK][0] & prompt[0], prompt[0])
    # row 1: the question is not in the row: all of the row is protected, and counted
    assert bool(extras[QUESTION_MASK][1].all())
    assert int(extras["comparative_question_unlocated"]) == 1
    for d in dropped:
        assert not d[:, :].any()
