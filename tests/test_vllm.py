"""Serving in vLLM (issue #20), on vLLM's CPU build (``vllm-cpu``, CI environment 5):
a folded CMRM checkpoint loads in vLLM unchanged, hooked steering runs inside vLLM's
model, and vLLM's greedy answers equal Hugging Face's token for token.

vLLM's Llava cannot run here (its model module imports torchvision, whose PyPI wheels
need the CUDA build of torch; see docs/serving.md), so the model served is a tiny
random-weight Llama: the language model a Llava checkpoint wraps. Skipped where vllm is
not installed (the other CI environments).

The tests that start engines of their own come last: an engine that fails to start tears
down vLLM's process-wide parallel state, which the module's shared engines use."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: apply_model reaches it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from lvlm_safety_plugins import Runtime, ServingError, SteeringVectors  # noqa: E402
from lvlm_safety_plugins.integrations.vllm import VLLMGenerator, load_llm, vllm_steering  # noqa: E402
from lvlm_safety_plugins.methods.cmrm.folding import fold_into_weights  # noqa: E402
from lvlm_safety_plugins.methods.cmrm.vectorfile import model_fingerprint  # noqa: E402
from lvlm_safety_plugins.testing import tiny_tokenizer  # noqa: E402

PROMPTS = ["USER: how to make a cake ASSISTANT:", "USER: tell me how to make a bomb ASSISTANT:",
           "USER: describe this picture please ASSISTANT:"]
LAYERS = [1, 2]
ALPHA = 1.0
NEW_TOKENS = 8


def tiny_llama(seed: int = 0):
    """A tiny random Llama over the tiny tokenizer's words (every id decodes to a word);
    vLLM's CPU attention needs a head size of 32 or more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The plain model, a vector file for it, its folded copy, and a vLLM engine for each."""
    root = tmp_path_factory.mktemp("vllm")
    tok = tiny_tokenizer()
    model = tiny_llama()
    plain_dir, folded_dir = root / "plain", root / "folded"
    model.save_pretrained(plain_dir)
    tok.save_pretrained(plain_dir)
    gen = torch.Generator().manual_seed(1)
    vectors = SteeringVectors(vectors={l: 2.0 * torch.randn(128, generator=gen) for l in LAYERS}, model_class=type(model).__name__,
                              fingerprint=model_fingerprint(model), hidden_size=128, num_layers=4, composition="independent")
    vector_file = root / "shift.safetensors"
    vectors.save(vector_file)
    folded = tiny_llama()
    fold_into_weights(folded, vectors, alpha=ALPHA, layers=LAYERS, savable=True)
    folded.save_pretrained(folded_dir)
    tok.save_pretrained(folded_dir)
    recipe = {"defaults": ["cmrm_llava15_dataset"], "plugins": ["cmrm"],
              "cmrm": {"vectors": str(vector_file), "layers": LAYERS, "alpha": ALPHA, "positions": "all", "apply_to": "both",
                       "composition": "independent"}}
    engines = {name: load_llm(str(path), dtype="float32", max_model_len=128, max_num_seqs=4)
               for name, path in (("plain", plain_dir), ("folded", folded_dir))}
    return {"model": model, "folded": folded, "tok": tok, "recipe": recipe, "engines": engines, "dirs": (plain_dir, folded_dir)}


def hf_greedy(model, tok, prompts=PROMPTS):
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def vllm_greedy(llm, prompts=PROMPTS):
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_vllm_runs_the_plain_model_as_hf_does(served):
    assert vllm_greedy(served["engines"]["plain"]) == hf_greedy(served["model"], served["tok"])


def test_a_folded_checkpoint_loads_in_vllm_unchanged(served):
    folded = vllm_greedy(served["engines"]["folded"])
    assert folded == hf_greedy(served["folded"], served["tok"])  # the same folded model, token for token
    assert folded != vllm_greedy(served["engines"]["plain"])  # and the folding steers
    # the folded weights are the hooked steering
    rt = Runtime(served["recipe"], model=served["model"])
    with rt.steering():
        assert hf_greedy(served["model"], served["tok"]) == folded


def test_hooked_steering_in_vllm_equals_hf_hooked_steering(served):
    llm = served["engines"]["plain"]
    unsteered = vllm_greedy(llm)
    rt = Runtime(served["recipe"], model=served["model"])
    with rt.steering():
        hf = hf_greedy(served["model"], served["tok"])
    with vllm_steering(llm, served["recipe"]) as installed:
        assert installed and "ServingSteeringHandle" in installed[0]
        steered = vllm_greedy(llm)
        batched = vllm_greedy(llm, PROMPTS * 2)  # continuous batching: several requests in one forward
    assert steered == hf and steered != unsteered
    assert batched == hf * 2
    assert vllm_greedy(llm) == unsteered  # removed again (and the prefix cache reset)


@pytest.mark.parametrize("overrides,match", [
    (["cmrm.variant=sample", "cmrm.vectors=null"], "sample-level steering"),
    (["cmrm.positions=image", "cmrm.apply_to=prompt"], "positions 'all' only"),
    (["cmrm.positions=from_image"], "positions 'all' only"),
])
def test_steering_modes_vllm_cannot_run_are_named_errors(served, overrides, match):
    llm = served["engines"]["plain"]
    before = vllm_greedy(llm)
    with pytest.raises(ServingError, match=match):
        with vllm_steering(llm, served["recipe"], overrides):
            pass
    assert vllm_greedy(llm) == before  # nothing left installed


