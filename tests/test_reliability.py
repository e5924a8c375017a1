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
    LVLMSafetyError,
    OutputError,
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
    assert all(get_adapter(tiny_llava).decoder_layers[i].mlp.down_proj.bias is None for i in range(4))


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
        get_adapter(other).decoder_layers[0].mlp.down_proj.weight.mul_(1.5)
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


# ---------------------------------------------------------------------------
# the caption index: never the input, never another embedder
# ---------------------------------------------------------------------------


def _index(spec="clip:/models/clip-a"):
    import numpy as np

    from lvlm_safety_plugins.retrieval import CaptionIndex

    vecs = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    return CaptionIndex.from_vectors(vecs, [f"text {i}" for i in range(4)], embedder_spec=spec)


def test_annotate_never_replaces_its_input(tmp_path, capsys):
    from lvlm_safety_plugins.cli import main
    from lvlm_safety_plugins.retrieval.annotate import annotate

    data = tmp_path / "train.json"
    original = json.dumps([{"id": "a", "image": "a.png", "conversations": []}])
    data.write_text(original)
    index = _index()
    with pytest.raises(OutputError, match="is the input"):
        annotate(data, index, data, progress=False)
    with pytest.raises(OutputError, match="is the input"):  # the same file by another spelling
        annotate(data, index, tmp_path / "." / "train.json", progress=False)
    index.save(tmp_path / "idx")
    assert main(["index", "annotate", str(tmp_path / "idx"), "--data", str(data), "--out", str(data)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert data.read_text() == original


def test_annotate_and_query_refuse_another_embedder(tmp_path, capsys):
    from lvlm_safety_plugins.cli import main
    from lvlm_safety_plugins.retrieval import RetrievalError
    from lvlm_safety_plugins.retrieval.annotate import annotate

    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "a", "image": "a.png"}]))
    index = _index("clip:/models/clip-a")
    with pytest.raises(RetrievalError, match=r"embedder 'clip:/models/clip-b' is not the one the index was built with \('clip:/models/clip-a'\)"):
        annotate(data, index, tmp_path / "out.json", embedder="clip:/models/clip-b", progress=False)
    assert not (tmp_path / "out.json").exists()
    index.check_embedder("clip:/models/../models/clip-a")  # the same folder, spelt otherwise
    index.check_embedder("clip:/models/clip-b", force=True)  # the explicit override
    index.save(tmp_path / "idx")
    assert main(["index", "query", str(tmp_path / "idx"), "--text", "x", "--embedder", "minilm"]) == 2
    assert "is not the one the index was built with" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# outputs: one --overwrite rule, checked before the work, the umask's mode
# ---------------------------------------------------------------------------


def test_atomic_outputs_get_the_umask_mode(tmp_path):
    import os

    from lvlm_safety_plugins.fileio import atomic_output_path, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_output_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "a.txt", 0o604)  # a replaced file keeps its mode, as a plain write would
        atomic_write_text(tmp_path / "a.txt", "z")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o604 and (tmp_path / "a.txt").read_text() == "z"
        _index().save(tmp_path / "idx")
        assert (tmp_path / "idx").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def _calibrate_cmd(tmp_path, out, *extra, overrides=()):
    return ["calibrate", "--recipe", "cmrm_llava15_dataset", "cmrm.layers=0-1", *overrides, "--model", str(tmp_path / "model"),
            "--data", str(tmp_path / "calib.jsonl"), "--out", str(out), *extra]


def _calib_data(tmp_path, n=2):
    lines = []
    for i in range(n):
        make_image(i).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": "what is in the image ?"}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines))


@pytest.mark.parametrize("case", ["exists", "directory", "under_file", "proc", "template_field", "template_brace",
                                  "cuda"])
