"""The comparative loss: nested ablations, the loss against a hand computation in each
target mode, the task losses against the model's own, real HF Trainer steps alone and
composed with TGA, and the composed recipes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM, TrainingArguments

from lvlm_safety_plugins import Runtime, compat, get_adapter, load_recipe
from lvlm_safety_plugins.errors import LVLMSafetyError, RecipeError
from lvlm_safety_plugins.integrations.hf_training import LlavaSFTCollator, SafetyCollator, SafetyTrainer
from lvlm_safety_plugins.methods.comparative import (
    Comparative,
    comparative_loss,
    nested_dropout,
    nested_keep_masks,
    nested_rate,
)
from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, make_image, tiny_llava_batch

TGA_SMALL = ["tga.layers=[1,2]", "tga.schedule=constant"]


def rows(n=4, retrieved=True):
    words = ["flower", "cake", "dog", "cat", "bike", "soup"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        row = {"id": i, "image": make_image(i), "prompt": "USER: <image> describe this picture ASSISTANT:",
               "response": f"a picture of a {w}", "image_caption": f"a red picture of a {w}"}
        if retrieved:
            row["retrieved_caption"] = f"a blue {words[(i + 1) % len(words)]}"
        out.append(row)
    return out


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=5e-3, max_steps=2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, seed=0, lr_scheduler_type="constant", optim="adamw_torch")
    base.update(kw)
    return TrainingArguments(**base)


def _train(tmp_path, recipe, data, trainable="projector", **args):
    torch.manual_seed(0)
    model = build_tiny_llava(seed=0)
    processor = build_tiny_llava_processor()
    get_adapter(model).set_trainable(trainable)
    trainer = SafetyTrainer(model=model, args=_args(tmp_path, **args), train_dataset=data,
                            data_collator=LlavaSFTCollator(processor), recipe=recipe, processor=processor)
    trainer.train()
    return model, trainer


def _logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# -- the pure parts -----------------------------------------------------------------


def test_cmpdrop_masks_are_nested():
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    masks = nested_keep_masks(u, 0.3, 4)
    for before, after in zip(masks, masks[1:]):
        assert bool((after & ~before).sum() == 0)  # what model i+1 keeps, model i kept
        assert after.sum() < before.sum()
    for i, mask in enumerate(masks, start=1):
        assert nested_rate(0.3, i) == pytest.approx(1 - 0.7 ** i)
        assert mask.float().mean().item() == pytest.approx(0.7 ** i, abs=0.015)


def _tiny_neo():
    """A real (tiny, random) model with nn.Dropout modules, which LLaVA's LLM lacks."""
    config = GPTNeoConfig(vocab_size=64, max_position_embeddings=32, hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0,
                          embed_dropout=0.2, resid_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    return GPTNeoForCausalLM(config).train()


def _ids(seed=1):
    return torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_nested_dropout_on_the_dropout_modules_of_a_real_model():
    model = _tiny_neo()
    ids = _ids()
    names = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert len(names) == 7
    model.eval()
    with torch.no_grad():
        plain = model(ids).logits
    model.train()
    state = {n: (m.p, m.training) for m, n in names.items()}
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for i in (1, 2, 3):
        def record(module, args, output, i=i):
            seen[(i, names[module])] = (args[0].detach(), output.detach())

        handles = [m.register_forward_hook(record) for m in names]
        with torch.no_grad(), nested_dropout(model, None, i, seed=7) as touched:
            model(ids)
        for h in handles:
            h.remove()
        assert set(touched) == set(names)
    for name in names.values():
        dropped = {}
        for i in (1, 2, 3):
            x, y = seen[(i, name)]
            rate = 1 - (1 - state[name][0]) ** i  # p=None: each module's own rate
            nonzero = x != 0
            dropped[i] = nonzero & (y == 0)
            kept = nonzero & ~dropped[i]
            torch.testing.assert_close(y[kept], x[kept] / (1 - rate))
        # what model i drops, model i+1 drops too (the inputs differ, the draw does not)
        assert dropped[1].any()
        assert bool((dropped[1] & ~dropped[2]).sum() == 0) and bool((dropped[2] & ~dropped[3]).sum() == 0)
        assert dropped[3].sum() > dropped[1].sum()
    # restored exactly: no instance-level forward left, rates and modes untouched
    for module, name in names.items():
        assert "forward" not in module.__dict__ and (module.p, module.training) == state[name]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain)
        with nested_dropout(model, 0.5, 0, seed=7):  # i = 0 is the full model
            torch.testing.assert_close(model(ids).logits, plain)


