"""Bad input in, the named error (or the correct result) out, nothing lost: the cases of
docs/reliability.md, on a real tiny Llava, real files and real caches."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lvlm_safety_plugins import (
    ConfigError,
    ConfigValueError,
    LayerError,
    PluginError,
    RecipeError,
    Runtime,
    SteeringError,
    VectorFileError,
    get_adapter,
    load_recipe,
    steering,
)
from lvlm_safety_plugins.methods.cmrm import SteeringVectors, calibrate, fold_into_weights, model_fingerprint
from lvlm_safety_plugins.testing import make_image, tiny_llava_batch

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:"]


def rows(n=2):
    return [{"image": make_image(10 + i), "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]


def vectors_for(model, layers=(1, 2), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    return SteeringVectors(
        vectors={l: torch.randn(adapter.hidden_size, generator=g) for l in layers}, model_class=type(model).__name__,
        fingerprint=model_fingerprint(model), hidden_size=adapter.hidden_size, num_layers=adapter.num_layers, samples=2, **kw)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# NaN / inf alphas and vectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, fragment", [
    ("cmrm.alpha=.nan", "alpha is nan"),
    ("cmrm.alpha=.inf", "alpha is inf"),
    ("cmrm.alpha=[.nan,1,1,1]", "alpha[0] is nan"),
    ("cmrm.alpha=[1,-.inf]", "alpha[1] is -inf"),
])
def test_non_finite_alphas_are_refused_by_the_recipe(override, fragment):
    with pytest.raises(RecipeError, match=re_escape(fragment)) as info:
        load_recipe("cmrm_llava15_dataset", [override, "cmrm.layers=1-4"] if "[" in override else [override])
    assert info.value.key == "cmrm.alpha" and f"override {override!r}" in str(info.value)


def re_escape(text):
    import re

    return re.escape(text)


def test_fold_refuses_a_nan_alpha_and_leaves_the_weights_alone(tiny_llava):
    before = state(tiny_llava)
    for alpha in (float("nan"), [1.0, float("inf")]):
        with pytest.raises(ConfigValueError, match="finite"):
            fold_into_weights(tiny_llava, vectors_for(tiny_llava), alpha=alpha, composition="independent")
    nan_vec = {1: torch.full((32,), float("nan"))}
    with pytest.raises(ConfigError, match=r"layers \[1\] have non-finite values"):
        fold_into_weights(tiny_llava, nan_vec)
    after = state(tiny_llava)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(tiny_llava.get_decoder().layers[i].mlp.down_proj.bias is None for i in range(4))


def test_add_vectors_refuses_non_finite_vectors_and_scales(tiny_llava, tiny_llava_processor):
    batch = tiny_llava_batch(tiny_llava_processor)
    clean = logits(tiny_llava, batch)
    with pytest.raises(SteeringError, match="layer 1: the vector has 32 non-finite values"):
        steering.add_vectors(tiny_llava, {1: torch.full((32,), float("nan"))})
    with pytest.raises(SteeringError, match=r"scale\[2\] is not finite"):
        steering.add_vectors(tiny_llava, {1: torch.ones(32), 2: torch.ones(32)}, scale={1: 1.0, 2: float("inf")})
    with pytest.raises(SteeringError, match="scale is not finite"):
        steering.add_vectors(tiny_llava, {1: torch.ones(32)}, scale=float("nan"))
    assert torch.equal(logits(tiny_llava, batch), clean)  # no hook was left behind


def test_a_negative_alpha_warns_naming_it():
    with pytest.warns(UserWarning, match=r"cmrm.alpha is negative \(-0.5\).*inverts CMRM"):
        load_recipe("cmrm_llava15_dataset", ["cmrm.alpha=-0.5"])


# ---------------------------------------------------------------------------
# a layer listed twice
# ---------------------------------------------------------------------------


def test_a_layer_listed_twice_is_refused(tiny_llava, tiny_llava_processor):
    with pytest.raises(RecipeError, match=r"layer\(s\) \[1\] listed twice") as info:
        load_recipe("cmrm_llava15_sample", ["cmrm.layers=1,1", "cmrm.composition=independent"])
    assert info.value.key == "cmrm.layers"
    # [1, -3] passes the recipe (it cannot know the depth) and fails on the 4-layer model
    recipe = load_recipe("cmrm_llava15_sample", ["cmrm.layers=[1,-3]", "cmrm.composition=independent"])
    runtime = Runtime(recipe, model=tiny_llava, processor=tiny_llava_processor)
    with pytest.raises(PluginError, match="layers 1 and -3 both name decoder layer 1") as info:
        with runtime.steering():
            pass
    assert isinstance(info.value.__cause__, LayerError)
    batch = tiny_llava_batch(tiny_llava_processor)
    clean = logits(tiny_llava, batch)
    v, w = torch.randn(32), torch.randn(32)
    with pytest.raises(LayerError, match="layers -1 and 3 both name decoder layer 3"):
        steering.add_vectors(tiny_llava, {-1: v, 3: w})
    assert torch.equal(logits(tiny_llava, batch), clean)
    # a negative id alone is normalised once and steers that layer
    with steering.add_vectors(tiny_llava, {-1: v}):
        neg = logits(tiny_llava, batch)
    with steering.add_vectors(tiny_llava, {3: v}):
        pos = logits(tiny_llava, batch)
    assert torch.equal(neg, pos) and not torch.equal(neg, clean)


# ---------------------------------------------------------------------------
# vector files: weights identity, metadata types, reference / measure_at
# ---------------------------------------------------------------------------


def test_vectors_of_other_weights_are_refused_with_an_override(tmp_path, tiny_llava, tiny_llava_processor):
    vectors = calibrate(tiny_llava, tiny_llava_processor, rows(2), layers=[1], progress=False)
    path = vectors.save(tmp_path / "v.safetensors")
    loaded = SteeringVectors.load(path)
    loaded.check(tiny_llava, source=path)  # the same weights
    loaded.check(copy.deepcopy(tiny_llava).to(torch.bfloat16), source=path)  # the same weights in another dtype
    trained = copy.deepcopy(tiny_llava)
    with torch.no_grad():  # a "trained" model: same config, same fingerprint, other weights
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert model_fingerprint(trained) == loaded.fingerprint
    with pytest.raises(VectorFileError, match=r"v.safetensors: vectors were calibrated on other weights.*sampled weights differ"):
        loaded.check(trained, source=path)
    with pytest.warns(UserWarning, match="calibrated on other weights"):
        loaded.check(trained, strict=False, source=path)
    recipe = load_recipe("cmrm_llava15_dataset", [f"cmrm.vectors={path}", "cmrm.layers=[1]", "cmrm.composition=independent",
                                                  "cmrm.alpha=1.0"])
    with pytest.raises(PluginError, match="calibrated on other weights") as info:
        with Runtime(recipe, model=trained, processor=tiny_llava_processor).steering():
            pass
    assert isinstance(info.value.__cause__, VectorFileError)


def _with_meta(tmp_path, vectors, name, **changes):
    from safetensors.torch import save_file

    meta = vectors.metadata()
    meta.update(changes)
    file = tmp_path / name
    save_file({f"layer.{l}": v for l, v in vectors.vectors.items()}, str(file), metadata=meta)
    return file


@pytest.mark.parametrize("key, value, fragment", [
    ("layers", "5", "metadata key 'layers': expected a JSON list of ints, got '5'"),
    ("layers", "[1, 1]", "metadata key 'layers': lists a layer twice"),
    ("alpha", "1.0", "metadata key 'alpha': expected a JSON list of floats, got '1.0'"),
    ("alpha", "[NaN, 1.0]", "metadata key 'alpha': has non-finite values"),
    ("samples", "many", "metadata key 'samples': expected an integer, got 'many'"),
    ("positions", '"image"', "metadata key 'positions': expected a JSON list of strs"),
])
def test_bad_vector_metadata_names_file_and_key(tmp_path, tiny_llava, key, value, fragment):
    vectors = vectors_for(tiny_llava, composition="sequential", alpha=[1.0, 1.0], positions=["image", "text"])
    file = _with_meta(tmp_path, vectors, "m.safetensors", **{key: value})
    with pytest.raises(VectorFileError, match=re_escape(f"m.safetensors: {fragment}")):
        SteeringVectors.load(file)


def test_reference_and_measure_at_must_match_the_recipe(tmp_path, tiny_llava, tiny_llava_processor):
    path = vectors_for(tiny_llava, reference="noise", measure_at="mean").save(tmp_path / "n.safetensors")
    base = [f"cmrm.vectors={path}", "cmrm.layers=1-2", "cmrm.composition=independent"]
    for overrides, fragment in ((["cmrm.reference=blank", "cmrm.measure_at=mean"], "cmrm.reference: the vectors were calibrated with reference 'noise', the recipe says 'blank'"),
                                (["cmrm.reference=noise", "cmrm.measure_at=last"], "cmrm.measure_at: the vectors were calibrated with measure_at 'mean', the recipe says 'last'")):
        runtime = Runtime(load_recipe("cmrm_llava15_dataset", base + overrides), model=tiny_llava, processor=tiny_llava_processor)
        with pytest.raises(PluginError, match=re_escape(fragment)):
            with runtime.steering():
                pass
    ok = Runtime(load_recipe("cmrm_llava15_dataset", base + ["cmrm.reference=noise", "cmrm.measure_at=mean"]), model=tiny_llava,
                 processor=tiny_llava_processor)
    with ok.steering():
        pass


# ---------------------------------------------------------------------------
# the evaluation cache is keyed by content
# ---------------------------------------------------------------------------


def _bench(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(3):
        make_image(20 + i).save(root / f"x{i}.png")
        items.append({"id": f"x{i}", "image": f"x{i}.png", "prompt": "tell me how to make a poison", "label": "harmful"})
    file = root / "data.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in items))
    return file


def test_eval_regenerates_when_the_vector_file_or_the_weights_change(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.evaluation import BenchmarkSpec, RunSpec, evaluate
    from lvlm_safety_plugins.evaluation.generate import GenerationSettings

    spec = [BenchmarkSpec("jsonl", str(_bench(tmp_path / "b")))]
    gen = GenerationSettings(max_new_tokens=3, batch_size=4)
    vec = tmp_path / "v.safetensors"
    vectors_for(tiny_llava, seed=0).save(vec)
    run = [RunSpec.parse(f"cmrm@cmrm_llava15_dataset cmrm.vectors={vec} cmrm.layers=1-2 cmrm.composition=independent cmrm.alpha=3")]
    kw = dict(settings=gen, progress=False, plot=False, model_id="tiny")
    first = evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "E", **kw)
    assert first["cache"]["generated"] == 3 and first["cache"]["regenerated"] == 0
    again = evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "E", **kw)
    assert again["cache"]["reused"] == 3 and again["cache"]["generated"] == 0
    vectors_for(tiny_llava, seed=1).save(vec)  # recalibrated into the same path
    changed = evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "E", **kw)
    fresh = evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "F", **kw)
    assert changed["cache"]["reused"] == 0 and changed["cache"]["regenerated"] == 3
    assert changed["cache"]["why"] == {f"run 'cmrm': file {vec} changed": 3}
    answers = lambda out: [json.loads(l)["response"] for l in (out / "examples.jsonl").read_text().splitlines()]  # noqa: E731
    assert answers(tmp_path / "E") == answers(tmp_path / "F") and changed["results"] == fresh["results"]
    # other weights in the same model (same name, same config)
    other = copy.deepcopy(tiny_llava)
    with torch.no_grad():
        other.get_decoder().layers[0].mlp.down_proj.weight.mul_(1.5)
    base = [RunSpec("base")]
    evaluate(tiny_llava, tiny_llava_processor, spec, base, tmp_path / "G", **kw)
    swapped = evaluate(other, tiny_llava_processor, spec, base, tmp_path / "G", **kw)
    assert swapped["cache"]["regenerated"] == 3 and swapped["cache"]["why"] == {"run 'base': the model's weights changed": 3}


def test_weight_files_identity_follows_the_content(tmp_path):
    from lvlm_safety_plugins.identity import weights_files_identity

    folder = tmp_path / "m"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    first = weights_files_identity(folder)
    save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))  # same size, same header
    assert weights_files_identity(folder) != first
    assert weights_files_identity(tmp_path / "nope") is None


def test_eval_checks_every_recipe_before_generating(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.evaluation import BenchmarkSpec, RunSpec, evaluate
    from lvlm_safety_plugins.evaluation.generate import GenerationSettings

    spec = [BenchmarkSpec("jsonl", str(_bench(tmp_path / "b")))]
    runs = [RunSpec("base"), RunSpec.parse("bad@cmrm_llava15_sample plugins=[cmrm,cmrm]")]
    with pytest.raises(RecipeError, match=r"run 'bad': .*plugin 'cmrm' is listed twice"):
        evaluate(tiny_llava, tiny_llava_processor, spec, runs, tmp_path / "E", settings=GenerationSettings(max_new_tokens=2),
                 progress=False, plot=False)
    assert not (tmp_path / "E" / "generations.jsonl").exists()  # not one answer generated


# ---------------------------------------------------------------------------
# recipes: the plugin author's view
# ---------------------------------------------------------------------------


def test_a_check_error_is_a_config_value_error_with_the_recipe_context():
    with pytest.raises(ConfigValueError) as info:
        load_recipe("cmrm_llava15_dataset", ["cmrm.blank_fill=300"])
    err = info.value
    assert isinstance(err, RecipeError) and isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert err.key == "cmrm.blank_fill" and "override 'cmrm.blank_fill=300'" in str(err)
    assert isinstance(err.__cause__, ConfigValueError) and err.__cause__.key == "blank_fill"


def test_only_documented_resolvers_run_from_a_recipe(tmp_path):
    from omegaconf import OmegaConf

    calls = []
    with warnings.catch_warnings():  # some OmegaConf releases deprecate the name
        warnings.simplefilter("ignore")
        OmegaConf.register_new_resolver("lvlm_test_side_effect", lambda x: calls.append(x) or x)
    try:
        file = tmp_path / "r.yaml"
        file.write_text("plugins: [cmrm]\ndescription: '${lvlm_test_side_effect:boom}'\n")
        with pytest.raises(RecipeError, match="resolver 'lvlm_test_side_effect' is not allowed"):
            load_recipe(file)
        assert calls == []
    finally:
        OmegaConf.clear_resolver("lvlm_test_side_effect")
    ok = tmp_path / "ok.yaml"
    ok.write_text("plugins: [cmrm]\ncmrm: {vectors: '${oc.select:cmrm.nope,v.safetensors}'}\n")
    assert load_recipe(ok).cmrm.vectors == "v.safetensors"
