"""TGA: the loss terms, the data hooks, and real HF Trainer runs on a tiny Llava."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from lvlm_safety_plugins import Runtime, get_adapter, load_recipe
from lvlm_safety_plugins.capture import HiddenCapture
from lvlm_safety_plugins.integrations.hf_training import EXTRAS_KEY, LlavaSFTCollator, SafetyCollator, SafetyTrainer
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


def test_terms_equal_the_formula_and_carry_gradients():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 8, requires_grad=True)
    cap, ret = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = tga_terms(img, cap, ret)
    cos = lambda a, b: (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # noqa: E731
    pair = sum(math.exp(-cos(img[l, b], cap[l, b]).item()) for l in range(2) for b in range(3)) / 6
    rank = sum(math.exp(cos(ret[l, b], cap[l, b]).item() - cos(img[l, b], cap[l, b]).item()) for l in range(2) for b in range(3)) / 6
    assert out["pair"].item() == pytest.approx(pair, rel=1e-5)
    assert out["rank"].item() == pytest.approx(rank, rel=1e-5)
    (out["pair"] + out["rank"]).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    # rows without retrieved text are left out; no rows at all: no term, never NaN
    part = tga_terms(img.detach(), cap, ret, ret_valid=torch.tensor([True, False, False]))
    assert part["rank"].item() == pytest.approx(
        sum(math.exp(cos(ret[l, 0], cap[l, 0]).item() - cos(img[l, 0], cap[l, 0]).item()) for l in range(2)) / 2, rel=1e-5
    )
    assert "rank" not in tga_terms(img.detach(), cap, ret, ret_valid=torch.zeros(3, dtype=torch.bool))


def test_schedules():
    assert schedule_factors("paper", 0.25) == (0.75, 0.5625)
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