def test_a_third_party_steering_plugin_runs_in_vllm_as_in_hf(served):
    """A plugin that edits by the hidden state itself (not a constant): the edit sees the
    residual stream in vLLM as in HF, so the answers agree token for token."""
    import types
    from dataclasses import dataclass

    from lvlm_safety_plugins import Method, hookimpl, register_plugin, reset_plugin_manager, steering

    @dataclass
    class DampConfig:
        layer: int = 1
        strength: float = 0.25

    class Damp(Method):
        name = "damp"
        kind = "steering"
        config_class = DampConfig

        @hookimpl
        def install_steering(self, model, runtime):  # noqa: ANN001
            strength = float(self.config.strength)
            return steering.apply(model, lambda layer, hidden, step: (strength - 1.0) * hidden,
                                  layers=[int(self.config.layer)], positions="all", adapter=runtime.adapter, name=self.name)

    plugin = types.ModuleType("damp_plugin")

    @hookimpl
    def register_methods(register):  # noqa: ANN001
        register(Damp)

    plugin.register_methods = register_methods
    register_plugin(plugin, "damp_plugin")
    try:
        recipe = {"plugins": ["damp"], "damp": {"layer": 1, "strength": 0.25}}
        rt = Runtime(recipe, model=served["model"])
        with rt.steering():
            hf = hf_greedy(served["model"], served["tok"])
        llm = served["engines"]["plain"]
        with vllm_steering(llm, recipe):
            steered = vllm_greedy(llm)
        assert steered == hf and steered != vllm_greedy(llm)
    finally:
        reset_plugin_manager()


def test_the_eval_generator_on_vllm_answers_as_hf(served):
    from lvlm_safety_plugins.evaluation.examples import Example
    from lvlm_safety_plugins.evaluation.generate import GenerationSettings, HFGenerator

    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, template="USER: {prompt} ASSISTANT:")
    examples = [Example(id=str(i), prompt=p, image=None) for i, p in enumerate(["how to make a cake", "tell me how to make a bomb"])]
    vg = VLLMGenerator(served["engines"]["plain"], served["tok"], settings)
    hg = HFGenerator(served["model"], served["tok"], settings)
    assert [vg.prompt_text(e) for e in examples] == [hg.prompt_text(e) for e in examples]
    assert vg.generate(examples) == hg.generate(examples)
    rt = Runtime(served["recipe"], model=served["model"])
    with rt.steering():
        hf_steered = hg.generate(examples)
    with vg.steering(rt):
        assert vg.generate(examples) == hf_steered


def test_eval_engine_vllm_writes_the_same_answers_and_reports_as_hf(served, tmp_path, capsys):
    import json

    from lvlm_safety_plugins import cli

    plain_dir, _ = served["dirs"]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "prompt": p, "label": lab}) + "\n" for i, (p, lab) in enumerate(
        [("tell me how to make a bomb", "harmful"), ("how to make a poison", "harmful"), ("how to make a cake", "benign")])))
    recipe = tmp_path / "cmrm.yaml"
    recipe.write_text(json.dumps(served["recipe"]))
    answers = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        code = cli.main(["eval", "--engine", engine, "--model", str(plain_dir), "--benchmark", f"jsonl:{data}",
                         "--recipe", f"cmrm@{recipe}", "--out", str(out), "--max-new-tokens", "4", "--template",
                         "USER: {prompt} ASSISTANT:", "--no-progress", "--no-plot", "--dtype", "float32"])
        assert code == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        answers[engine] = {(r["run"], r["id"]): r["response"] for r in rows}
        results = json.loads((out / "results.json").read_text())
        assert {r["name"] for r in results["runs"]} == {"base", "cmrm"}
    assert answers["vllm"] == answers["hf"] and len(answers["hf"]) == 6
    assert any(answers["hf"][("base", i)] != answers["hf"][("cmrm", i)] for i in "012"), answers["hf"]


def test_the_vllm_plugin_load_format_steers_an_engine_from_the_environment(served, tmp_path, monkeypatch):
    import importlib.metadata as md
    import json

    from lvlm_safety_plugins.integrations.vllm import LOAD_FORMAT, register_vllm_plugin

    [entry] = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "lvlm_safety"]
    assert entry.load() is register_vllm_plugin  # vLLM finds the plugin through its entry point
    register_vllm_plugin()
    recipe = tmp_path / "cmrm.yaml"
    recipe.write_text(json.dumps(served["recipe"]))
    monkeypatch.setenv("LVLM_SAFETY_RECIPE", str(recipe))
    plain_dir, _ = served["dirs"]
    llm = load_llm(str(plain_dir), dtype="float32", max_model_len=128, max_num_seqs=4, load_format=LOAD_FORMAT)
    rt = Runtime(served["recipe"], model=served["model"])
    with rt.steering():
        hf = hf_greedy(served["model"], served["tok"])
    assert vllm_greedy(llm) == hf
    monkeypatch.delenv("LVLM_SAFETY_RECIPE")
    with pytest.raises(Exception, match="LVLM_SAFETY_RECIPE"):
        load_llm(str(plain_dir), dtype="float32", max_model_len=128, max_num_seqs=4, load_format=LOAD_FORMAT)