def test_nested_dropout_restores_a_patched_forward_also_on_error():
    model = _tiny_neo()
    drop = model.transformer.drop
    own = lambda x: x * 2  # noqa: E731  (a forward someone else put on the instance)
    drop.forward = own
    with pytest.raises(RuntimeError, match="boom"):
        with nested_dropout(model, 0.3, 1, seed=0):
            assert drop.forward is not own
            raise RuntimeError("boom")
    assert drop.forward is own
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Dropout) and m is not drop)


def test_cmpdrop_with_the_models_own_dropout_modules():
    """drop_site: dropout, p from each module: the host forward is the full model (no
    dropout although in train mode), the ablated models drop, the rates come back."""
    model = _tiny_neo()
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    ids = _ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.eval()
    with torch.no_grad():
        full = model(**batch).loss
    model.train()
    recipe = load_recipe({"plugins": ["comparative"], "comparative": {"drop_site": "dropout", "dropout": None}})
    rt = Runtime(recipe, model=model)
    result = rt.training_step(model, batch, step=0, max_steps=1)
    torch.testing.assert_close(result.host_loss, full)  # dropout off in the host forward
    terms, ctx = result.terms, result.context
    assert {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)} == rates
    losses = [ctx.metrics[f"comparative/loss_{i}"] for i in range(3)]
    assert losses[0] == pytest.approx(full.item(), rel=1e-5) and len(set(losses)) == 3
    terms["comparative/loss"].backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0


def _by_hand(losses, temperature, target):
    scores = [-l / temperature for l in losses]
    if target == "ultra":
        scores.append(0.0)
    elif target == "best":
        scores.append(max(scores))
    elif target == "first":
        f, b = scores[0], max(scores[1:])
        scores.append((f + b) / 2 if f > b else b)
    pairs = list(itertools.combinations(range(len(scores)), 2))
    return sum(max(0.0, scores[j] - scores[k]) for k, j in pairs) / len(pairs)


# Three models, T = 2: losses [0.5, 0.8, 0.7] -> scores [-0.25, -0.40, -0.35]. Between
# models only (1, 2) is out of order: max(0, -0.35 + 0.40) = 0.05.
#   ultra: dummy 0, hinges with it 0.25 + 0.40 + 0.35 -> (0.05 + 1.00) / 6
#   best:  dummy -0.25 (the full model), hinges 0 + 0.15 + 0.10 -> (0.05 + 0.25) / 6
#   first: f = -0.25 beats b = -0.35 -> dummy -0.30, hinges 0 + 0.10 + 0.05 -> 0.20 / 6
#   none:  no dummy, 3 pairs -> 0.05 / 3
# T = 1, losses [0.9, 0.6, 0.8]: an ablated model beats the full model, so `first`'s
# dummy is the best ablated score -0.6; model pairs 0.3 + 0.1 + 0, dummy pairs
# 0.3 + 0 + 0.2 -> 0.9 / 6.
@pytest.mark.parametrize("values, temperature, target, expected", [
    ([0.5, 0.8, 0.7], 2.0, "ultra", 1.05 / 6),
    ([0.5, 0.8, 0.7], 2.0, "best", 0.30 / 6),
    ([0.5, 0.8, 0.7], 2.0, "first", 0.20 / 6),
    ([0.5, 0.8, 0.7], 2.0, None, 0.05 / 3),
    ([0.9, 0.6, 0.8], 1.0, "first", 0.90 / 6),
])
def test_three_model_case_equals_the_hand_computation(values, temperature, target, expected):
    losses = [torch.tensor(v, requires_grad=True) for v in values]
    got = comparative_loss(losses, temperature=temperature, target=target)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert got.item() == pytest.approx(_by_hand(values, temperature, target), abs=1e-6)
    got.backward()
    # the dummy carries no gradient: d/d loss_k is (#hinges where k is the better model,
    # active) - (#where k is the worse one, active), over T and the number of pairs
    scores = [-v / temperature for v in values]
    n_pairs = 6 if target else 3
    dummy = None if target is None else _dummy(scores, target)
    for k, loss in enumerate(losses):
        grad = 0.0
        for j, other in enumerate(scores):
            if j > k and other > scores[k]:
                grad += 1  # k should beat j: raising loss_k costs
            if j < k and scores[k] > other:
                grad -= 1
        if dummy is not None and dummy >= scores[k]:
            grad += 1  # a tie passes the gradient (torch's clamp, the CmpLoss code's margin_ranking_loss)
        assert loss.grad.item() == pytest.approx(grad / temperature / n_pairs, abs=1e-6)