def test_calibrate_checks_inputs_and_outputs_before_any_work(tmp_path, capsys, case):
    import torch as _torch

    from lvlm_safety_plugins.cli import main

    _calib_data(tmp_path)
    (tmp_path / "f").write_text("a file")
    (tmp_path / "old.safetensors").write_bytes(b"earlier vectors")
    extra: list[str] = []
    out = {"exists": tmp_path / "old.safetensors", "directory": tmp_path, "under_file": tmp_path / "f" / "v.safetensors",
           "proc": Path("/proc/lvlm-test/v.safetensors")}.get(case, tmp_path / "v.safetensors")
    if case == "template_field":
        extra = ["--template", "USER: {prompt} {system} ASSISTANT:"]
    elif case == "template_brace":
        extra = ["--template", "USER: {prompt ASSISTANT:"]
    elif case == "cuda":
        if _torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    # the model folder does not even exist: every check comes before loading it
    assert main(_calibrate_cmd(tmp_path, out, *extra)) == 2
    err = capsys.readouterr().err
    expected = {"exists": "already exists (pass --overwrite to replace it)", "directory": "is a folder; give a file name",
                "under_file": "is a file, not a folder", "proc": "cannot write in /proc",
                "template_field": "unknown field(s) {system}", "template_brace": "--template 'USER: {prompt ASSISTANT:'",
                "cuda": "--device cuda: CUDA is not available"}[case]
    assert err.startswith("lvlm-safety: error: ") and expected in err, err
    assert (tmp_path / "old.safetensors").read_bytes() == b"earlier vectors"


def test_calibrate_records_the_common_prompt_format_and_eval_refuses_another(tmp_path, capsys, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.cli import main
    from lvlm_safety_plugins.evaluation import BenchmarkSpec, RunSpec, evaluate
    from lvlm_safety_plugins.evaluation.generate import GenerationSettings
    from lvlm_safety_plugins.prompts import prompt_format, vectors_format

    tiny_llava.save_pretrained(tmp_path / "model")
    tiny_llava_processor.save_pretrained(tmp_path / "model")
    _calib_data(tmp_path)
    out = tmp_path / "v.safetensors"
    assert main(_calibrate_cmd(tmp_path, out, overrides=["cmrm.composition=independent"])) == 0
    chat = prompt_format(tiny_llava_processor)  # the tiny processor has no chat template: LLaVA-1.5's format
    assert chat == "llava-1.5 'USER: <image>\\n{prompt} ASSISTANT:'" and f"prompt format: {chat}" in capsys.readouterr().out
    assert vectors_format(out) == chat
    from lvlm_safety_plugins.loading import load_model_and_processor

    tiny_llava, tiny_llava_processor = load_model_and_processor(tmp_path / "model")  # the model calibrate saw
    spec = [BenchmarkSpec("jsonl", str(_bench(tmp_path / "b")))]
    run = [RunSpec.parse(f"cmrm@cmrm_llava15_dataset cmrm.vectors={out} cmrm.layers=0-1 cmrm.composition=independent")]
    kw = dict(progress=False, plot=False, model_id="tiny")
    other = GenerationSettings(max_new_tokens=2, template="Q: {prompt} A:")
    with pytest.raises(VectorFileError, match=re_escape(f"the vectors were calibrated on prompts in the {chat} format, these "
                                                        "prompts use the template 'Q: {prompt} A:' format")):
        evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "E", settings=other, **kw)
    assert not (tmp_path / "E" / "generations.jsonl").exists()
    same = evaluate(tiny_llava, tiny_llava_processor, spec, run, tmp_path / "E", settings=GenerationSettings(max_new_tokens=2), **kw)
    assert same["cache"]["generated"] == 3 and same["settings"]["prompt_format"] == chat
    lax = [RunSpec.parse(f"cmrm@cmrm_llava15_dataset cmrm.vectors={out} cmrm.layers=0-1 cmrm.composition=independent "
                         "cmrm.strict=false")]
    with pytest.warns(UserWarning, match="calibrated on prompts in the"):
        evaluate(tiny_llava, tiny_llava_processor, spec, lax, tmp_path / "L", settings=other, **kw)


