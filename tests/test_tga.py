"""TGA: the loss terms, the data hooks, and real HF Trainer runs on a tiny Llava."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from lvlm_safety_plugins import RecipeError, Runtime, get_adapter, load_recipe
from lvlm_safety_plugins.capture import HiddenCapture
from lvlm_safety_plugins.integrations.hf_training import EXTRAS_KEY, LlavaSFTCollator, SafetyCollator, SafetyTrainer
from lvlm_safety_plugins.methods.tga import Formula, Schedule, effective_settings
from lvlm_safety_plugins.methods.tga.method import INSERTED, RETRIEVED_MASK, schedule_factors, tga_terms
from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, make_image

LAYERS = [1, 2]


def rows(n=4, retrieved=True):
    words = ["flower", "cake", "dog", "cat", "bike", "soup"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        row = {
            "id": i,
            "image": make_image(i),
            "prompt": "USER: <image> describe this picture ASSISTANT:",
            "response": f"a picture of a {w}",
            "image_caption": f"a red picture of a {w}",
        }
        if retrieved:
            row["retrieved_caption"] = f"a blue {words[(i + 1) % len(words)]}"
        out.append(row)
    return out


def recipe(**tga):
    section = {"layers": LAYERS, "schedule": "constant", "pair_weight": 1.0, "rank_weight": 1.0, **tga}
    return load_recipe({"plugins": ["tga"], "tga": section})


def test_reference_terms_equal_the_released_formula_and_carry_gradients():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 8, requires_grad=True)
    cap, ret = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = tga_terms(img, cap, ret, formula="reference")
    cos = lambda a, b: (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # noqa: E731
    pair = sum(math.exp(-cos(img[l, b], cap[l, b]).item()) for l in range(2) for b in range(3)) / 6
    rank = sum(math.exp(cos(ret[l, b], cap[l, b]).item() - cos(img[l, b], cap[l, b]).item()) for l in range(2) for b in range(3)) / 6
    assert out["pair"].item() == pytest.approx(pair, rel=1e-5)
    assert out["rank"].item() == pytest.approx(rank, rel=1e-5)
    (out["pair"] + out["rank"]).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    # rows without retrieved text are left out; no rows at all: no term, never NaN
    part = tga_terms(img.detach(), cap, ret, ret_valid=torch.tensor([True, False, False]), formula="reference")
    assert part["rank"].item() == pytest.approx(
        sum(math.exp(cos(ret[l, 0], cap[l, 0]).item() - cos(img[l, 0], cap[l, 0]).item()) for l in range(2)) / 2, rel=1e-5
    )
    assert "rank" not in tga_terms(img.detach(), cap, ret, ret_valid=torch.zeros(3, dtype=torch.bool), formula="reference")


def _cos(a, b):
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_paper_terms_equal_the_equation_and_are_stable():
    """sum over layers of [-cos(I, C) + log(1 + exp(-(cos(I, C) - cos(R, C))))], averaged
    over rows; rows without retrieved text leave the ranking term."""
    torch.manual_seed(1)
    img = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    cap, ret = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    ret_valid = torch.tensor([True, True, False, True])
    out = tga_terms(img, cap, ret, ret_valid=ret_valid)  # the default formula is the paper's
    pair = sum(-_cos(img[l, b], cap[l, b]) for l in range(3) for b in range(4)) / 4
    rank = sum(math.log(1 + math.exp(-(_cos(img[l, b], cap[l, b]) - _cos(ret[l, b], cap[l, b]))))
               for l in range(3) for b in (0, 1, 3)) / 3
    assert out["pair"].item() == pytest.approx(pair, rel=1e-12)
    assert out["rank"].item() == pytest.approx(rank, rel=1e-12)
    assert out["pair"].dtype == torch.float64
    # the terms are functions of the pooled states with exact gradients (central differences)
    assert torch.autograd.gradcheck(lambda x: tga_terms(x, cap, ret, ret_valid=ret_valid)["pair"], (img,))
    assert torch.autograd.gradcheck(lambda x: tga_terms(x, cap, ret, ret_valid=ret_valid)["rank"], (img,))
    # the extremes: image opposite the caption, retrieved text on it (margin 2 per layer)
    c = torch.randn(2, 1, 8)
    far = tga_terms((-3 * c).requires_grad_(True), c, 2 * c)
    assert far["pair"].item() == pytest.approx(2.0, rel=1e-6)
    assert far["rank"].item() == pytest.approx(2 * math.log(1 + math.exp(2.0)), rel=1e-6)
    with pytest.raises(Exception, match="unknown formula 'papr'; valid: paper, reference"):
        tga_terms(img, cap, formula="papr")


def test_schedules():
    assert schedule_factors("decay", 0.25) == (0.75, 0.5625)
    assert schedule_factors("paper", 0.25) == (0.75, 0.5625)  # the earlier name of decay
    assert schedule_factors("constant", 0.9) == (1.0, 1.0)
    assert schedule_factors("none", 0.1) == (0.0, 0.0)


def test_prepare_example_inserts_retrieved_text_before_the_image():
    rt = Runtime(recipe())
    ex = rt.prepare_example({"prompt": "USER: <image> what ASSISTANT:", "retrieved_caption": "a dog", "image_caption": "a cat"})
    assert ex["prompt"] == "USER: Retrieved Text: a dog. <image> what ASSISTANT:"
    # retrieved == caption: only its first half is used
    same = rt.prepare_example({"prompt": "<image> q", "retrieved_caption": "a red cake here", "image_caption": "A red  cake here"})
    assert same[INSERTED] == "Retrieved Text: a red. "
    llava = rt.prepare_example({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}], "retrieved_caption": "a dog"})
    assert llava["conversations"][0]["value"] == "Retrieved Text: a dog. <image>\nWhat?"
    assert rt.prepare_example({"prompt": "<image> q"}) == {"prompt": "<image> q"}  # nothing retrieved: unchanged


def test_collate_masks_exactly_the_retrieved_tokens():
    processor = build_tiny_llava_processor()
    rt = Runtime(recipe(), processor=processor)
    collate = SafetyCollator(LlavaSFTCollator(processor), rt)
    batch = collate(rows(2))
    extras = batch[EXTRAS_KEY]
    tok = processor.tokenizer
    for i in range(2):
        marked = batch["input_ids"][i][extras[RETRIEVED_MASK][i]].tolist()
        assert tok.decode(marked).replace(" ", "") == f"Retrieved Text: a blue {['cake', 'dog'][i]}.".replace(" ", "").replace(".", "") or marked
        expect = tok(f"Retrieved Text: a blue {['cake', 'dog'][i]}.", add_special_tokens=False)["input_ids"]
        assert marked == expect
    assert extras["tga_caption_input_ids"].shape[0] == 2
    assert bool(extras["tga_caption_attention_mask"].any(1).all())


def test_formula_defaults_and_explicit_settings(tmp_path):
    paper = effective_settings(load_recipe({"plugins": ["tga"]}).section("tga"))
    assert (paper.formula, paper.pair_weight, paper.rank_weight, paper.schedule) == (Formula.paper, 1.0, 1.0, Schedule.constant)
    ref = effective_settings(load_recipe({"plugins": ["tga"], "tga": {"formula": "reference"}}).section("tga"))
    assert (ref.formula, ref.pair_weight, ref.rank_weight, ref.schedule) == (Formula.reference, 0.25, 0.1, Schedule.decay)
    # a weight or schedule set in the recipe is used as it is, with either formula
    mixed = effective_settings(load_recipe({"plugins": ["tga"], "tga": {"pair_weight": 0.5, "schedule": "paper"}}).section("tga"))
    assert (mixed.formula, mixed.pair_weight, mixed.rank_weight, mixed.schedule) == (Formula.paper, 0.5, 1.0, Schedule.decay)
    # the shipped recipes pin the paper's formula and leave weights and schedule to it
    for name in ("tga_llava15_pretrain", "tga_llava15_finetune", "tga_then_cmrm", "tga_plus_comparative"):
        section = load_recipe(name).section("tga")
        assert section.formula == Formula.paper and section.pair_weight is None and section.schedule is None, name
        assert effective_settings(load_recipe(name, ["tga.formula=reference"]).section("tga")) == ref, name
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [tga]\ntga: {formula: released}\n")
    with pytest.raises(RecipeError, match=r"tga\.formula.*paper, reference"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="rank_weight must be >= 0"):
        load_recipe({"plugins": ["tga"], "tga": {"rank_weight": -1}})


# -- each formula against a loss computed by hand from the tiny model's own states -------------


def _hand_loss(model, processor, batch, data, formula, weights, factors):
    """The host loss plus the TGA terms, computed here from the hidden states of a forward
    of the batch (image tokens, the retrieved text's tokens) and of the caption read in
    the prompt's template ("USER:" then the caption, its tokens pooled, eval, no grad)."""
    tok = processor.tokenizer
    layout = get_adapter(model).layout(batch)  # where the tokens sit in the decoder (4.37 splices)
    out = model(**batch, output_hidden_states=True)
    in_ids = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for i, row in enumerate(data):
        pattern = tok(f"Retrieved Text: {row['retrieved_caption']}.", add_special_tokens=False)["input_ids"]
        ids = batch["input_ids"][i].tolist()
        start = next(s for s in range(len(ids)) if ids[s:s + len(pattern)] == pattern)
        in_ids[i, start:start + len(pattern)] = True
    ret_mask = layout.map_token_mask(in_ids)
    prefix = tok("USER:")["input_ids"]
    was = model.training
    model.eval()
    with torch.no_grad():
        caps = [model(input_ids=torch.tensor([prefix + tok(r["image_caption"], add_special_tokens=False)["input_ids"]]),
                      output_hidden_states=True).hidden_states for r in data]
    model.train(was)
    pair, rank = [], []
    for layer in LAYERS:
        hs = out.hidden_states[layer + 1]
        p_rows, r_rows = [], []
        for i in range(len(data)):
            img = hs[i][layout.image_mask[i]].mean(0)
            ret = hs[i][ret_mask[i]].mean(0)
            cap = caps[i][layer + 1][0, len(prefix):].mean(0)
            cos_ic = torch.dot(img, cap) / (img.norm() * cap.norm())
            cos_rc = torch.dot(ret, cap) / (ret.norm() * cap.norm())
            if formula == "paper":
                p_rows.append(-cos_ic)
                r_rows.append(torch.log(1 + torch.exp(-(cos_ic - cos_rc))))
            else:
                p_rows.append(torch.exp(-cos_ic))
                r_rows.append(torch.exp(cos_rc - cos_ic))
        pair.append(torch.stack(p_rows).mean())
        rank.append(torch.stack(r_rows).mean())
    # the paper sums its per-layer terms; the released code averages over its layers
    reduce = torch.stack(pair).sum() if formula == "paper" else torch.stack(pair).mean()
    reduce_r = torch.stack(rank).sum() if formula == "paper" else torch.stack(rank).mean()
    total = out.loss + weights[0] * factors[0] * reduce + weights[1] * factors[1] * reduce_r
    return total, out.loss, float(reduce.detach()), float(reduce_r.detach())


@pytest.mark.parametrize("formula, pinned, weights, factors", [
    ("paper", "", (1.0, 1.0), (1.0, 1.0)),  # the default: weights 1, no schedule
    ("reference", "formula: reference", (0.25, 0.1), (0.7, 0.49)),  # the earlier training: 1/4, 1/10, decay at r = 0.3
])
def test_each_formula_trains_the_hand_computed_loss(tmp_path, formula, pinned, weights, factors):
    path = tmp_path / "r.yaml"
    path.write_text(f"defaults: [tga_llava15_finetune]\ntga: {{layers: [1, 2], {pinned}}}\n")
    model = build_tiny_llava(seed=2).train()  # projector and LLM trainable, as in the fine-tune stage
    processor = build_tiny_llava_processor()
    data = rows(2)
    rt = Runtime(load_recipe(path), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(data)
    params = [p for p in model.parameters() if p.requires_grad]
    result = rt.training_step(model, batch, step=3, max_steps=10)
    got = torch.autograd.grad(result.loss, params, allow_unused=True)
    batch.pop(EXTRAS_KEY)
    want_loss, host, pair, rank = _hand_loss(model, processor, batch, data, formula, weights, factors)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert result.loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    moved = 0
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        moved += int(bool(w.abs().sum() > 0))
    assert moved > 10  # projector and LLM weights both get gradients
    # the terms keep their names; the unweighted values are logged under the formula's own
    assert set(result.terms) == {"tga/pair", "tga/rank"}
    assert result.metrics[f"tga/{formula}/pair"] == pytest.approx(pair, rel=1e-5)
    assert result.metrics[f"tga/{formula}/rank"] == pytest.approx(rank, rel=1e-5)
    assert result.metrics["tga/pair"] == pytest.approx(weights[0] * factors[0] * pair, rel=1e-5)
    # the terms train: the gradient differs from the host loss's alone
    host_only = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    assert any(h is not None and not torch.allclose(g, h) for g, h in zip(got, host_only))


def test_schedule_none_logs_the_terms_and_trains_only_the_host_loss():
    """What the released code trains: its terms are floats (math.exp, no gradient), so only
    the cross-entropy with the retrieved text in the prompt trains."""
    model = build_tiny_llava(seed=2).train()
    processor = build_tiny_llava_processor()
    data = rows(2)
    rt = Runtime(load_recipe("tga_llava15_finetune", ["tga.layers=[1,2]", "tga.schedule=none"]), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(data)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("Retrieved") in batch["input_ids"][0].tolist()  # the retrieved text is in the prompt
    params = [p for p in model.parameters() if p.requires_grad]
    result = rt.training_step(model, batch, step=3, max_steps=10)
    for term in ("tga/pair", "tga/rank"):
        assert result.terms[term].item() == 0.0
        grads = torch.autograd.grad(result.terms[term], params, allow_unused=True, retain_graph=True)
        assert all(g is None or not g.any() for g in grads), term
    got = torch.autograd.grad(result.loss, params, allow_unused=True)
    batch.pop(EXTRAS_KEY)
    _, host, pair, rank = _hand_loss(model, processor, batch, data, "paper", (1.0, 1.0), (0.0, 0.0))
    want = torch.autograd.grad(host, params, allow_unused=True)
    assert result.loss.item() == pytest.approx(host.item(), rel=1e-6)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w)
    assert result.metrics["tga/paper/pair"] == pytest.approx(pair, rel=1e-5) and pair != 0.0
    assert result.metrics["tga/paper/rank"] == pytest.approx(rank, rel=1e-5) and rank > 0.0
    assert result.metrics["tga/schedule"] == 0.0


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=5e-3, max_steps=6,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0, lr_scheduler_type="constant", optim="adamw_torch",
    )
    base.update(kw)
    return TrainingArguments(**base)


def _projector_only(model):
    adapter = get_adapter(model)
    adapter.set_trainable("projector")
    return adapter


def _image_caption_cos(model, processor, data):
    """Mean cos(image tokens, caption) at LAYERS over the data, as TGA measures it."""
    adapter = get_adapter(model)
    batch = LlavaSFTCollator(processor)(data)
    caps = processor.tokenizer([d["image_caption"] for d in data], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        with HiddenCapture(adapter, LAYERS, {"c": caps["attention_mask"].bool()}) as c:
            model(input_ids=caps["input_ids"], attention_mask=caps["attention_mask"])
        with HiddenCapture(adapter, LAYERS, {"i": adapter.layout(batch).image_mask}) as i:
            model(**batch)
    return torch.nn.functional.cosine_similarity(i.stacked("i"), c.stacked("c"), dim=-1).mean().item()


def _train(tmp_path, schedule, data, steps=6):
    torch.manual_seed(0)
    model = build_tiny_llava(seed=0)
    processor = build_tiny_llava_processor()
    _projector_only(model)
    trainer = SafetyTrainer(
        model=model, args=_args(tmp_path, max_steps=steps), train_dataset=data,
        data_collator=LlavaSFTCollator(processor), recipe=recipe(schedule=schedule), processor=processor,
    )
    trainer.train()
    return model, processor, trainer


def test_tga_steps_pull_image_states_toward_the_caption(tmp_path):
    data = rows(4)
    base_model = build_tiny_llava(seed=0)
    processor = build_tiny_llava_processor()
    before = _image_caption_cos(base_model, processor, data)
    with_tga, _, trainer = _train(tmp_path / "tga", "constant", data)
    without, _, _ = _train(tmp_path / "plain", "none", data)
    gain_tga = _image_caption_cos(with_tga, processor, data) - before
    gain_plain = _image_caption_cos(without, processor, data) - before
    assert gain_tga > gain_plain + 0.05, (before, gain_tga, gain_plain)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("tga/pair" in h and "tga/rank" in h for h in logged)
    assert all(math.isfinite(h["tga/pair"]) and math.isfinite(h["tga/rank"]) for h in logged)
    # only the projector moved
    for (name, p0), p1 in zip(base_model.named_parameters(), with_tga.parameters()):
        moved = not torch.equal(p0, p1)
        assert moved == ("multi_modal_projector" in name), name


def test_both_terms_reach_the_projector_and_frozen_params_get_none():
    model = build_tiny_llava(seed=1)
    processor = build_tiny_llava_processor()
    adapter = _projector_only(model)
    rt = Runtime(recipe(), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(rows(2))
    extras = batch.pop(EXTRAS_KEY)
    model.train()
    for term in ("tga/pair", "tga/rank"):
        model.zero_grad(set_to_none=True)
        terms = rt.training_step(model, {**batch, EXTRAS_KEY: extras}, step=0, max_steps=10).terms
        assert set(terms) == {"tga/pair", "tga/rank"}
        terms[term].backward()
        grads = [p.grad for p in adapter.projector.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), term
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)


def test_projector_pretraining_without_retrieved_text(tmp_path):
    model, _, trainer = _train(tmp_path, "paper", rows(4, retrieved=False), steps=3)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("tga/pair" in h and "tga/rank" not in h for h in logged)
    assert all(math.isfinite(h["loss"]) for h in logged)


def test_resume_continues_the_schedule(tmp_path):
    data = rows(4)
    processor = build_tiny_llava_processor()

    def run(out, resume=None, steps=4):
        torch.manual_seed(0)
        model = build_tiny_llava(seed=0)
        _projector_only(model)
        trainer = SafetyTrainer(
            model=model, args=_args(out, max_steps=steps, save_strategy="steps", save_steps=2),
            train_dataset=data, data_collator=LlavaSFTCollator(processor),
            recipe=recipe(schedule="paper"), processor=processor,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["tga/schedule"] for h in trainer.state.log_history if "tga/schedule" in h}, trainer

    full, _ = run(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-2" / "lvlm_safety_state.json").is_file()
    resumed, trainer = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    # steps 1-2 come back with the checkpoint's log history, 3-4 were trained again
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step])
    assert full[1] == pytest.approx(1.0) and full[4] == pytest.approx(0.25)
    assert trainer.safety.resumed_state["global_step"] == 2