def _dummy(scores, target):
    if target == "ultra":
        return 0.0
    if target == "best":
        return max(scores)
    f, b = scores[0], max(scores[1:])
    return (f + b) / 2 if f > b else b


def test_per_example_losses_average_over_examples():
    batch = torch.tensor([[0.5, 0.8, 0.7], [1.0, 0.9, 1.2]])
    for target in ("ultra", "best", "first", None):
        got = comparative_loss(batch, temperature=1.0, target=target)
        want = (_by_hand([0.5, 0.8, 0.7], 1.0, target) + _by_hand([1.0, 0.9, 1.2], 1.0, target)) / 2
        assert got.item() == pytest.approx(want, abs=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"comparative\.dropout.*\(0, 1\)"):
        load_recipe("comparative", ["comparative.dropout=1.5"])
    with pytest.raises(RecipeError, match=r"comparative\.dropout.*drop_site: dropout"):
        load_recipe("comparative", ["comparative.dropout=null"])
    assert load_recipe("comparative", ["comparative.dropout=null", "comparative.drop_site=dropout"]).comparative.dropout is None
    with pytest.raises(RecipeError, match=r"comparative\.crop_parts"):
        load_recipe("comparative", ["comparative.crop_parts=[prompt]"])
    with pytest.raises(RecipeError, match=r"comparative\.target"):
        load_recipe("comparative", ["comparative.target=worst"])
    with pytest.raises(RecipeError, match=r"comparative\.include_dummy"):
        load_recipe("comparative", ["comparative.mode=replace", "comparative.include_dummy=false"])


# -- ablations and losses on a real model --------------------------------------------