@pytest.mark.parametrize("reference", ["blank", "none"])
def test_sample_level_cmrm_on_text_only_items_names_run_benchmark_and_items(tmp_path, tiny_llava, tiny_llava_processor, reference):
    from lvlm_safety_plugins.evaluation import BenchmarkSpec, RunSpec, evaluate
    from lvlm_safety_plugins.evaluation.generate import GenerationSettings

    file = _bench(tmp_path / "b")
    with file.open("a") as handle:
        handle.write(json.dumps({"id": "t1", "prompt": "how to steal a bike", "label": "harmful"}) + "\n")
    run = [RunSpec.parse(f"s@cmrm_llava15_sample cmrm.reference={reference}")]
    with pytest.raises(LVLMSafetyError, match=r"run 's', benchmark 'jsonl': sample-level CMRM .* text-only item\(s\) t1"):
        evaluate(tiny_llava, tiny_llava_processor, [BenchmarkSpec("jsonl", str(file))], run, tmp_path / "E",
                 settings=GenerationSettings(max_new_tokens=2), progress=False, plot=False)
    assert not (tmp_path / "E" / "generations.jsonl").exists()


# ---------------------------------------------------------------------------
# data files: encodings, images, weights, empty files
# ---------------------------------------------------------------------------


def test_non_utf8_data_is_named_in_calibrate_eval_and_index_build(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.evaluation import BenchmarkSpec, load_benchmark
    from lvlm_safety_plugins.loading import DataFileError
    from lvlm_safety_plugins.retrieval.corpus import read_corpus

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')  # byte 32 is the Latin-1 e-acute
    with pytest.raises(DataFileError, match=r"bad.jsonl: line 2 \(byte 32\): not valid UTF-8 text"):
        calibrate(tiny_llava, tiny_llava_processor, bad, layers=[1], progress=False)
    with pytest.raises(DataFileError, match=r"bad.jsonl: line 2 \(byte 32\): not valid UTF-8"):
        load_benchmark(BenchmarkSpec("jsonl", str(bad)))
    corpus = tmp_path / "captions.txt"
    corpus.write_bytes(b"a red dog\n\xff\xfe a cat\n")
    with pytest.raises(DataFileError, match=r"captions.txt: line 2 \(byte 10\): not valid UTF-8"):
        read_corpus(corpus)


def test_a_decompression_bomb_and_an_empty_file_are_named(tmp_path, tiny_llava, tiny_llava_processor):
    from PIL import Image

    from lvlm_safety_plugins.loading import DataFileError

    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 Mpx, two bytes on disk per row
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "bomb.png", "prompt": "hi"}) + "\n")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10_000_000  # the limit is a setting; 144 Mpx is over twice it
    try:
        with pytest.raises(DataFileError, match=r"data.jsonl: row 0 \(id 0\): unreadable image .*bomb.png: .*decompression bomb"):
            calibrate(tiny_llava, tiny_llava_processor, tmp_path / "data.jsonl", layers=[1], progress=False)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match=r"empty.jsonl: the calibration data has no rows"):
        calibrate(tiny_llava, tiny_llava_processor, tmp_path / "empty.jsonl", layers=[1], progress=False)


def test_a_truncated_weight_file_is_named(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.loading import load_model_and_processor

    tiny_llava.save_pretrained(tmp_path / "m")
    tiny_llava_processor.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LVLMSafetyError, match=r"m: .*(truncated|corrupt)"):
        load_model_and_processor(tmp_path / "m")


def test_every_command_wraps_prompts_in_one_format(tmp_path, capsys, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.cli import main
    from lvlm_safety_plugins.evaluation.examples import Example
    from lvlm_safety_plugins.evaluation.generate import build_prompt
    from lvlm_safety_plugins.prompts import PromptFormat

    proc = copy.deepcopy(tiny_llava_processor)
    proc.chat_template = ("{% for m in messages %}<|user|>{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                          "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}<|assistant|>")
    fmt = PromptFormat(proc)
    assert fmt.name.startswith("chat template ")
    assert fmt("what is this?") == "<|user|><image>what is this?<|assistant|>"
    example = Example(id="1", prompt="what is this?", image=make_image(0), label="benign")
    assert fmt("what is this?") == build_prompt(proc, example)  # calibrate's text is eval's text
    assert fmt("<image>\nwhat is this?") == fmt("what is this?")  # LLaVA data's own placeholder is not doubled
    assert PromptFormat(proc, "{prompt}")("USER: <image> hi ASSISTANT:") == "USER: <image> hi ASSISTANT:"  # formatted rows
    # analyze (without --template) says which format it used: the same default
    tiny_llava.save_pretrained(tmp_path / "model")
    tiny_llava_processor.save_pretrained(tmp_path / "model")
    (tmp_path / "harmful.txt").write_text("how to make a bomb\n")
    assert main(["analyze", "--model", str(tmp_path / "model"), "--harmful", str(tmp_path / "harmful.txt"),
                 "--out", str(tmp_path / "a")]) == 0
    assert f"prompt format: {PromptFormat(tiny_llava_processor).name}" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the plugin author's view
# ---------------------------------------------------------------------------


def test_the_public_api_table_lists_every_root_export():
    import re

    import lvlm_safety_plugins as root

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugin-authoring.md").read_text()
    [row] = [line for line in doc.splitlines() if line.startswith("| `lvlm_safety_plugins` |")]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[2]))
    assert listed == set(root.__all__), (sorted(set(root.__all__) - listed), sorted(listed - set(root.__all__)))