def _step(recipe, data, model=None):
    """One training step by hand, as the HF integration runs it; returns the terms."""
    model = build_tiny_llava(seed=0).train() if model is None else model
    processor = build_tiny_llava_processor()
    rt = Runtime(recipe, model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(data)
    result = rt.training_step(model, batch, step=0, max_steps=1)
    return model, result.outputs, result.terms, result.context


def _inside_step(overrides, body, data=None):
    """One training step through ``Runtime.training_step``; ``body(method, model, batch,
    ctx)`` runs where the host forward runs (after ``before_forward``, before the
    plugins' ``loss_terms``). Returns the model and the host batch."""
    model = build_tiny_llava(seed=0).train()
    processor = build_tiny_llava_processor()
    rt = Runtime(load_recipe("comparative", overrides), model=model, processor=processor)
    batch = SafetyCollator(LlavaSFTCollator(processor), rt)(rows(2, retrieved=False) if data is None else data)
    seen = {}

    def forward(b):
        seen["batch"] = b
        body(rt.methods["comparative"], model, b, rt.current_step)
        out = model(**b)
        return out.loss, out

    rt.training_step(model, batch, step=0, max_steps=1, forward=forward)
    return model, seen["batch"]


def test_cmpdrop_on_the_model_drops_nested_units_and_rescales():
    got, fixed = [], {}

    def body(method, model, batch, ctx):
        mlp = get_adapter(model).decoder_layers[1].mlp
        # the drop hooks act on the MLP's output: call the MLP directly on a fixed input
        x = fixed["x"] = torch.randn(2, 5, get_adapter(model).hidden_size)
        with torch.no_grad():
            fixed["plain"] = mlp(x)
            for i in (1, 2):
                with method._ablated(model, batch, i, ctx):
                    got.append(mlp(x))

    model, _ = _inside_step(["comparative.dropout=0.3"], body)
    plain = fixed["plain"]
    zero1, zero2 = got[0] == 0, got[1] == 0
    assert zero1.any() and bool((zero1 & ~zero2).sum() == 0)  # dropped by 1 => dropped by 2
    keep1 = ~zero1
    torch.testing.assert_close(got[0][keep1], plain[keep1] / 0.7)
    torch.testing.assert_close(got[1][~zero2], plain[~zero2] / 0.49)
    assert zero2.float().mean() > zero1.float().mean()
    with torch.no_grad():
        torch.testing.assert_close(get_adapter(model).decoder_layers[1].mlp(fixed["x"]), plain)  # no hooks left


def test_cmpcrop_removes_nested_context_and_image_tokens():
    masks, outs = [], []

    def body(method, model, batch, ctx):
        adapter = get_adapter(model)
        with torch.no_grad():
            for i in (1, 2):
                with method._ablated(model, batch, i, ctx) as ablated:
                    masks.append(ablated["attention_mask"])
                    model(**ablated)  # the cropped batch runs
            # image tokens: the projector's output has nested zeroed rows
            x = torch.randn(2, 4, adapter.projector.linear_1.in_features)
            for i in (1, 2):
                with method._ablated(model, batch, i, ctx):
                    outs.append(adapter.projector(x))

    model, batch = _inside_step(["comparative.ablation=crop", "comparative.crop_parts=[context,image]",
                                 "comparative.crop_share=0.5", "comparative.crop_question=true"], body)
    adapter = get_adapter(model)
    original = batch["attention_mask"]
    dropped1, dropped2 = (original == 1) & (masks[0] == 0), (original == 1) & (masks[1] == 0)
    assert dropped1.any() and bool((dropped1 & ~dropped2).sum() == 0)
    prompt_only = (batch["labels"] == -100) & ~adapter.image_token_positions(batch["input_ids"])
    assert bool((dropped2 & ~prompt_only).sum() == 0)  # never an answer token or an image token
    z1, z2 = (outs[0] == 0).all(-1), (outs[1] == 0).all(-1)
    assert bool((z1 & ~z2).sum() == 0) and z2.sum() >= z1.sum()


def test_task_losses_are_the_models_own_loss():
    """Every model's loss is computed from its logits; on the full model it equals the
    model's own batch loss (also where transformers 4.37 splices the image in)."""
    model = build_tiny_llava(seed=0).eval()
    batch = LlavaSFTCollator(build_tiny_llava_processor())(rows(2, retrieved=False))
    with torch.no_grad():
        out = model(**batch)
    sums, counts = Comparative._token_losses(get_adapter(model), batch, out)
    assert counts.tolist() == [int((r[1:] != -100).sum()) for r in batch["labels"]]
    assert (sums.sum() / counts.sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("granularity", ["example", "batch"])
def test_the_term_reaches_the_trainable_parameters(granularity):
    recipe = load_recipe("comparative", [f"comparative.granularity={granularity}"])
    model = build_tiny_llava(seed=0).train()
    trainable = get_adapter(model).set_trainable("projector")
    _, outputs, terms, ctx = _step(recipe, rows(2, retrieved=False), model)
    assert set(terms) == {"comparative/loss", "comparative/host_cancel"}
    assert ctx.metrics["comparative/loss_0"] == pytest.approx(outputs.loss.item(), rel=1e-5)
    assert all(f"comparative/loss_{i}" in ctx.metrics for i in (1, 2))
    terms["comparative/loss"].backward()  # the comparative loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_drop_site_dropout_needs_dropout_modules_and_checkpointing_is_refused():
    recipe = load_recipe("comparative", ["comparative.drop_site=dropout", "comparative.dropout=null"])
    with pytest.raises(LVLMSafetyError, match="nn.Dropout"):
        _step(recipe, rows(2, retrieved=False))
    model = build_tiny_llava(seed=0).train()
    compat.enable_checkpointing(model)
    with pytest.raises(LVLMSafetyError, match="gradient checkpointing"):
        _step(load_recipe("comparative"), rows(2, retrieved=False), model)
    # crops act on the inputs and the projector, outside the checkpointed layers
    _, _, terms, _ = _step(load_recipe("comparative", ["comparative.ablation=crop"]), rows(2, retrieved=False), model)
    assert "comparative/loss" in terms


def test_tga_terms_do_not_depend_on_where_comparative_is_listed():
    """comparative's loss_terms is trylast: its ablated forwards run after TGA has read
    what it captured from the host forward, whatever the `plugins` order."""
    base = dict(load_recipe("tga_plus_comparative", TGA_SMALL).to_dict())
    got = []
    for order in (["tga", "comparative"], ["comparative", "tga"]):
        _, _, terms, _ = _step(load_recipe({**base, "plugins": order}), rows(2))
        got.append({k: v.item() for k, v in terms.items()})
    assert set(got[0]) == {"tga/pair", "tga/rank", "comparative/loss"}
    assert got[0] == pytest.approx(got[1], rel=1e-6)


# -- training ----------------------------------------------------------------------


def test_trainer_steps_with_the_comparative_recipe(tmp_path):
    """The shipped recipe (the comparative loss alone): logged, the host loss cancelled,
    the trainable parameters trained by it, the frozen ones untouched."""
    model, trainer = _train(tmp_path, "comparative", rows(4, retrieved=False))
    logged = _logged(trainer)
    want = {"comparative/loss", "comparative/host_cancel", "comparative/loss_0", "comparative/loss_1", "comparative/loss_2"}
    assert len(logged) == 2 and all(want <= set(h) for h in logged)
    for h in logged:
        assert math.isfinite(h["comparative/loss"]) and h["comparative/loss"] > 0
        assert h["comparative/host_cancel"] == pytest.approx(-h["comparative/loss_0"], abs=1e-5)
        assert h["loss"] == pytest.approx(h["comparative/loss"], abs=1e-4)
    base = dict(build_tiny_llava(seed=0).named_parameters())
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in trained.items() if p.requires_grad)
    assert all(torch.equal(p, base[n]) for n, p in trained.items() if not p.requires_grad)


def test_replace_mode_cancels_the_host_loss_under_gradient_accumulation(tmp_path):
    _, trainer = _train(tmp_path, "comparative", rows(4, retrieved=False), max_steps=1, per_device_train_batch_size=1,
                        gradient_accumulation_steps=2)
    (h,) = _logged(trainer)
    assert h["loss"] == pytest.approx(h["comparative/loss"], abs=1e-4)


def test_tga_plus_comparative_produces_every_term(tmp_path):
    recipe = load_recipe("tga_plus_comparative", TGA_SMALL)
    assert recipe.plugins == ["tga", "comparative"] and recipe.comparative.mode.value == "add"
    _, trainer = _train(tmp_path, recipe, rows(4, retrieved=True))
    logged = _logged(trainer)
    want = {"tga/pair", "tga/rank", "comparative/loss", "comparative/loss_0", "comparative/loss_1", "comparative/loss_2"}
    assert logged and all(want <= set(h) for h in logged)
    assert all("comparative/host_cancel" not in h for h in logged)  # add mode: the host loss stays
    # ablated models lost the retrieved text and image tokens: they do worse than the full model
    assert all(h["comparative/loss_0"] != h["comparative/loss_1"] for h in logged)


def test_tga_then_cmrm_trains_with_tga_and_steers_with_cmrm(tmp_path):
    """One recipe, two stages: training runs TGA (CMRM idle); then CMRM is calibrated on
    the trained model and steers it (TGA idle)."""
    vectors = tmp_path / "vectors.safetensors"
    recipe = load_recipe("tga_then_cmrm", [*TGA_SMALL, f"cmrm.vectors={vectors}", "cmrm.layers=1-2", "cmrm.batch_size=2"])
    assert recipe.plugins == ["tga", "cmrm"] and recipe.cmrm.alpha == 0.5
    model, trainer = _train(tmp_path, recipe, rows(2, retrieved=True), max_steps=1)
    (h,) = _logged(trainer)
    assert {"tga/pair", "tga/rank"} <= set(h) and not any(k.startswith("cmrm") for k in h)
    processor = build_tiny_llava_processor()
    rt = Runtime(recipe, model=model.eval(), processor=processor)
    assert {rt.pm.get_name(i.plugin) for i in rt.pm.hook.install_steering.get_hookimpls()} == {"method:cmrm"}
    [artifact] = rt.calibrate(processor, [{"image": make_image(10 + i), "prompt": "what is in the image ?"} for i in range(2)])
    assert artifact["path"] == str(vectors)
    batch = tiny_llava_batch(processor)
    with torch.no_grad():
        base = model(**batch).logits
        with rt.steering():
            steered = model(**batch).logits
        after = model(**batch).logits
    assert not torch.equal(base, steered) and torch.equal(base, after)