def test_the_adapter_locates_projector_and_decoder_layers_for_a_reference_hook(tiny_llava, tiny_llava_processor):
    adapter = get_adapter(tiny_llava)
    batch = tiny_llava_batch(tiny_llava_processor)
    seen = {}
    hooks = [adapter.decoder_layers[1].register_forward_hook(
                 lambda m, a, out: seen.update(layer=out[0] if isinstance(out, tuple) else out)),
             adapter.projector.register_forward_hook(lambda m, a, out: seen.update(projector=out))]
    try:
        with torch.no_grad():
            out = tiny_llava(**batch, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen["layer"], out.hidden_states[2])  # layer l's output is hidden_states[l + 1]
    # every projector output row is an image feature the decoder receives (in any version's layout)
    decoder_input = out.hidden_states[0].reshape(-1, adapter.hidden_size)
    projected = seen["projector"].reshape(-1, adapter.hidden_size)
    gaps = torch.cdist(projected, decoder_input).min(dim=1).values
    assert projected.shape[0] >= 2 and float(gaps.max()) < 1e-4  # cdist rounds; other rows are ~1 away


def test_an_interrupt_in_the_middle_of_a_write_leaves_the_old_file(tmp_path):
    from lvlm_safety_plugins.fileio import atomic_write

    target = tmp_path / "report.json"
    target.write_text("the old report")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as handle:
            handle.write("half of a new rep")
            raise KeyboardInterrupt  # Ctrl-C
    assert target.read_text() == "the old report" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_analyze_and_eval_report_follow_the_one_overwrite_rule_before_any_work(tmp_path, capsys):
    """``analyze --out`` and ``eval-report --out`` write fixed files into a folder: an
    existing one is refused without ``--overwrite`` (before the model or the results
    are read), a source's own results.json is never replaced, and nothing is touched."""
    from lvlm_safety_plugins.cli import main

    (tmp_path / "harmful.txt").write_text("how do I make a bomb\n")
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "analysis.json").write_text("earlier analysis")
    # the model folder does not exist: the output is checked before anything is loaded
    argv = ["analyze", "--model", str(tmp_path / "no-model"), "--harmful", str(tmp_path / "harmful.txt"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out / 'analysis.json'}: already exists (pass --overwrite to replace it)" in err, err
    assert (out / "analysis.json").read_text() == "earlier analysis"
    assert main(argv + ["--overwrite"]) == 2  # now past the output check: the missing model is the error
    err = capsys.readouterr().err
    assert "no-model" in err and "--out" not in err, err
    (tmp_path / "a-file").write_text("x")
    assert main(argv[:-1] + [str(tmp_path / "a-file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err

    source = tmp_path / "run"
    source.mkdir()
    (source / "results.json").write_text("{}")
    for target, expected in ((source, f"--out {source / 'results.json'}: is the input {source / 'results.json'}"),
                             (out, None)):
        (out / "results.md").write_text("earlier report")
        code = main(["eval-report", str(source), "--out", str(target), "--no-plot"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert expected in err if expected else f"--out {out / 'results.md'}: already exists" in err, err
    assert (source / "results.json").read_text() == "{}" and (out / "results.md").read_text() == "earlier report"
